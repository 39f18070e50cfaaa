"""Shared by the whole suite: this folder is on sys.path, so a test module may import helpers
from another wing's tests as ``from policy.test_vlm_policy import ...``."""
