"""Inverse-CDF sampling: exact distribution, zero-probability tokens, and generate() integration."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vlm_treegrpo.data.arithmetic import make_arithmetic
from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout.prompts import prompt_ids
from vlm_treegrpo.rollout.sampling import InverseCDFSampler, NucleusSampler, Sampler, inverse_cdf_sample, nucleus, sampling_processors
from vlm_treegrpo.rollout.tree import SamplingParams, generate


def test_draw_is_the_first_index_whose_cumulative_mass_exceeds_u():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    g = torch.Generator().manual_seed(7)
    drawn = inverse_cdf_sample(logits, generator=g)
    u = torch.rand((2, 1), dtype=torch.float64, generator=torch.Generator().manual_seed(7)).squeeze(-1).tolist()
    cdfs = [[0.1, 0.3, 0.6, 1.0], [0.25, 0.5, 0.75, 1.0]]
    expected = [next(i for i, c in enumerate(cdf) if c > x) for cdf, x in zip(cdfs, u)]
    assert drawn.tolist() == expected


def test_frequencies_match_softmax():
    probs = torch.tensor([0.5, 0.05, 0.2, 0.25])
    logits = probs.log().repeat(40_000, 1)  # [40000, 4]
    draws = inverse_cdf_sample(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    se = (probs.double() * (1 - probs.double()) / len(draws)).sqrt()
    assert ((freq - probs.double()).abs() < 5 * se).all(), freq  # 5 sigma: a biased sampler is far outside


def test_zero_probability_tokens_are_never_drawn():
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 1.0, -math.inf]]).repeat(5000, 1)
    draws = inverse_cdf_sample(logits, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {1, 3}
    only_last = torch.tensor([[-math.inf, -math.inf, 2.0]]).repeat(100, 1)
    assert set(inverse_cdf_sample(only_last).tolist()) == {2}


def test_processor_puts_all_mass_on_the_drawn_token():
    scores = torch.randn(3, 10)
    out = InverseCDFSampler()(torch.zeros((3, 1), dtype=torch.long), scores)
    assert (out == 0).sum(-1).tolist() == [1, 1, 1]
    assert torch.isinf(out).sum(-1).tolist() == [9, 9, 9]


def test_processors_for_each_setting():
    draw = lambda *a: [type(p.draw).__name__ for p in sampling_processors(*a)]  # noqa: E731
    assert draw(0.7, 5, 0.9) == ["NucleusSampler"]
    assert draw(1.0, 0, 0.9) == ["NucleusSampler"]
    assert draw(1.0, 0, 1.0) == ["InverseCDFSampler"]
    with pytest.raises(ValueError, match="temperature"):
        Sampler(0.0)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.9)])
def test_sampler_suppresses_then_warps_as_transformers_does(top_k, top_p):
    """Sampler = SuppressTokens, Temperature, then the draw: same draws, same generator state,
    as the transformers processors chained before the draw."""
    scores = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    ids = torch.zeros((5, 1), dtype=torch.long)
    chained = TemperatureLogitsWarper(0.7)(ids, SuppressTokensLogitsProcessor([3, 9, 9, 17])(ids, scores))
    draw = NucleusSampler(top_k, top_p) if top_p < 1 else InverseCDFSampler()
    torch.manual_seed(5)
    expected = draw(ids, chained)
    torch.manual_seed(5)
    got = Sampler(0.7, top_k, top_p, suppress_ids=[9, 3, 17])(ids, scores)
    assert torch.equal(got, expected)
    torch.manual_seed(0)
    picks = Sampler(1.0, suppress_ids=range(39))(torch.zeros((200, 1), dtype=torch.long), torch.zeros(200, 40)).argmax(-1)
    assert set(picks.tolist()) == {39}  # every other token suppressed


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.5), (0, 0.999), (5, 1.0), (50, 0.8), (3, 0.3)])
@pytest.mark.parametrize("candidates", [256, 4])  # 4: most rows fall back to the full sort
def test_nucleus_keeps_what_the_transformers_warpers_keep(top_k, top_p, candidates):
    g = torch.Generator().manual_seed(top_k + int(top_p * 100))
    logits = torch.randn(6, 300, generator=g) * torch.tensor([0.3, 1.0, 3.0, 6.0, 0.01, 2.0])[:, None]  # flat to peaked rows
    logits[:, 7] = -math.inf  # a suppressed token
    warped = logits.clone()
    ids = torch.zeros((6, 1), dtype=torch.long)
    if top_k:
        warped = TopKLogitsWarper(top_k)(ids, warped)
    if top_p < 1:
        warped = TopPLogitsWarper(top_p)(ids, warped)
    expected = warped.softmax(-1)  # [6, 300]
    idx, probs = nucleus(logits, top_k, top_p, candidates)
    dense = torch.zeros_like(expected).scatter(-1, idx, probs / probs.sum(-1, keepdim=True))
    torch.testing.assert_close(dense, expected, atol=1e-6, rtol=1e-5)


def test_nucleus_sampler_frequencies():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(20_000, 1)
    torch.manual_seed(0)
    out = NucleusSampler(0, 0.7)(torch.zeros((20_000, 1), dtype=torch.long), logits)  # keeps 0.5, 0.3 -> 5/8, 3/8
    draws = out.argmax(-1)
    assert set(draws.tolist()) == {0, 1}
    assert abs(float((draws == 0).double().mean()) - 0.625) < 5 * (0.625 * 0.375 / 20_000) ** 0.5


def _tiny():
    model, tok = build_tiny_llama(seed=0)
    return model, tok, [prompt_ids(tok, e, "") for e in make_arithmetic(2, seed=0)]


def test_top_k_1_sampling_equals_greedy_decoding():
    model, tok, prompts = _tiny()
    greedy, _ = generate(model, tok, prompts, 1, 8, SamplingParams(greedy=True))
    sampled, _ = generate(model, tok, prompts, 3, 8, SamplingParams(temperature=1.0, top_k=1))
    assert sampled == [g for g in greedy for _ in range(3)]


def test_samples_per_prompt_are_distinct_draws():
    model, tok, prompts = _tiny()
    torch.manual_seed(0)
    outs, ended = generate(model, tok, prompts, 4, 8, SamplingParams(temperature=1.0))
    assert len(outs) == len(ended) == 8
    assert len({tuple(o) for o in outs[:4]}) > 1  # a random tiny model: 4 draws of 8 tokens differ


def test_shared_prefill_cache_equals_the_repeated_rows_cache():
    """prefill_shared runs each prompt once and repeats its KV cache: the same cache as running
    the n copies, and the same greedy continuations."""
    from vlm_treegrpo.rollout.kv_cache import CACHE_KWARG, prefill_shared
    from vlm_treegrpo.rollout.tree import generate_batch, left_pad

    model, tok, prompts = _tiny()
    prompts = [prompts[0], prompts[1][:-3]]  # unequal lengths: left padding in the batch
    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    cache = prefill_shared(model, {"input_ids": ids, "attention_mask": mask}, 3)
    rep_ids, rep_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    pos = (rep_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=rep_ids[:, :-1], attention_mask=rep_mask[:, :-1], position_ids=pos[:, :-1], use_cache=True)
        ref = getattr(ref, CACHE_KWARG)
    for got, want in zip(cache.layers, ref.layers):
        real = rep_mask[:, None, :-1, None].bool()  # padded slots hold whatever; compare real tokens
        torch.testing.assert_close(got.keys * real, want.keys * real, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.values * real, want.values * real, atol=1e-5, rtol=0)
    greedy = SamplingParams(greedy=True)
    shared, _ = generate_batch(model, tok, {"input_ids": ids, "attention_mask": mask}, 3, 6, greedy)
    plain, _ = generate_batch(model, tok, {"input_ids": rep_ids, "attention_mask": rep_mask}, 1, 6, greedy)
    assert shared == plain


def test_a_checkpoints_own_generation_settings_do_not_reach_our_sampling():
    """generate fills unset fields from the model's generation config: a checkpoint's repetition
    penalty, n-gram ban or extra return sequences would distort or reshape our samples. Ours
    sample the same with and without them, and the model's config is left as it was."""
    from vlm_treegrpo.models.tiny import build_tiny_llama
    from vlm_treegrpo.rollout.tree import SamplingParams, generate

    model, tok = build_tiny_llama(seed=1)
    seqs = [tok.encode("1 + 2 ="), tok.encode("12 * 34 - 5 =")]
    torch.manual_seed(0)
    want = generate(model, tok, seqs, 3, 12, SamplingParams(temperature=1.0))
    cfg = model.generation_config
    cfg.repetition_penalty, cfg.no_repeat_ngram_size, cfg.num_return_sequences, cfg.return_dict_in_generate = 5.0, 1, 2, True
    torch.manual_seed(0)
    got = generate(model, tok, seqs, 3, 12, SamplingParams(temperature=1.0))
    assert got == want
    assert model.generation_config is cfg and cfg.repetition_penalty == 5.0  # restored
    torch.manual_seed(0)
    greedy = generate(model, tok, seqs, 1, 12, SamplingParams(greedy=True))
    assert len(greedy[0]) == 2 and any(len(set(row)) < len(row) for row in greedy[0])  # repeats allowed: no n-gram ban


def test_a_uniform_at_the_top_of_the_range_still_draws_a_possible_token():
    """``u * total`` can round up to the total; the draw is then the last token with mass, never
    past the vocabulary or onto an impossible token."""
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), float("-inf")], [float("-inf"), 0.0, float("-inf"), 3.0, float("-inf")]])
    drawn = inverse_cdf_sample(logits, u=torch.ones(2, 1, dtype=torch.float64))
    assert drawn.tolist() == [2, 3]
    assert inverse_cdf_sample(logits, u=torch.zeros(2, 1, dtype=torch.float64)).tolist() == [0, 1]  # the first token with mass


def test_a_row_without_finite_logits_draws_inside_the_vocabulary():
    """NaN logits (a broken forward) cannot be searched; the draw stays a valid index, so the
    step does not crash on an index past the vocabulary."""
    logits = torch.tensor([[float("nan")] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]])
    drawn = inverse_cdf_sample(logits, u=torch.full((2, 1), 0.5, dtype=torch.float64))
    assert 0 <= int(drawn[0]) < 5 and int(drawn[1]) < 5
