"""The bench's report as text: the comparison's rows (ours, TRL, ours/TRL), its slow steps and
where their time went, or the scaling table."""
from __future__ import annotations

import statistics


def signal_share(result: dict) -> float:
    """Share of measured prompts whose G rewards are not all equal (the ones with a gradient)."""
    zero = result["zero_std_frac"][result["warmup"]:] or result["zero_std_frac"]
    return 1 - statistics.mean(zero)


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _slow_line(r: dict) -> str:
    """One line on a run's steps over twice the median: how many, their share of the time, and
    what the probe saw in them (summed)."""
    slow = r["slow_steps"]
    n = len(r["step_seconds"]) - r["warmup"]
    spent = sum(x["seconds"] for x in slow)
    parts = [f"{len(slow)} of {n} steps over 2x the median (max {max(x['seconds'] for x in slow):.2f} s), "
             f"{spent:.2f} s of {r['mean_seconds_per_step'] * n:.2f} s"]
    for key, unit in (("cpu_seconds", " s CPU"), ("gc_seconds", " s GC"), ("cuda_mallocs", " cudaMalloc"), ("alloc_retries", " alloc retries")):
        if all(key in x for x in slow):
            total = sum(x[key] for x in slow)
            parts.append(f"{total:.2f}{unit}" if isinstance(total, float) else f"{total}{unit}")
    return "; ".join(parts)


def _stack_lines(r: dict, top: int = 3) -> list[str]:
    """Where each slow step's time went, where its stack was sampled: its ``top`` places."""
    return [f"step {x['index']} ({x['seconds']:.2f} s, {x['stacks']['samples']} samples): "
            + "; ".join(f"{share:.0%} {place}" for place, share in x["stacks"]["top"][:top])
            for x in r["slow_steps"] if x.get("stacks", {}).get("top")]


def format_table(report: dict) -> str:
    """The comparison (or scaling) rows as an aligned text table."""
    lines = []
    if "runs" in report:
        head = (f"{'mode':<5} {'trainer':<8} {'shape':<6} {'s/step':>8} {'rollout':>8} {'update':>8} {'compl/s':>8} "
                f"{'gen tok/s':>10} {'leaf tok/s':>10} {'RSS MiB':>8} {'GPU MiB':>8} {'signal':>6}")
        lines += [head, "-" * len(head)]
        for row in report["runs"]:
            for trainer in ("ours", "trl"):
                r = row.get(trainer)
                if r is None:
                    continue
                shape = row["ours_shape"] if trainer == "ours" else f"G={row['G']}"
                if "error" in r:
                    lines.append(f"{row['mode']:<5} {trainer:<8} {shape:<6} failed: {r['error'].splitlines()[0]}")
                    continue
                lines.append(f"{row['mode']:<5} {trainer:<8} {shape:<6} {_fmt(r['seconds_per_step']):>8} {_fmt(r.get('rollout_seconds')):>8} "
                             f"{_fmt(r.get('update_seconds')):>8} {_fmt(r['completions_per_s']):>8} {_fmt(r['generated_tokens_per_s'], '.1f'):>10} "
                             f"{_fmt(r['completion_tokens_per_s'], '.1f'):>10} {_fmt(r['peak_rss_mib'], '.0f'):>8} {_fmt(r.get('peak_cuda_mib'), '.0f'):>8} {_fmt(signal_share(r)):>6}")
            if "ratios" in row:
                q = row["ratios"]
                lines.append(f"{row['mode']:<5} {'ours/trl':<8} {'':<6} {_fmt(q['seconds_per_step']):>8} {_fmt(q['rollout_seconds']):>8} "
                             f"{_fmt(q['update_seconds']):>8} {_fmt(q['completions_per_s']):>8} {_fmt(q['generated_tokens_per_s']):>10} "
                             f"{_fmt(q['completion_tokens_per_s']):>10} {_fmt(q['peak_rss_mib']):>8} {_fmt(q.get('peak_cuda_mib')):>8}")
            for trainer in ("ours", "trl"):
                r = row.get(trainer)
                if r and r.get("slow_steps"):
                    lines.append(f"{row['mode']:<5} {trainer:<8} slow   {_slow_line(r)}")
                    lines += [f"{row['mode']:<5} {trainer:<8} stacks {line}" for line in _stack_lines(r)]
            if "round_ratios" in row:
                lines.append(f"{row['mode']:<5} {'rounds':<8} {'':<6} compl/s ours/trl per round: " + ", ".join(_fmt(x) for x in row["round_ratios"]))
    if "scaling" in report:
        head = (f"{'factor':<18} {'K':>3} {'M':>3} {'tokens':>6} {'images':>6} {'s/step':>8} {'rollout':>8} {'update':>8} "
                f"{'compl/s':>8} {'gen tok/s':>10} {'RSS MiB':>8} {'signal':>6}")
        lines += [head, "-" * len(head)]
        for r in report["scaling"]:
            lines.append(f"{r['factor']:<18} {r['K']:>3} {r['M']:>3} {r['max_new_tokens']:>6} {r['images_per_prompt']:>6} "
                         f"{_fmt(r['seconds_per_step']):>8} {_fmt(r['rollout_seconds']):>8} {_fmt(r['update_seconds']):>8} {_fmt(r['completions_per_s']):>8} "
                         f"{_fmt(r['generated_tokens_per_s'], '.1f'):>10} {_fmt(r['peak_rss_mib'], '.0f'):>8} {_fmt(r['signal']):>6}")
    if "runs" in report:
        lines.append("rollout/update: median seconds of sampling+scoring / of the optimizer update; gen tok/s: tokens sampled "
                     "(a tree samples each thought once); leaf tok/s: completion lengths summed over the G leaves; signal: "
                     "share of prompts whose G rewards differ (ours skips the update of the others, TRL computes it)")
    return "\n".join(lines)
