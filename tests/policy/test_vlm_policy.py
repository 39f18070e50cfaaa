"""VLMPolicy (vlm_treegrpo.policy.vlm) on tiny offline builds: K x M tree sampling with images,
one-row-per-leaf packing whose weights count each thought once, pack + logp equal to a plain
per-leaf forward, rows() keeping images aligned, each distinct image encoded once per training
forward (through the real trainer's update step), and mixed text-only + image batches.

Deep checks run on qwen2-vl (patches concatenated across the batch, mRoPE) and smolvlm (tiles
stacked per row); a quick parametrized check covers all six families.
"""
from __future__ import annotations

import pytest
import torch

from vlm_treegrpo.config import config_from_dict
from vlm_treegrpo.data.types import Example
from vlm_treegrpo.data.visual import VISUAL_INSTRUCTION, visual_splits
from vlm_treegrpo.policy.factory import make_policy
from vlm_treegrpo.rollout.packing import pack_trees
from vlm_treegrpo.rollout.tree import SamplingParams, eos_ids_of
from vlm_treegrpo.train.step import StepData, update_step
from vlm_treegrpo.vlm.adapter import Encoded
from vlm_treegrpo.policy.vlm import VLMPolicy, tiny_vlm_policy
from vlm_treegrpo.vlm.registry import FAMILIES, TINY_PARAMS
from vlm_treegrpo.vlm.tree_batch import VLMTreeBatch

K, M, THOUGHT, ANSWER = 2, 2, 4, 3
TRAIN, _ = visual_splits(2, 1, seed=0)
EXAMPLES = [TRAIN[0], Example("What is 3 + 4?", "7"), TRAIN[1]]  # image, text-only, image


def _tree_setup(policy: VLMPolicy, examples=EXAMPLES, k=K, m=M, thought=THOUGHT, answer=ANSWER, seed=0):
    prompts = [policy.encode(ex, VISUAL_INSTRUCTION) for ex in examples]
    torch.manual_seed(seed)
    with torch.no_grad():
        trees = policy.sample(prompts, k, m, thought, answer, SamplingParams(temperature=1.0), ["\n\n"])
    gen = torch.Generator().manual_seed(seed)
    thought_adv = torch.randn(len(trees), k, generator=gen)  # [N, K]
    answer_adv = torch.randn(len(trees), k, m, generator=gen)  # [N, K, M]
    return prompts, trees, thought_adv, answer_adv


@pytest.fixture(scope="module", params=("qwen2-vl", "smolvlm"))
def setup(request):
    policy = tiny_vlm_policy(request.param, "cpu")
    prompts, trees, thought_adv, answer_adv = _tree_setup(policy)
    return policy, prompts, trees, thought_adv, answer_adv, policy.leaf_rows(trees, thought_adv, answer_adv)


def _plain_leaf_logp(policy: VLMPolicy, prompt: Encoded, completion: list[int]) -> torch.Tensor:
    """Log-probs ``[C]`` of ``completion`` after ``prompt`` from a plain single-sample model forward."""
    adapter = policy.adapter
    ids = torch.tensor([completion])  # [1, C]
    batch = adapter.append_completion(adapter.collate([prompt], policy.pad_id), ids, torch.ones_like(ids))
    with torch.no_grad():
        logits = policy.model(**batch).logits[0, -len(completion) - 1 : -1].float()  # [C, V]
    return logits.log_softmax(-1).gather(-1, ids[0][:, None])[:, 0]


def leaf_columns(tree, T: int) -> dict:
    """``(k, m) -> columns`` of leaf (k, m)'s tokens (thought then continuation) in its packed
    VLM row: the tree's packed index j (index 0 = the prompt's last token) sits at T - 1 + j."""
    cols, j = {}, 1
    for k, thought in enumerate(tree.thoughts):
        t_cols = list(range(j, j + len(thought)))
        j += len(thought)
        conts = tree.answers[k] if not tree.thought_done[k] else [[]] * len(tree.answers[k])
        for m, ans in enumerate(conts):
            cols[(k, m)] = [T - 1 + c for c in t_cols + list(range(j, j + len(ans)))]
            j += len(ans)
    return cols


def check_tree_logp_matches_plain(policy, batch, trees, atol=1e-4):
    """Every leaf's tokens in a packed tree row score as in a plain single-sample forward."""
    with torch.no_grad():
        logp = policy.logp(batch)  # [N, L]
    assert logp.shape == batch.target_mask.shape == batch.input_ids.shape
    assert torch.all(logp[batch.target_mask == 0] == 0)
    T = batch.input_ids.shape[1] - (batch.tree.input_ids.shape[1] - 1)
    for n, tree in enumerate(trees):
        for (k, m), cols in leaf_columns(tree, T).items():
            leaf = tree.leaf_ids(k, m)
            assert batch.input_ids[n, cols].tolist() == leaf
            torch.testing.assert_close(logp[n, cols], _plain_leaf_logp(policy, tree.prompt, leaf), atol=atol, rtol=0)


def _check_budgets(policy, trees, prompts, k, m, thought, answer):
    eos = set(eos_ids_of(policy.tokenizer, policy.model))
    banned = set(policy.adapter.placeholder_token_ids(policy.model))
    assert len(trees) == len(prompts)
    for tree, prompt in zip(trees, prompts):
        assert tree.prompt is prompt and tree.prompt_ids == prompt.input_ids.tolist()
        assert len(tree.thoughts) == k and len(tree.answers) == k and len(tree.thought_done) == k
        for j in range(k):
            assert 1 <= len(tree.thoughts[j]) <= thought
            assert len(tree.answers[j]) == m
            assert not banned & set(tree.thoughts[j] + sum(tree.answers[j], []))  # no image placeholders sampled
            if tree.thought_done[j]:
                assert tree.thoughts[j][-1] in eos and all(a == [] for a in tree.answers[j])
            else:
                assert all(1 <= len(a) <= answer for a in tree.answers[j])


def _check_logp_matches_plain(policy, batch, trees, atol=1e-4):
    with torch.no_grad():
        logp = policy.logp(batch)  # [B, L]
    assert logp.shape == batch.target_mask.shape == batch.input_ids.shape
    assert torch.all(logp[batch.target_mask == 0] == 0)
    for r, (n, k, m) in enumerate(batch.leaf.tolist()):
        leaf = trees[n].leaf_ids(k, m)
        assert batch.completion_ids[r, : len(leaf)].tolist() == leaf
        row = logp[r][batch.target_mask[r] > 0]
        torch.testing.assert_close(row, _plain_leaf_logp(policy, trees[n].prompt, leaf), atol=atol, rtol=0)


def _vision_units(policy: VLMPolicy, fn) -> list[int]:
    """Run ``fn``; return the leading size of the pixel input of every vision-tower call
    (patches for Qwen, tiles / crops / images for the SigLIP families)."""
    sizes: list[int] = []

    def hook(module, args, kwargs, output):
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        sizes.append(int(x.shape[0]))

    handle = policy.adapter.vision_tower(policy.model).register_forward_hook(hook, with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return sizes


def _unique_image_units(policy: VLMPolicy, prompts: list[Encoded]) -> int:
    """Vision-tower input of a plain forward over each distinct image prompt once."""
    unique = [p for p in prompts if p.n_images]
    batch = policy.adapter.collate(unique, policy.pad_id)
    with torch.no_grad():
        return sum(_vision_units(policy, lambda: policy.model(**batch)))


# ----------------------------------------------------------------------------- deep checks


def test_sample_returns_k_by_m_trees_within_budgets(setup):
    policy, prompts, trees, *_ = setup
    _check_budgets(policy, trees, prompts, K, M, THOUGHT, ANSWER)


def test_flat_k_by_1_is_one_row_per_sample(setup):
    policy = setup[0]
    prompts, trees, thought_adv, answer_adv = _tree_setup(policy, EXAMPLES[:2], k=3, m=1, thought=3)
    assert all(t.thought_done == [True] * 3 and t.answers == [[[]]] * 3 for t in trees)
    batch = policy.leaf_rows(trees, thought_adv, answer_adv)
    assert batch.leaf.tolist() == [[n, k, 0] for n in range(2) for k in range(3)]
    assert set(batch.target_mask.unique().tolist()) <= {0.0, 1.0}


def test_thought_stops_at_branch_delimiter(setup):
    policy, prompts = setup[0], setup[1][:1]
    nl = policy.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    bias = torch.zeros(policy.model.get_output_embeddings().out_features)
    bias[nl[0]] = 100.0
    hook = policy.model.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        with torch.no_grad():
            trees = policy.sample(prompts, 2, 2, 10, 2, SamplingParams(greedy=True), ["\n\n"])
    finally:
        hook.remove()
    for thought, done in zip(trees[0].thoughts, trees[0].thought_done):
        assert not done and "\n\n" in policy.tokenizer.decode(thought) and len(thought) < 10


def test_pack_logp_equals_per_leaf_plain_forward(setup):
    policy, _, trees, _, _, batch = setup
    _check_logp_matches_plain(policy, batch, trees)


def test_thought_weights_count_each_thought_once(setup):
    policy, _, trees, thought_adv, answer_adv, batch = setup
    for n, tree in enumerate(trees):
        for k, thought in enumerate(tree.thoughts):
            rows = (batch.leaf[:, 0] == n) & (batch.leaf[:, 1] == k)
            T = len(thought)
            assert int(rows.sum()) == (1 if tree.thought_done[k] else M)
            torch.testing.assert_close(batch.weights[rows, :T].sum(0), torch.ones(T))  # each thought token once
            torch.testing.assert_close(batch.completion_adv[rows, :T], thought_adv[n, k].expand(int(rows.sum()), T))
            for r in rows.nonzero()[:, 0].tolist():
                m, A = int(batch.leaf[r, 2]), len(tree.answers[k][batch.leaf[r, 2]])
                assert torch.all(batch.weights[r, T : T + A] == 1) and torch.all(batch.weights[r, T + A :] == 0)
                if A:
                    assert torch.all(batch.completion_adv[r, T : T + A] == answer_adv[n, k, m])
    # The same token weights and weighted advantages as the text path's packed trees.
    text = pack_trees(trees, thought_adv, answer_adv, policy.pad_id)
    torch.testing.assert_close(batch.target_mask.sum(), text.target_mask.sum())
    torch.testing.assert_close((batch.target_mask * batch.advantages).sum(), (text.target_mask * text.advantages).sum())


def test_rows_slicing_keeps_images_aligned(setup):
    policy, _, _, _, _, batch = setup
    B = batch.input_ids.shape[0]
    with torch.no_grad():
        full = policy.logp(batch)  # [B, L]
        for sel in (torch.arange(B) % 3 != 1, slice(1, B - 2), torch.tensor([B - 1, 0, 2])):
            sub = batch.rows(sel).to("cpu")
            assert torch.equal(sub.leaf, batch.leaf[sel])
            n_images = sum(p.n_images for p in sub.prompts)
            assert n_images == len(sub.image_keys) and sub.prompts == [batch.prompts[i] for i in torch.arange(B)[sel].tolist()]
            torch.testing.assert_close(policy.logp(sub)[sub.target_mask > 0], full[sel][batch.target_mask[sel] > 0], atol=1e-5, rtol=0)
    assert batch.rows(torch.zeros(B, dtype=torch.bool)).input_ids.shape[0] == 0


def test_mixed_text_and_image_batch(setup):
    policy, prompts, trees, _, _, batch = setup
    assert prompts[1].n_images == 0 and prompts[0].n_images == prompts[2].n_images == 1
    text_rows = batch.leaf[:, 0] == 1
    assert text_rows.any() and (~text_rows).any()
    text_only = batch.rows(text_rows)
    assert "pixel_values" not in text_only.inputs and text_only.image_keys == ()
    with torch.no_grad():
        torch.testing.assert_close(policy.logp(text_only)[text_only.target_mask > 0], policy.logp(batch)[text_rows][batch.target_mask[text_rows] > 0])
    _check_logp_matches_plain(policy, text_only, trees)


def test_training_step_encodes_each_unique_image_once(setup):
    policy, prompts, trees, thought_adv, answer_adv, batch = setup
    cfg = config_from_dict({"rollout": {"K": K, "M": M}, "optim": {"micro_batch": 64}})
    optimizer = torch.optim.SGD(policy.model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    data = StepData(trees, torch.zeros(len(trees), K, M), thought_adv, answer_adv, batch, {})
    try:
        units = _vision_units(policy, lambda: update_step(policy, None, optimizer, scheduler, data, cfg, torch.device("cpu")))
    finally:
        policy.model.eval()
        policy.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        per_leaf = sum(_vision_units(policy, lambda: policy.adapter.forward_logits(policy.model, batch.inputs, dedupe_images=False)))
    assert units == [_unique_image_units(policy, prompts)]  # one vision call, each distinct image once
    assert per_leaf > units[0]  # without dedupe the leaves' copies would all be encoded


# ----------------------------------------------------------------------------- all six families


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_samples_packs_and_scores(family):
    policy = make_policy(f"tiny-{family}", "cpu")
    assert isinstance(policy, VLMPolicy) and policy.adapter.family == family
    n_params = sum(p.numel() for p in policy.model.parameters())
    assert f"{n_params / 1e6:.2f}M" == TINY_PARAMS[family]
    prompts, trees, thought_adv, answer_adv = _tree_setup(policy, EXAMPLES[:2], thought=3, answer=2)
    _check_budgets(policy, trees, prompts, K, M, 3, 2)
    batch = policy.leaf_rows(trees, thought_adv, answer_adv)
    _check_logp_matches_plain(policy, batch, trees)
    with torch.no_grad():
        units = _vision_units(policy, lambda: policy.logp(batch))
    assert units == [_unique_image_units(policy, prompts)]
    packed = policy.pack(trees, thought_adv, answer_adv)  # one row per tree where the family packs
    assert isinstance(packed, VLMTreeBatch) == policy.adapter.tree_packing
    if policy.adapter.tree_packing:
        check_tree_logp_matches_plain(policy, packed, trees)
    outs = policy.greedy(prompts, 3)
    assert len(outs) == 2 and all(1 <= len(o) <= 3 for o in outs) and len(policy.decode(outs)) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_encodes_each_image_once_and_matches_plain_generate(family):
    """Sampling repeats each prompt per sample; the repeats' images go through the vision tower
    once (precomputed ``mm_encoder_outputs``) and greedy outputs equal a plain ``generate``."""
    from vlm_treegrpo.rollout.tree import generate_batch

    policy = make_policy(f"tiny-{family}", "cpu")
    prompts = [policy.encode(ex, VISUAL_INSTRUCTION) for ex in (TRAIN[0], TRAIN[1])]
    greedy = SamplingParams(greedy=True)
    with torch.no_grad():
        sizes = []
        units = _vision_units(policy, lambda: sizes.append(policy._generate(prompts, 3, 4, greedy)))
        plain = generate_batch(policy.model, policy.tokenizer, policy.adapter.collate([p for p in prompts for _ in range(3)], policy.pad_id),
                               1, 4, greedy, None, policy.adapter.placeholder_token_ids(policy.model))
    assert sizes[0] == plain
    assert units == [_unique_image_units(policy, prompts)]  # 2 images once each, not 6
    prefills = []  # (rows, tokens) of every multi-token forward: the prompts, once each
    hook = policy.model.get_input_embeddings().register_forward_hook(
        lambda mod, inp, out: prefills.append(tuple(inp[0].shape)) if inp[0].shape[1] > 1 else None)
    try:
        with torch.no_grad():
            policy._generate(prompts, 3, 4, greedy)
    finally:
        hook.remove()
    T = max(len(p.input_ids) for p in prompts)
    assert prefills == [(2, T - 1)]  # not (6, T): each prompt runs once for its 3 samples


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefill_gives_the_plain_generate_logits(family):
    """Every decode step's logits after a shared prefill (each prompt once, its cache repeated,
    the model's per-row state repeated) equal those of generate over the repeated prompts."""
    from transformers import GenerationConfig

    from vlm_treegrpo.rollout.kv_cache import CACHE_KWARG, prefill_shared

    policy = make_policy(f"tiny-{family}", "cpu")
    adapter, model = policy.adapter, policy.model
    prompts = [policy.encode(ex, VISUAL_INSTRUCTION) for ex in (TRAIN[0], EXAMPLES[1], TRAIN[1])]
    repeated = [p for p in prompts for _ in range(2)]
    cfg = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=policy.pad_id, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(**adapter.collate(repeated, policy.pad_id), generation_config=cfg).scores
        cache = prefill_shared(model, adapter.collate(prompts, policy.pad_id), 2, adapter.row_state(model))
        copies = {k: v for k, v in adapter.collate(repeated, policy.pad_id).items() if not k.startswith("pixel_")}
        shared = model.generate(**copies, **{CACHE_KWARG: cache}, generation_config=cfg).scores
    assert len(plain) == len(shared) == 3
    for a, b in zip(plain, shared):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_entropy_of_a_tree_is_the_same_packed_and_per_leaf(family):
    """The entropy a log-prob pass records (``collect_entropy``) counts every token of a tree
    once: per leaf a thought's tokens weigh 1/M in each of its M leaves, packed they are scored
    once. Both equal the entropy computed from the full log-softmax of plain per-leaf forwards."""
    from vlm_treegrpo.rollout.logprobs import collect_entropy

    policy = make_policy(f"tiny-{family}", "cpu")
    prompts, trees, thought_adv, answer_adv = _tree_setup(policy, EXAMPLES[:2], thought=3, answer=2)
    leaf = policy.leaf_rows(trees, thought_adv, answer_adv)
    with torch.no_grad(), collect_entropy() as got:
        policy.logp(leaf)
    assert len(got) == 1
    with torch.no_grad():
        logits = policy.adapter.forward_logits(policy.model, leaf.inputs, dedupe_images=False).float()  # [B, L, V]
    C = leaf.completion_ids.shape[1]
    lp = torch.log_softmax(logits[:, -C - 1 : -1], dim=-1)  # [B, C, V] predictors of the completion tokens
    h = -(lp.exp() * lp).sum(-1)  # [B, C]
    want = float((h * leaf.weights).sum() / leaf.weights.sum())
    assert got[0][0] / got[0][1] == pytest.approx(want, rel=1e-5)
    assert got[0][1] == pytest.approx(sum(len(t.thoughts[k]) + sum(len(a) for a in t.answers[k]) for t in trees for k in range(K)))
    if policy.adapter.tree_packing:
        with torch.no_grad(), collect_entropy() as packed:
            policy.logp(policy.pack(trees, thought_adv, answer_adv))
        assert packed[0][1] == pytest.approx(got[0][1])  # every token once
        assert packed[0][0] / packed[0][1] == pytest.approx(want, rel=1e-4)
