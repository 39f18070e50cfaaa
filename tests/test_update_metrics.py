"""The clipped-ratio metrics of an off-policy update (algo.updates_per_batch > 1), read once after
each optimizer step: the same whatever the micro-batch size, and what the loss functions give."""
import pytest
import torch

from vlm_treegrpo.config import config_from_dict

P = 4


def varied_reward(completion: str, example) -> float:
    return (len(completion) % 5) / 4


def _update(micro_batch: int) -> dict:
    from vlm_treegrpo.data.arithmetic import make_arithmetic
    from vlm_treegrpo.optim import adamw, warmup_constant
    from vlm_treegrpo.policy import make_policy
    from vlm_treegrpo.rewards import RewardSet
    from vlm_treegrpo.step import rollout_step, update_step

    cfg = config_from_dict({"model": {"name": "tiny-llama"}, "rollout": {"K": 2, "M": 2, "thought_max_tokens": 6, "answer_max_tokens": 6,
                                                                          "prompts_per_step": P}},
                           ["algo.rewards=[test_update_metrics:varied_reward]", "algo.updates_per_batch=2", "algo.clip_eps=0.01",
                            f"optim.micro_batch={micro_batch}", "optim.lr=3e-2"])
    torch.manual_seed(0)
    policy = make_policy("tiny-llama", torch.device("cpu"), "float32")
    policy.model.double()
    examples = make_arithmetic(P, seed=0)
    prompts = [policy.encode(ex, "") for ex in examples]
    data = rollout_step(policy, examples, prompts, RewardSet.from_config(cfg.algo.rewards), cfg)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.betas, 0.0)
    return update_step(policy, None, optimizer, warmup_constant(optimizer, 0), data, cfg, torch.device("cpu"))


def test_off_policy_clip_metrics_do_not_depend_on_the_micro_batch():
    whole, split = _update(P), _update(1)
    assert whole["trees_updated"] == split["trees_updated"] > 1  # (several micro-batches in the split run)
    assert whole["ratio_mean"] != pytest.approx(1.0, abs=1e-6)  # the second update saw the first's weights
    assert 0 < whole["clip_frac"] < 1
    for key in ("ratio_mean", "clip_frac", "loss"):
        assert split[key] == pytest.approx(whole[key], rel=1e-6)  # (the token shares are fp32)
    assert all(isinstance(whole[k], float) for k in ("ratio_mean", "clip_frac"))


def test_the_metric_tensors_are_the_floats():
    from vlm_treegrpo.core.losses import policy_loss_metric_tensors, policy_loss_metrics

    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(3, 5, generator=g, dtype=torch.float64), -torch.rand(3, 5, generator=g, dtype=torch.float64)
    adv, mask = torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, 5, generator=g) > 0.3
    tensors = policy_loss_metric_tensors(logp, old, adv, mask, 0.1)
    assert all(t.dim() == 0 and not t.requires_grad for t in tensors.values())
    assert {k: float(v) for k, v in tensors.items()} == policy_loss_metrics(logp, old, adv, mask, 0.1)
