"""CompileWatch: a compiled decode's graphs and recompiles are counted and explained, only those
inside the block, and no handler of ours stays on torch's loggers."""
from __future__ import annotations

import logging

import torch

from vlm_treegrpo.bench.compile_watch import CompileWatch, _Keep, _torch_loggers
from vlm_treegrpo.models.tiny import build_tiny_llama
from vlm_treegrpo.rollout.tree import SamplingParams, sample_trees


def test_a_compiled_tree_reports_its_graphs_and_the_recompile_for_the_wider_batch():
    torch._dynamo.reset()  # (no graph compiled by an earlier test is reused)
    model, tok = build_tiny_llama(seed=0)
    prompts = [tok.encode(p) for p in ["1 + 2 =", "7"]]
    sampling = SamplingParams(temperature=1.0, compile=True)
    with CompileWatch() as watch, torch.no_grad():  # thoughts: 2 x 2 rows; answers: 2 x 2 x 2 rows
        sample_trees(model, tok, prompts, 2, 2, 6, 4, sampling, ["e"])
    report = watch.report()
    assert report["counters"]["stats"]["unique_graphs"] == 2
    assert report["counters"]["frames"]["ok"] == 2
    recompiles = [line for line in report["log_first"] + report["log_last"] if "Recompiling" in line]
    assert len(recompiles) == 1 and "input_ids" in recompiles[0] and "size mismatch" in recompiles[0]  # (4 rows, then 8)
    assert report["log_lines"] >= 1
    assert not [h for lg in _torch_loggers() for h in lg.handlers if isinstance(h, _Keep)]  # (ours are gone)

    with CompileWatch() as again, torch.no_grad():  # the same shapes: no new graph, nothing to say
        sample_trees(model, tok, prompts, 2, 2, 6, 4, sampling, ["e"])
    assert "stats" not in again.report()["counters"] or "unique_graphs" not in again.report()["counters"]["stats"]
    assert not any("Recompiling" in line for line in again.report()["log_first"])


def test_lines_past_the_first_keep_the_last_and_count_all():
    with CompileWatch() as watch:
        log = logging.getLogger("torch._dynamo")
        for i in range(100):
            log.warning("line %d", i)
    report = watch.report()
    assert report["log_lines"] == 100
    assert report["log_first"][0].endswith("line 0") and len(report["log_first"]) == 20
    assert report["log_last"][-1].endswith("line 99") and report["log_last"][0].endswith("line 60")
