"""Shared by the whole suite: this folder is on sys.path, so a test module may import helpers
from another wing's tests as ``from policy.test_vlm_policy import ...``; and every test writes
its measured records (:mod:`vlm_treegrpo.analysis.records`) into a temporary directory, never
into the repository's ``benchmarks/records/``."""
import pytest

from vlm_treegrpo.analysis.records import RECORDS_ENV


@pytest.fixture(autouse=True)
def records_dir(tmp_path_factory, monkeypatch):
    """The records directory of this test (``$VLM_TREEGRPO_RECORDS_DIR``, subprocesses included)."""
    path = tmp_path_factory.mktemp("records")
    monkeypatch.setenv(RECORDS_ENV, str(path))
    return path
