"""Hand-computed checks for vlm_treegrpo.core.losses."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from vlm_treegrpo.core.losses import (
    AGG_ALIASES,
    AGGREGATIONS,
    KL_KINDS,
    POLICY_LOSSES,
    kl_penalty,
    masked_mean,
    policy_loss,
    policy_loss_metrics,
    resolve_agg,
    sequence_log_ratio,
)

F64 = torch.float64


def t(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=F64, requires_grad=grad)


def loss_and_grad(logp_vals, *args, **kwargs):
    logp = t(logp_vals, grad=True)
    loss = policy_loss(logp, *args, **kwargs)
    loss.backward()
    return loss.detach(), logp.grad


def test_name_tuples():
    assert POLICY_LOSSES == ("grpo", "rgra", "gspo", "cispo")
    assert AGGREGATIONS == ("token_mean", "seq_mean", "constant", "seq_mean_token_sum")
    assert KL_KINDS == ("k1", "k3")


# ---------------------------------------------------------------- grpo, clipping active

# ratio = exp(logp - 0) = [1.5, 0.5, 1.0] on both rows; A = +1 on row 0, -1 on row 1; eps = 0.2
# row 0: -min(1.5, 1.2) = -1.2 (clipped), -min(0.5, 0.8) = -0.5, -1.0        -> sum -2.7
# row 1: -min(-1.5, -1.2) = 1.5, -min(-0.5, -0.8) = 0.8 (clipped), 1.0       -> sum  3.3
GRPO_LOGP = [[math.log(1.5), math.log(0.5), 0.0]] * 2
GRPO_OLD = [[0.0, 0.0, 0.0]] * 2
GRPO_ADV = [1.0, -1.0]


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_grpo_hand_example_full_mask(agg):
    loss, grad = loss_and_grad(GRPO_LOGP, t(GRPO_OLD), t(GRPO_ADV), torch.ones(2, 3), agg=agg)
    # token_mean: 0.6 / 6; seq_mean: (-0.9 + 1.1) / 2; constant: 0.6 / (2 * 3) -- all 0.1;
    # seq_mean_token_sum: (-2.7 + 3.3) / 2 = 0.3 (row sums, not row means)
    per_row_tokens = 3 if agg == "seq_mean_token_sum" else 1
    assert_close(loss, t(0.1 * per_row_tokens))
    # d/dlogp = -A * ratio where unclipped, 0 where clipped; every agg divides by 6 here
    # (seq_mean: 1/2 rows * 1/3 tokens), seq_mean_token_sum by 2 rows
    assert_close(grad, t([[0.0, -0.5, -1.0], [1.5, 0.0, 1.0]]) / 6 * per_row_tokens)


def test_grpo_hand_example_ragged_mask():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    args = (t(GRPO_OLD), t(GRPO_ADV), mask)
    # unmasked sum: (-1.2 - 0.5) + (1.5 + 0.8 + 1.0) = 1.6 over 5 tokens
    assert_close(policy_loss(t(GRPO_LOGP), *args, agg="token_mean"), t(1.6 / 5))
    # row means: -1.7 / 2 = -0.85, 3.3 / 3 = 1.1
    assert_close(policy_loss(t(GRPO_LOGP), *args, agg="seq_mean"), t((-0.85 + 1.1) / 2))
    assert_close(policy_loss(t(GRPO_LOGP), *args, agg="constant"), t(1.6 / 6))
    assert_close(policy_loss(t(GRPO_LOGP), *args, agg="constant", max_len=8), t(1.6 / 16))


def test_grpo_clip_eps_changes_value():
    # eps = 0.6: nothing clipped -> row 0: -(1.5 + 0.5 + 1) = -3; row 1: +3 -> 0
    loss = policy_loss(t(GRPO_LOGP), t(GRPO_OLD), t(GRPO_ADV), torch.ones(2, 3), clip_eps=0.6)
    assert_close(loss, t(0.0))


def test_grpo_needs_old_logp():
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss(t(GRPO_LOGP), None, t(GRPO_ADV), torch.ones(2, 3))


def test_metrics_hand_example():
    m = policy_loss_metrics(t(GRPO_LOGP), t(GRPO_OLD), t(GRPO_ADV), torch.ones(2, 3))
    assert set(m) == {"ratio_mean", "clip_frac", "approx_kl"}
    assert all(v.dim() == 0 and not v.requires_grad for v in m.values())  # (read by the caller, once: no sync here)
    m = {k: float(v) for k, v in m.items()}
    assert m["ratio_mean"] == pytest.approx(1.0)  # (1.5 + 0.5 + 1) / 3
    assert m["clip_frac"] == pytest.approx(2 / 6)  # row 0 token 0, row 1 token 1
    assert m["approx_kl"] == pytest.approx(-math.log(0.75) / 3)  # mean(old - logp)


def test_metrics_masked_and_nan_safe():
    logp = t([[math.log(1.5), float("nan")]])
    old = t([[0.0, float("inf")]])
    m = {k: float(v) for k, v in policy_loss_metrics(logp, old, t([1.0]), torch.tensor([[True, False]])).items()}
    assert m["ratio_mean"] == pytest.approx(1.5)
    assert m["clip_frac"] == pytest.approx(1.0)
    assert m["approx_kl"] == pytest.approx(-math.log(1.5))


# ---------------------------------------------------------------- rgra

# per_token = -A * logp; A = [2, -1]
# row 0: -2 * [-0.5, -1, -2] = [1, 2, 4];  row 1: 1 * [-0.25, -3, -4] = [-0.25, -3, -4]
RGRA_LOGP = [[-0.5, -1.0, -2.0], [-0.25, -3.0, -4.0]]
RGRA_ADV = [2.0, -1.0]
RAGGED = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_rgra_each_agg_ragged_mask():
    mask = torch.tensor(RAGGED)
    adv = t(RGRA_ADV)
    # unmasked: 1 + 2 - 0.25 = 2.75 over 3 tokens
    assert_close(policy_loss(t(RGRA_LOGP), None, adv, mask, kind="rgra"), t(2.75 / 3))
    # row means 1.5 and -0.25
    assert_close(
        policy_loss(t(RGRA_LOGP), None, adv, mask, kind="rgra", agg="seq_mean"), t(0.625)
    )
    assert_close(
        policy_loss(t(RGRA_LOGP), None, adv, mask, kind="rgra", agg="constant"), t(2.75 / 6)
    )
    assert_close(
        policy_loss(t(RGRA_LOGP), None, adv, mask, kind="rgra", agg="constant", max_len=4),
        t(2.75 / 8),
    )


def test_rgra_ignores_old_logp_and_clip():
    mask = torch.tensor(RAGGED)
    a = policy_loss(t(RGRA_LOGP), None, t(RGRA_ADV), mask, kind="rgra")
    b = policy_loss(t(RGRA_LOGP), t(RGRA_LOGP) + 5.0, t(RGRA_ADV), mask, kind="rgra", clip_eps=0.0)
    assert_close(a, b)


def test_rgra_gradient_is_minus_a_mask_over_denominator():
    mask = torch.tensor(RAGGED, dtype=F64)
    _, grad = loss_and_grad(RGRA_LOGP, None, t(RGRA_ADV), mask, kind="rgra")
    expected = -t(RGRA_ADV)[:, None] * mask / mask.sum()
    assert_close(grad, expected)
    assert_close(grad, t([[-2 / 3, -2 / 3, 0.0], [1 / 3, 0.0, 0.0]]))


def test_seq_mean_skips_empty_rows():
    logp = RGRA_LOGP + [[-1.0, -1.0, -1.0]]
    mask = torch.tensor(RAGGED + [[0.0, 0.0, 0.0]])
    loss, grad = loss_and_grad(logp, None, t(RGRA_ADV + [7.0]), mask, kind="rgra", agg="seq_mean")
    assert_close(loss, t(0.625))  # (1.5 - 0.25) / 2, the empty row is not counted
    # row r token: -A / (tokens in row * rows with tokens)
    assert_close(grad, t([[-0.5, -0.5, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_float_mask_weights():
    # weights [1, 0.5, 0]: (1 * 1 + 0.5 * 2) / 1.5
    loss = policy_loss(t([RGRA_LOGP[0]]), None, t([2.0]), t([[1.0, 0.5, 0.0]]), kind="rgra")
    assert_close(loss, t(2.0 / 1.5))


def test_bool_and_float_mask_agree():
    for kind in POLICY_LOSSES:
        for agg in AGGREGATIONS:
            args = (t(GRPO_LOGP), t(GRPO_OLD), t(GRPO_ADV))
            a = policy_loss(*args, torch.tensor(RAGGED), kind=kind, agg=agg)
            b = policy_loss(*args, torch.tensor(RAGGED) > 0, kind=kind, agg=agg)
            assert_close(a, b)


@pytest.mark.parametrize("kind", ["grpo", "gspo", "cispo"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_on_policy_gradient_equals_rgra(kind, agg):
    g = torch.Generator().manual_seed(0)
    vals = (-torch.rand(3, 5, generator=g, dtype=F64) * 3).tolist()
    adv = torch.randn(3, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    logp_g = t(vals, grad=True)
    policy_loss(logp_g, logp_g.detach(), adv, mask, kind=kind, agg=agg).backward()
    _, grad_r = loss_and_grad(vals, None, adv, mask, kind="rgra", agg=agg)
    assert_close(logp_g.grad, grad_r)


# ---------------------------------------------------------------- masking robustness


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), -float("inf"), 1e30])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kind", POLICY_LOSSES)
def test_masked_positions_never_matter(kind, agg, fill):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(3, 4, generator=g, dtype=F64)
    old = logp + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)  # some tokens clip
    adv = torch.randn(3, 4, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=F64)

    def run(lp, ol, ad):
        lp = lp.clone().requires_grad_(True)
        loss = policy_loss(lp, ol, ad, mask, kind=kind, agg=agg)
        loss.backward()
        return loss.detach(), lp.grad

    clean_loss, clean_grad = run(logp, old, adv)
    dirty = mask == 0
    d_logp, d_old, d_adv = (
        torch.where(dirty, torch.full_like(x, fill), x) for x in (logp, old, adv)
    )
    dirty_loss, dirty_grad = run(d_logp, d_old, d_adv)
    assert torch.isfinite(dirty_loss) and torch.isfinite(dirty_grad).all()
    assert_close(dirty_loss, clean_loss)
    assert_close(dirty_grad, clean_grad)
    assert torch.equal(dirty_grad[dirty], torch.zeros(int(dirty.sum()), dtype=F64))


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kind", POLICY_LOSSES)
def test_empty_mask_gives_zero_with_graph(kind, agg):
    logp = torch.full((2, 3), float("nan"), dtype=F64, requires_grad=True)
    old = torch.zeros(2, 3, dtype=F64)
    loss = policy_loss(logp, old, t([1.0, 2.0]), torch.zeros(2, 3), kind=kind, agg=agg)
    assert loss.dim() == 0 and loss.requires_grad
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3, dtype=F64))


def test_policy_loss_invalid():
    args = (t(GRPO_LOGP), t(GRPO_OLD), t(GRPO_ADV), torch.ones(2, 3))
    with pytest.raises(ValueError, match="kind"):
        policy_loss(*args, kind="ppo")
    with pytest.raises(ValueError, match="agg"):
        policy_loss(*args, agg="sum")
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(*args, agg="constant", max_len=0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(t(GRPO_LOGP), t(GRPO_OLD), t([1.0, 2.0, 3.0]), torch.ones(2, 3))


# ---------------------------------------------------------------- masked_mean


def test_masked_mean():
    x = t([[1.0, float("nan"), 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert_close(masked_mean(x, mask), t(2.0))
    assert_close(masked_mean(x, mask, dim=-1), t([2.0, 0.0]))
    assert_close(masked_mean(x, t([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]])), t(2.5 / 1.5))


# ---------------------------------------------------------------- KL


def test_kl_exact_values():
    logp = t([[0.0, math.log(2.0), -1.0]])
    ref = t([[math.log(2.0), 0.0, -1.0]])
    assert_close(kl_penalty(logp, ref, kind="k1"), t([[-math.log(2.0), math.log(2.0), 0.0]]))
    # d = ref - logp: exp(d) - d - 1 -> 2 - ln2 - 1 ; 0.5 + ln2 - 1 ; 0
    expected = t([[1.0 - math.log(2.0), math.log(2.0) - 0.5, 0.0]])
    assert_close(kl_penalty(logp, ref, kind="k3"), expected)
    assert_close(kl_penalty(logp, ref), expected)  # k3 is the default


def test_k3_nonnegative_and_differentiable():
    g = torch.Generator().manual_seed(4)
    logp = torch.randn(64, 32, generator=g)
    near = logp[:32] + 1e-7 * torch.randn(32, 32, generator=g)  # rounding-sensitive region
    far = torch.randn(32, 32, generator=g) * 5
    ref = torch.cat([near, far])
    logp.requires_grad_(True)
    k3 = kl_penalty(logp, ref, kind="k3")
    assert k3.shape == (64, 32)
    assert (k3 >= 0).all()
    k3.sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_invalid():
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(t([[0.0]]), t([[0.0]]), kind="k2")


# ---------------------------------------------------------------- DAPO clip-higher


def test_clip_higher_hand_example():
    # clip range [0.8, 1.6]: row 0 token 0 (ratio 1.5, A > 0) is no longer clipped
    # row 0: -1.5, -min(0.5, 0.8) = -0.5, -1.0 -> -3.0;  row 1 as symmetric: 1.5 + 0.8 + 1.0 = 3.3
    loss, grad = loss_and_grad(GRPO_LOGP, t(GRPO_OLD), t(GRPO_ADV), torch.ones(2, 3), clip_eps=0.2, clip_eps_high=0.6)
    assert_close(loss, t(0.3 / 6))
    assert_close(grad, t([[-1.5, -0.5, -1.0], [1.5, 0.0, 1.0]]) / 6)  # (A > 0 and ratio 0.5: the min keeps the unclipped term)
    # clip_eps_high=None is the symmetric range
    sym = policy_loss(t(GRPO_LOGP), t(GRPO_OLD), t(GRPO_ADV), torch.ones(2, 3), clip_eps=0.2, clip_eps_high=0.2)
    assert_close(sym, policy_loss(t(GRPO_LOGP), t(GRPO_OLD), t(GRPO_ADV), torch.ones(2, 3), clip_eps=0.2))


def test_clip_higher_metrics():
    m = policy_loss_metrics(t(GRPO_LOGP), t(GRPO_OLD), t(GRPO_ADV), torch.ones(2, 3), clip_eps=0.2, clip_eps_high=0.6)
    assert float(m["clip_frac"]) == pytest.approx(1 / 6)  # only row 1 token 1 (ratio 0.5 < 0.8, A < 0)


# ---------------------------------------------------------------- GSPO

# row 0: logp - old = [0.2, 0.0], A = +1 -> s = exp(0.1) = 1.105 (inside [0.8, 1.2]): -s per token
# row 1: logp - old = [-0.6, 0.0], A = -1 -> s = exp(-0.3) = 0.741 < 0.8: clipped, +0.8 per token
GSPO_OLD = [[-1.0, -1.0], [-1.0, -1.0]]
GSPO_LOGP = [[-0.8, -1.0], [-1.6, -1.0]]


def test_gspo_hand_example():
    s0 = math.exp(0.1)
    loss, grad = loss_and_grad(GSPO_LOGP, t(GSPO_OLD), t(GRPO_ADV), torch.ones(2, 2), kind="gspo")
    assert_close(loss, t((-2 * s0 + 1.6) / 4))
    # d/dlogp_t = -A * s / 4 on the unclipped row (every token of a sequence gets the same
    # weight s), 0 on the clipped one
    assert_close(grad, t([[-s0, -s0], [0.0, 0.0]]) / 4)
    # token-level grpo differs: row 0 token 0 has ratio exp(0.2) = 1.22 > 1.2, clipped
    grpo = policy_loss(t(GSPO_LOGP), t(GSPO_OLD), t(GRPO_ADV), torch.ones(2, 2), kind="grpo")
    assert_close(grpo, t((-1.2 - 1.0 + 0.8 + 1.0) / 4))


def test_gspo_seq_ids_split_a_row():
    # one row, two sequences: log ratios [0.2, 0.0 | -0.4, -0.2] -> s = exp(0.1), exp(-0.3); A = +1
    # (A > 0 and s < 0.8 is not clipped by the min: -min(0.741, 0.8) = -0.741, gradient flows)
    logp = [[-0.8, -1.0, -1.4, -1.2]]
    seq = torch.tensor([[0, 0, 1, 1]])
    s0, s1 = math.exp(0.1), math.exp(-0.3)
    loss, grad = loss_and_grad(logp, t([[-1.0] * 4]), t([1.0]), torch.ones(1, 4), kind="gspo", seq_ids=seq)
    assert_close(loss, t(-(2 * s0 + 2 * s1) / 4))
    assert_close(grad, -t([[s0, s0, s1, s1]]) / 4)
    # seq_ids all equal is the row as one sequence
    whole = policy_loss(t(logp), t([[-1.0] * 4]), t([1.0]), torch.ones(1, 4), kind="gspo", seq_ids=torch.zeros(1, 4, dtype=torch.long))
    assert_close(whole, policy_loss(t(logp), t([[-1.0] * 4]), t([1.0]), torch.ones(1, 4), kind="gspo"))


def test_sequence_log_ratio_weighted():
    lr = t([[0.3, 0.6, 9.0], [1.0, 2.0, 3.0]])
    w = t([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]])
    # row 0: (0.3 + 0.3) / 1.5 = 0.4 (weight 0 ignored); row 1 split [0, 1, 1]: 1.0 and 2.5
    assert_close(sequence_log_ratio(lr, w), t([[0.4] * 3, [2.0] * 3]))
    assert_close(sequence_log_ratio(lr, w, torch.tensor([[0, 0, 0], [0, 1, 1]])), t([[0.4] * 3, [1.0, 2.5, 2.5]]))


# ---------------------------------------------------------------- CISPO


def test_cispo_hand_example():
    # w = clamp([1.5, 0.5, 1.0], 0.8, 1.2) = [1.2, 0.8, 1.0] (detached); loss = -w * A * logp
    adv = t([2.0, -1.0])
    loss, grad = loss_and_grad(GRPO_LOGP, t(GRPO_OLD), adv, torch.ones(2, 3), kind="cispo")
    inner = 1.2 * math.log(1.5) + 0.8 * math.log(0.5)
    assert_close(loss, t((-2 * inner + inner) / 6))
    # every token keeps a gradient, clipped ones included (grpo zeroes row 0 token 0)
    assert_close(grad, t([[-2.4, -1.6, -2.0], [1.2, 0.8, 1.0]]) / 6)
    # clip-higher widens the upper bound: w = [1.5, 0.8, 1.0]
    _, grad_hi = loss_and_grad(GRPO_LOGP, t(GRPO_OLD), adv, torch.ones(2, 3), kind="cispo", clip_eps_high=1.0)
    assert_close(grad_hi, t([[-3.0, -1.6, -2.0], [1.5, 0.8, 1.0]]) / 6)


# ---------------------------------------------------------------- truncated importance sampling


def test_tis_rgra_hand_example():
    # prox = logp (rgra); exp(logp - behav) = [3, 0.5, 1] -> truncated at 2: [2, 0.5, 1]
    logp = [RGRA_LOGP[0]]
    behav = t(logp) - t([[math.log(3.0), math.log(0.5), 0.0]])
    loss, grad = loss_and_grad(logp, None, t([2.0]), torch.ones(1, 3), kind="rgra", behav_logp=behav, tis_cap=2.0)
    assert_close(loss, t(7.0 / 3))  # -A * logp = [1, 2, 4], times [2, 0.5, 1] -> [2, 1, 4], over 3 tokens
    assert_close(grad, t([[-4.0, -1.0, -2.0]]) / 3)
    # tis_cap = 0 is off; no behav_logp is off
    plain = policy_loss(t(logp), None, t([2.0]), torch.ones(1, 3), kind="rgra")
    assert_close(policy_loss(t(logp), None, t([2.0]), torch.ones(1, 3), kind="rgra", behav_logp=behav), plain)


def test_tis_ratio_losses_weight_by_old_over_behav():
    # grpo on-policy (old = logp) with TIS is rgra with the same TIS weights
    vals = [[-0.5, -1.0, -2.0], [-0.3, -0.7, -0.1]]
    behav = t(vals) + t([[0.5, -0.5, 0.0], [2.0, 0.0, -1.0]])
    adv = t([1.0, -2.0])
    kw = dict(behav_logp=behav, tis_cap=1.5)
    for kind in ("grpo", "gspo", "cispo"):
        logp = t(vals, grad=True)
        policy_loss(logp, logp.detach(), adv, torch.ones(2, 3), kind=kind, **kw).backward()
        _, grad_r = loss_and_grad(vals, None, adv, torch.ones(2, 3), kind="rgra", **kw)
        assert_close(logp.grad, grad_r)
    w = torch.clamp(torch.exp(t(vals) - behav), max=1.5)
    assert_close(grad_r, -adv[:, None] * w / 6)


# ---------------------------------------------------------------- aggregation names


def test_seq_mean_token_sum():
    mask = torch.tensor(RAGGED)
    # row sums 1 + 2 = 3 and -0.25, mean over the two rows
    loss = policy_loss(t(RGRA_LOGP), None, t(RGRA_ADV), mask, kind="rgra", agg="seq_mean_token_sum")
    assert_close(loss, t((3.0 - 0.25) / 2))


@pytest.mark.parametrize("alias", sorted(AGG_ALIASES))
def test_trl_and_verl_names_equal_ours(alias):
    args = (t(GRPO_LOGP), t(GRPO_OLD), t(GRPO_ADV), torch.tensor(RAGGED))
    assert_close(policy_loss(*args, agg=alias), policy_loss(*args, agg=resolve_agg(alias)))


def test_resolve_agg():
    assert resolve_agg("seq-mean-token-sum-norm") == "constant"
    assert resolve_agg("dr_grpo") == "constant"
    assert resolve_agg("grpo") == "seq_mean"
    assert resolve_agg("token_mean") == "token_mean"
    with pytest.raises(ValueError, match="agg"):
        resolve_agg("bnpo")
