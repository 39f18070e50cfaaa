"""Sampling where each op costs about its dispatch: our decode loops against plain ``generate``.

On a GPU a small model's decode step is bound by the host issuing kernels, not by the GPU
running them. This script reproduces that regime anywhere: SmolLM2's depth (30 layers) and head
layout at a tiny width, on one CPU thread, where each op costs about its dispatch. It times one
sampling pass of 4 prompts x 16 samples x 40 new tokens and counts the ops dispatched (on a GPU
each compute op is about one kernel launch), the share of them inside model forwards (a decode
step's forward is one graph replay under ``rollout.decode_graphs`` on a GPU) and the host syncs,
for:

- ``hf-generate``: ``model.generate(do_sample=True)``, the loop TRL's ``GRPOTrainer`` runs;
- ``ours 16x1`` / ``ours 4x4``: our sampler (:func:`~vlm_treegrpo.rollout.tree.sample_trees`),
  flat and as a tree;
- ``ours 16x1 graphs`` / ``ours 4x4 graphs``: the same with ``rollout.decode_graphs`` (on a GPU
  each step is one graph replay; on the CPU the same loop runs eagerly).

    python scripts/launch_proxy.py [--device cuda] [--repeats 5] [--out docs/results/launch-proxy.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_step import OpCount  # noqa: E402

from vlm_treegrpo.models.tokenizer import build_local_tokenizer  # noqa: E402
from vlm_treegrpo.analysis.records import script_command, write_record  # noqa: E402
from vlm_treegrpo.rollout import graphs  # noqa: E402
from vlm_treegrpo.rollout.tree import SamplingParams, left_pad, sample_trees  # noqa: E402

PROMPTS = ["12 + 7 * 3 = ? think step by step", "5 + 41 * 2 = ?", "9 * 9 - 9 =", "100 + 3 * 17 = ? show the steps"]
NEW_TOKENS, SAMPLES, THOUGHT = 40, 16, 16


def build(device: str):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_local_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=30, num_attention_heads=3,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device).eval()
    model.generation_config = GenerationConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return model, tok


def cases(model, tok) -> dict:
    prompts = [tok.encode(p) for p in PROMPTS]
    device = next(model.parameters()).device

    def hf():
        ids, mask = left_pad(prompts, tok.pad_token_id, device)
        model.generate(input_ids=ids.repeat_interleave(SAMPLES, 0), attention_mask=mask.repeat_interleave(SAMPLES, 0),
                       do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=NEW_TOKENS)

    def ours(K, M, **kw):
        sampling = SamplingParams(temperature=1.0, **kw)
        thought, answer = (NEW_TOKENS, 0) if M == 1 else (THOUGHT, NEW_TOKENS - THOUGHT)
        return lambda: sample_trees(model, tok, prompts, K, M, thought, answer, sampling, ["</think>", "\n\n"])

    return {"hf-generate": hf, "ours 16x1": ours(16, 1), "ours 4x4": ours(4, 4),
            "ours 16x1 graphs": ours(16, 1, graphs=True), "ours 4x4 graphs": ours(4, 4, graphs=True)}


class ForwardShare:
    """Inside ``with OpCount()``: how many model forwards ran and how many of the compute ops ran
    inside them (the rest is the decode loop's own work: sampling, stopping, bookkeeping; with
    graphs on a GPU the decode steps' forwards are replays and only that rest is launched)."""

    def __init__(self, model, count: OpCount):
        self.model, self.count, self.forwards, self.inside, self._at = model, count, 0, 0, None

    def __enter__(self):
        def pre(*_):
            self.forwards += 1
            self._at = self.count.compute

        def post(*_):
            self.inside += self.count.compute - self._at

        self._hooks = [self.model.register_forward_pre_hook(pre), self.model.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


def measure(fn, model, device: torch.device, repeats: int) -> dict:
    """Median time of ``repeats`` runs after a warm-up, then one counted run: its ops
    (:class:`OpCount`, :class:`ForwardShare`) and its decode steps replayed from graphs or run
    eagerly (all graph capture failures so far)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():  # (the same draws each run: the same batch shapes, so any graph is captured in the warm-up)
        torch.manual_seed(0)
        fn()

    with torch.no_grad():
        run()  # warm-up (and, with graphs, the capture)
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t)
        before = dataclasses.replace(graphs.STATS, failures=list(graphs.STATS.failures))
        with OpCount() as count, ForwardShare(model, count) as share:
            run()
    passes = {"graph_replays": graphs.STATS.replays - before.replays, "graph_eager_steps": graphs.STATS.eager_steps - before.eager_steps,
              "graph_failures": graphs.STATS.failures}
    return {**passes, "median_ms": round(statistics.median(times) * 1000, 1), "ms": [round(t * 1000, 1) for t in times],
            "ops": count.ops, "compute_ops": count.compute, "host_syncs": count.syncs, "forwards": share.forwards,
            "compute_ops_in_forwards": share.inside, "compute_ops_outside_forwards": count.compute - share.inside}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: each op costs about its dispatch)")
    p.add_argument("--only", default="", help="comma list of case names (default: all)")
    p.add_argument("--out", help="JSON path")
    p.add_argument("--no-record", action="store_true", help="write no record under benchmarks/records/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = build(args.device)
    device = next(model.parameters()).device
    todo = cases(model, tok)
    names = [n for n in args.only.split(",") if n] or list(todo)
    rows = {}
    print(f"{'case':20s} {'median ms':>10s} {'compute ops':>12s} {'syncs':>6s} {'forwards':>9s} {'in forwards':>12s} {'outside':>8s}")
    for name in names:
        rows[name] = r = measure(todo[name], model, device, args.repeats)
        print(f"{name:20s} {r['median_ms']:10.1f} {r['compute_ops']:12d} {r['host_syncs']:6d} {r['forwards']:9d} "
              f"{r['compute_ops_in_forwards']:12d} {r['compute_ops_outside_forwards']:8d}", flush=True)
    report = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "layers": model.config.num_hidden_layers,
              "prompts": len(PROMPTS), "samples": SAMPLES, "new_tokens": NEW_TOKENS, "cases": rows}
    write_report(report, args.out)
    if not args.no_record:
        name = "launch-proxy" + ("-" + args.only.replace(",", "+") if args.only else "")  # (a subset of the cases: its own record)
        record = write_record(name, report, command=script_command(__file__, argv))
        print(f"wrote {record}")
    return 0


def write_report(report: dict, out: str | None) -> None:
    """``report`` as JSON at ``out`` (nothing without one)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
