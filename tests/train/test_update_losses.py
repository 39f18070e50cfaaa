"""The loss menu through the trainer's update step: on-policy, grpo, gspo, cispo and rgra make the
same update (their gradients agree at ratio 1); truncated importance sampling weights each pass
against the sampling policy."""
import pytest
import torch

from test_distributed import _step
from vlm_treegrpo.config import ConfigError, config_from_dict
from vlm_treegrpo.core.losses import policy_loss
from vlm_treegrpo.train import step
from vlm_treegrpo.train.step import update_step


def _update(*overrides: str) -> tuple[dict, list[torch.Tensor]]:
    policy, cfg, data, optimizer, scheduler = _step("token_mean", "optim.micro_batch=2", *overrides)
    stats = update_step(policy, None, optimizer, scheduler, data, cfg, torch.device("cpu"))
    return stats, [p.detach().clone() for p in policy.model.parameters()]


@pytest.fixture(scope="module")
def grpo_update() -> list[torch.Tensor]:
    return _update("algo.loss=grpo")[1]


@pytest.mark.parametrize("loss", ["gspo", "cispo", "rgra"])
def test_on_policy_losses_make_grpos_update(loss, grpo_update):
    grpo = grpo_update
    stats, other = _update(f"algo.loss={loss}", "algo.clip_eps_high=0.5")
    assert stats["skipped_updates"] == 0
    for a, b in zip(grpo, other):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_tis_weights_each_pass_against_the_sampling_policy(monkeypatch):
    """Every pass's loss gets the sampler's log-probs (recorded before the first update) and the
    cap: the first pass's weights are exactly 1, the second's are the ratio to the sampler."""
    seen = []

    def recording_loss(logp, old_logp, advantages, mask, **kw):
        seen.append((logp.detach().clone(), kw["behav_logp"], kw["tis_cap"], mask))
        return policy_loss(logp, old_logp, advantages, mask, **kw)

    monkeypatch.setattr(step, "policy_loss", recording_loss)
    _update("algo.loss=rgra", "algo.updates_per_batch=2", "algo.tis_cap=1.5", "optim.lr=3e-2")
    half = len(seen) // 2
    assert half >= 2 and all(cap == 1.5 for *_, cap, _ in seen)
    for (lp0, behav0, _, mask), (lp1, behav1, _, _) in zip(seen[:half], seen[half:]):
        assert behav1 is behav0  # (the same sampler log-probs in both passes)
        on = mask > 0
        assert torch.equal(lp0[on], behav0[on])  # first pass: ratio exactly 1
        assert not torch.equal(lp1[on], behav1[on])  # second pass: the first update moved the policy


def test_a_tis_cap_below_one_is_refused():
    with pytest.raises(ConfigError, match="algo.tis_cap"):
        config_from_dict({}, ["algo.tis_cap=0.5"])
