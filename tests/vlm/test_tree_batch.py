"""VLM trees packed one per row (vlm_treegrpo.vlm.tree_batch) against one row per leaf: the same
per-token log-probs, the same training gradient, sub-batches that keep images aligned, each
distinct image encoded once, and prompts run once per tree.

Deep checks on qwen2-vl (mRoPE positions, patches concatenated across the batch) and smolvlm
(1-D positions, tiles stacked per row); every packing family is covered in test_policy.py.
"""
from __future__ import annotations

import pytest
import torch

from policy.test_vlm_policy import _tree_setup, _unique_image_units, _vision_units, check_tree_logp_matches_plain
from vlm_treegrpo.config import config_from_dict
from vlm_treegrpo.train.step import StepData, update_step
from vlm_treegrpo.policy.vlm import tiny_vlm_policy
from vlm_treegrpo.vlm.tree_batch import VLMTreeBatch

K, M = 2, 3


@pytest.fixture(scope="module", params=("qwen2-vl", "smolvlm"))
def setup(request):
    policy = tiny_vlm_policy(request.param, "cpu")
    prompts, trees, thought_adv, answer_adv = _tree_setup(policy, k=K, m=M, thought=4, answer=3, seed=1)
    packed = policy.pack(trees, thought_adv, answer_adv)
    assert isinstance(packed, VLMTreeBatch)
    return policy, prompts, trees, thought_adv, answer_adv, packed


def test_every_leaf_scores_as_a_plain_forward(setup):
    policy, _, trees, _, _, packed = setup
    check_tree_logp_matches_plain(policy, packed, trees)


def test_weighted_sums_equal_the_leaf_rows(setup):
    """The loss's ingredients: leaf rows weigh a continued thought 1/M in each of its M rows, the
    packed row holds it once with weight 1; every weighted sum over tokens is the same."""
    policy, _, trees, thought_adv, answer_adv, packed = setup
    leaves = policy.leaf_rows(trees, thought_adv, answer_adv)
    with torch.no_grad():
        lp_tree, lp_leaf = policy.logp(packed), policy.logp(leaves)
    torch.testing.assert_close(packed.target_mask.sum(), leaves.target_mask.sum())
    for a, b in (((packed.target_mask * packed.advantages), (leaves.target_mask * leaves.advantages)),
                 ((packed.target_mask * lp_tree), (leaves.target_mask * lp_leaf)),
                 ((packed.target_mask * packed.advantages * lp_tree), (leaves.target_mask * leaves.advantages * lp_leaf))):
        torch.testing.assert_close(a.sum(), b.sum(), atol=1e-4, rtol=1e-5)
    assert packed.input_ids.shape[0] == len(trees) < leaves.input_ids.shape[0]
    assert packed.is_thought.sum() * M == (leaves.is_thought * (leaves.target_mask > 0)).sum()  # each thought token once, not M times


def _grads(policy, batch, trees, thought_adv, answer_adv, micro_batch):
    cfg = config_from_dict({"rollout": {"K": K, "M": M}, "optim": {"micro_batch": micro_batch}})
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    data = StepData(trees, torch.zeros(len(trees), K, M), thought_adv, answer_adv, batch, {})
    try:
        stats = update_step(policy, None, optimizer, scheduler, data, cfg, torch.device("cpu"))
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    finally:
        policy.model.eval()
        policy.model.zero_grad(set_to_none=True)
    return stats, grads


def test_training_gradient_equals_the_leaf_rows(setup):
    policy, _, trees, thought_adv, answer_adv, packed = setup
    leaves = policy.leaf_rows(trees, thought_adv, answer_adv)
    s_leaf, g_leaf = _grads(policy, leaves, trees, thought_adv, answer_adv, 64)
    s_tree, g_tree = _grads(policy, packed, trees, thought_adv, answer_adv, 1)  # one tree per micro-batch
    assert s_tree["loss"] == pytest.approx(s_leaf["loss"], abs=1e-5)
    assert g_leaf.keys() == g_tree.keys() and g_leaf
    for name in g_leaf:
        torch.testing.assert_close(g_tree[name], g_leaf[name], atol=2e-5, rtol=1e-3, msg=name)


def test_rows_keep_images_aligned_and_trim(setup):
    policy, _, _, _, _, packed = setup
    N = packed.input_ids.shape[0]
    with torch.no_grad():
        full = policy.logp(packed)
        for sel in (torch.tensor([2, 0]), slice(1, None), torch.arange(N) != 1):
            sub = packed.rows(sel)
            idx = torch.arange(N)[sel].tolist()
            assert sub.prompts == [packed.prompts[i] for i in idx]
            got = policy.logp(sub)
            for r, i in enumerate(idx):
                torch.testing.assert_close(got[r][sub.target_mask[r] > 0], full[i][packed.target_mask[i] > 0], atol=1e-5, rtol=0)
    text_only = packed.rows(torch.tensor([1]))  # EXAMPLES[1] has no image
    assert text_only.prompts[0].n_images == 0 and "pixel_values" not in text_only.model_inputs(policy.model)


def test_one_vision_call_each_distinct_image_once(setup):
    policy, prompts, _, _, _, packed = setup
    with torch.no_grad():
        units = _vision_units(policy, lambda: policy.logp(packed))
    assert units == [_unique_image_units(policy, prompts)]


def test_prompt_runs_once_per_tree(setup):
    """A row is the prompt once, then each thought and each continuation once."""
    policy, prompts, trees, _, _, packed = setup
    inputs = packed.model_inputs(policy.model)
    T = max(len(p.input_ids) for p in prompts)
    widths = []
    for n, tree in enumerate(trees):
        distinct = sum(len(t) for t in tree.thoughts) + sum(len(a) for conts in tree.answers for a in conts)
        assert int((packed.tree.position_ids[n] > 0).sum()) == distinct == int((packed.target_mask[n] > 0).sum())
        widths.append(distinct)
    assert inputs["input_ids"].shape[1] == T + max(widths)
    leaves = policy.leaf_rows(trees, *setup[3:5])
    assert inputs["input_ids"].numel() < leaves.input_ids.numel()


def test_dense_mask_default_of_a_gpu_builds_no_plan_and_agrees(setup, monkeypatch):
    """Where the device's default is the dense tree mask (a GPU's), scoring builds no segment
    plan and gives the per-segment log-probs."""
    from vlm_treegrpo.rollout import attention

    policy, _, _, _, _, packed = setup
    with torch.no_grad():
        want = packed.logp(policy.model)
    planned = []
    monkeypatch.setattr(VLMTreeBatch, "plan", lambda self, prompt_real: planned.append(1))
    monkeypatch.setattr(attention, "PLAN_DEVICES", frozenset())
    with torch.no_grad():
        got = packed.logp(policy.model)
    assert planned == []
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_model_inputs_come_from_the_host_copy(setup):
    """Off the CPU the inputs are built from the tree's host copy (``host``): a batch whose moved
    tree has wrong positions and predictors but a right host copy scores exactly as the original."""
    import dataclasses

    policy, _, _, _, _, packed = setup
    broken = dataclasses.replace(packed.tree, position_ids=torch.zeros_like(packed.tree.position_ids),
                                 pred_pos=torch.zeros_like(packed.tree.pred_pos))
    hosted = dataclasses.replace(packed, tree=broken, host=packed.tree)
    with torch.no_grad():
        want = policy.logp(packed)
        assert torch.equal(policy.logp(hosted), want)
        assert not torch.equal(policy.logp(dataclasses.replace(hosted, host=None)), want)  # (the check can fail)
        assert torch.equal(policy.logp(hosted.rows(slice(1, None))), policy.logp(packed.rows(slice(1, None))))


def test_to_keeps_the_host_copy_off_the_cpu(setup):
    packed = setup[-1]
    moved = packed.to("meta")
    assert moved.host is packed.tree and moved.tree.input_ids.device.type == "meta"
    assert moved.to("meta").host is packed.tree
    assert packed.to("cpu").host is None and moved.to("cpu").host is None
    assert moved.to("cpu").tree is packed.tree  # back on the CPU: the host copy itself, no copy
    sub, want = moved.rows(slice(1, None)), packed.rows(slice(1, None))  # selected on the host, then moved
    assert sub.tree.input_ids.device.type == "meta" and torch.equal(sub.host.input_ids, want.tree.input_ids)
    assert sub.tree.input_ids.shape == want.tree.input_ids.shape
