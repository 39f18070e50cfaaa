"""The clipped-ratio metrics of an off-policy update (algo.updates_per_batch > 1), read once after
each optimizer step: the same whatever the micro-batch size, and what the loss functions give."""
import pytest
import torch

from test_distributed import P, _step


def _update(micro_batch: int) -> dict:
    from vlm_treegrpo.train.step import update_step

    policy, cfg, data, optimizer, scheduler = _step("token_mean", "algo.updates_per_batch=2", "algo.clip_eps=0.01",
                                                    f"optim.micro_batch={micro_batch}", "optim.lr=3e-2")
    return update_step(policy, None, optimizer, scheduler, data, cfg, torch.device("cpu"))


def test_off_policy_clip_metrics_do_not_depend_on_the_micro_batch():
    whole, split = _update(P), _update(1)
    assert whole["trees_updated"] == split["trees_updated"] > 1  # (several micro-batches in the split run)
    assert whole["ratio_mean"] != pytest.approx(1.0, abs=1e-6)  # the second update saw the first's weights
    assert 0 < whole["clip_frac"] < 1
    for key in ("ratio_mean", "clip_frac", "loss"):
        assert split[key] == pytest.approx(whole[key], rel=1e-6)  # (the token shares are fp32)
    assert all(isinstance(whole[k], float) for k in ("ratio_mean", "clip_frac"))
