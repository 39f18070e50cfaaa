"""Decoding that drops finished rows samples exactly what one uninterrupted ``generate`` call
samples (the sampler's uniforms follow the original rows), while ``generate`` really runs in
several segments; RowStop's bookkeeping on a hand example."""
from __future__ import annotations

import pytest
import torch

import vlm_treegrpo.rollout.decode as D
from vlm_treegrpo.data.arithmetic import make_arithmetic
from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout.prompts import prompt_ids
from vlm_treegrpo.rollout.tree import SamplingParams, generate, sample_trees


def _setup(n=4):
    model, tok = build_tiny_llama(seed=0)
    model.generation_config.eos_token_id = [tok.eos_token_id, *range(300, 380)]  # rows end at different steps
    return model.double(), tok, [prompt_ids(tok, e, "") for e in make_arithmetic(n, seed=0)]


def _count_generate(model, monkeypatch) -> list[int]:
    """Records the batch size of every ``generate`` call."""
    calls, orig = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw["input_ids"].shape[0]) or orig(**kw))
    return calls


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8),
                                      SamplingParams(greedy=True)], ids=["inverse-cdf", "nucleus", "greedy"])
def test_dropping_finished_rows_samples_what_one_generate_call_samples(sampling, monkeypatch):
    model, tok, prompts = _setup(24 if sampling.greedy else 4)
    n = 1 if sampling.greedy else 6  # (greedy copies of a prompt are one sequence: they finish together)
    if sampling.greedy:  # the untrained model's argmax repeats one token: a random bias by (token, position) makes rows differ
        V = model.config.vocab_size
        table = 8 * torch.randn(V, V, generator=torch.Generator().manual_seed(0))

        def bias(module, args, kwargs, out):
            out.logits = out.logits + table[(kwargs["input_ids"] + 7 * kwargs["position_ids"]) % V].to(out.logits)

        model.register_forward_hook(bias, with_kwargs=True)
        model.generation_config.eos_token_id = [tok.eos_token_id, *range(300, 320)]
    kw = dict(temperature=sampling.temperature, top_p=sampling.top_p, greedy=sampling.greedy)
    torch.manual_seed(7)
    want = generate(model, tok, prompts, n, 24, SamplingParams(**kw, drop_finished=False), ["\n"])
    calls = _count_generate(model, monkeypatch)
    torch.manual_seed(7)
    got = generate(model, tok, prompts, n, 24, SamplingParams(**kw, drop_finished=True), ["\n"])
    assert got == want
    lens = [len(ids) for ids in want[0]]
    assert len(set(lens)) > 3 and any(want[1]) and not all(want[1])  # rows finished at many steps, by EOS and otherwise
    assert len(calls) > 1 and calls == sorted(calls, reverse=True) and calls[-1] < calls[0]  # segments on fewer rows


def test_trees_with_dropped_rows_equal_trees_without(monkeypatch):
    """The thought pass drops rows (their cache is kept as a piece)
    and the continuations resume from the pieces: the same trees as without dropping."""
    model, tok, prompts = _setup()
    trees = {}
    for drop in (False, True):
        torch.manual_seed(11)
        calls = _count_generate(model, monkeypatch)
        got = sample_trees(model, tok, prompts, 4, 3, 16, 12, SamplingParams(drop_finished=drop), ["1", "e"])
        trees[drop] = ([(t.thoughts, t.thought_done, t.answers) for t in got], len(calls))
    assert trees[True][0] == trees[False][0]
    assert trees[False][1] == 2 and trees[True][1] > 2


def test_row_stop_marks_rows_and_halts_for_the_drop():
    tok = build_tiny_llama(seed=0)[1]
    nl = tok("\n", add_special_tokens=False)["input_ids"][-1]
    eos = tok.eos_token_id
    rule = D.StopRule([eos], tok, ["\n"])
    stop = D.RowStop(rule, prompt_len=2, end=20, halt_after=2)
    step1 = torch.tensor([[5, 5, 7], [5, 5, eos], [5, 5, 8]])
    assert stop(step1, None).tolist() == [False, True, False]
    step2 = torch.cat([step1, torch.tensor([[nl], [eos], [9]])], 1)  # row 0 stops at the delimiter: 2 finished
    assert stop(step2, None).tolist() == [True, True, True]  # halts the call (16 steps left)
    assert stop.done.tolist() == [True, True, False]
    late = D.RowStop(rule, prompt_len=2, end=6, halt_after=2)
    late(step1, None)
    assert late(step2, None).tolist() == [True, True, False]  # 2 steps left: not worth a compaction


def test_next_segment_inputs_grow_the_kept_rows():
    inputs = {"input_ids": torch.tensor([[0, 1, 2], [3, 4, 5]]), "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
              "mm_token_type_ids": torch.tensor([[0, 1, 0], [1, 0, 1]]), "token_type_ids": torch.tensor([[0, 0, 0], [0, 1, 1]]),
              "pixel_values": torch.ones(2, 3)}
    seq = torch.tensor([[0, 1, 2, 9, 9], [3, 4, 5, 8, 8]])
    out = D._next_inputs(inputs, seq, torch.tensor([1]))
    assert set(out) == {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}  # the cache holds the images
    assert out["input_ids"].tolist() == [[3, 4, 5, 8, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]
    assert out["mm_token_type_ids"].tolist() == [[1, 0, 1, 0, 0]]  # generated text
    assert out["token_type_ids"].tolist() == [[0, 1, 1, 1, 1]]  # as generate grows them: the last column repeated


def test_the_rollout_config_turns_dropping_off():
    from vlm_treegrpo.config import RolloutConfig

    assert SamplingParams.of(RolloutConfig()).drop_finished is True
    assert SamplingParams.of(RolloutConfig(drop_finished=False)).drop_finished is False


class _RowIds(D.RowState):
    """A per-row state that is the rows' own ids: what it holds names the rows it follows."""

    def __init__(self, B: int):
        self.ids: torch.Tensor | None = torch.arange(B)
        self.selects: list[list[int]] = []

    def get(self):
        return self.ids

    def select(self, rows, n=1):
        self.selects.append(list(rows))
        self.ids = self.ids[rows].repeat_interleave(n)


def test_the_row_state_follows_the_kept_rows_and_the_pass_keeps_it_whole_and_no_eos_row_is_stashed():
    model, tok, prompts = _setup()
    from vlm_treegrpo.rollout.kv_cache import prefill_shared
    from vlm_treegrpo.rollout.tree import SamplingParams as S
    from vlm_treegrpo.rollout.tree import cut_completions, left_pad

    ids, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    inputs = {"input_ids": ids, "attention_mask": mask}
    n = 6
    state = _RowIds(len(prompts))
    cache = prefill_shared(model, inputs, n)
    state.ids = state.ids.repeat_interleave(n)  # (as prefill_shared's state.repeat does)
    copies = {k: v.repeat_interleave(n, dim=0) for k, v in inputs.items()}
    sampling = S()
    cfg = sampling.generation_config(24, tok.pad_token_id, model.generation_config.eos_token_id)
    torch.manual_seed(3)
    out, pieces, full = D.decode(model, copies, cache, cfg, sampling.logits_processors(()),
                                 D.StopRule(model.generation_config.eos_token_id, tok, ["e"]), state=state, stash=True)
    assert len(state.selects) >= 2  # rows were dropped more than once
    assert full.tolist() == torch.arange(len(prompts)).repeat_interleave(n).tolist()  # the pass's state, from before any drop
    assert state.ids.tolist() == (pieces[-1].rows // n).tolist()  # the live state is that of the last segment's rows
    _, ended = cut_completions(out, ids.shape[1], tok, model.generation_config.eos_token_id, ["e"])
    at_eos = {r for r, e in enumerate(ended) if e}
    stashed = {r for p in pieces[:-1] for r in p.rows.tolist()}
    assert at_eos and stashed and not stashed & at_eos  # dropped rows are kept for their continuations, EOS ones are not
    assert stashed | set(pieces[-1].rows.tolist()) | at_eos == set(range(len(out)))  # every row that may be continued has a cache
