"""The stack sampler (bench --sample-stacks): it names where the watched thread was, per take."""
import threading
import time

import pytest

from vlm_treegrpo.bench.stacks import StackSampler, signature


def _nap(seconds: float) -> None:
    time.sleep(seconds)  # the line the samples must name


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_each_take_names_where_the_thread_was_since_the_last():
    with StackSampler(0.005) as sampler:
        _nap(0.3)
        first = sampler.take()
        _spin(0.3)
        second = sampler.take()
    place, share = first["top"][0]
    assert place.startswith("test_stacks.py:11:_nap < test_stacks.py:")  # innermost first: the sleep, then its caller
    assert share > 0.9 and first["samples"] >= 20
    assert sum(share for place, share in second["top"] if place.startswith("test_stacks.py:1") and ":_spin <" in place) > 0.9
    assert all("_nap" not in p for p, _ in second["top"])  # the first take's samples are not counted again
    assert 0 < first["coverage"] <= 1


def test_an_anchor_frame_is_named_when_the_innermost_are_outside_it(monkeypatch):
    import sys

    from vlm_treegrpo.bench import stacks

    outside: dict = {}
    exec(compile("import sys\ndef inner(f):\n    return f(sys._getframe())\n", "/elsewhere/lib/mod.py", "exec"), outside)
    line = sys._getframe().f_lineno + 2
    monkeypatch.setattr(stacks, "ANCHORS", ("tests",))  # this file's folder
    got = outside["inner"](lambda frame: signature(frame, inner=1))
    assert got == f"mod.py:3:inner < ... < test_stacks.py:{line}:test_an_anchor_frame_is_named_when_the_innermost_are_outside_it"
    assert signature(sys._getframe(), inner=1).count(" < ") == 0  # the innermost frame is in an anchor: nothing added
    monkeypatch.setattr(stacks, "ANCHORS", ("no_such_package",))
    assert outside["inner"](lambda frame: signature(frame, inner=2)).count(" < ") == 1  # no anchor anywhere: the inner two only


def test_it_watches_the_thread_it_is_given_and_stops_with_its_context():
    done = threading.Event()
    worker = threading.Thread(target=lambda: done.wait(5))
    worker.start()
    try:
        with StackSampler(0.005, thread=worker) as sampler:
            time.sleep(0.2)
            got = sampler.take()
        assert "threading.py" in got["top"][0][0]  # the worker waits in Event.wait, not this test's sleep
        assert all("test_it_watches" not in p for p, _ in got["top"])
    finally:
        done.set()
        worker.join()
    assert sampler._thread is None
    before = len(threading.enumerate())
    time.sleep(0.05)
    assert len(threading.enumerate()) == before


def test_a_nonpositive_interval_is_refused():
    with pytest.raises(ValueError, match="interval"):
        StackSampler(0)


def test_the_bench_probe_puts_a_slow_steps_places_in_the_table():
    from vlm_treegrpo.bench.probes import StepProbe, summarize
    from vlm_treegrpo.bench.report import format_table

    rows = []
    with StepProbe("cpu", stacks_ms=5) as probe:
        for seconds in (0.05, 0.05, 0.05, 0.4):
            probe.start()
            _nap(seconds)
            rows.append({"seconds": seconds, "rollout_seconds": seconds, "completions": 1, "generated_tokens": 1,
                         "completion_tokens": 1, "reward": 0.0, "zero_std_frac": 0.0, **probe.stop()})
    out = summarize(rows, 0)
    assert [x["index"] for x in out["slow_steps"]] == [3]
    stacks = out["slow_steps"][0]["stacks"]
    assert stacks["top"][0][0].startswith("test_stacks.py:11:_nap") and stacks["samples"] >= 40
    table = format_table({"runs": [{"mode": "flat", "ours_shape": "4x1", "G": 4, "ours": {**out, "peak_rss_mib": 1.0}}]})
    assert "flat  ours     stacks step 3 (0.40 s, " in table and "_nap" in table


def test_pooled_rounds_keep_each_slow_steps_places():
    from vlm_treegrpo.bench.probes import measure, pool_rounds

    def row(seconds: float, place: str) -> dict:
        return {"seconds": seconds, "rollout_seconds": seconds, "completions": 1, "generated_tokens": 1, "completion_tokens": 1,
                "reward": 0.0, "zero_std_frac": 0.0, "stacks": {"samples": 9, "coverage": 1.0, "top": [[place, 1.0]]}}

    a = measure([row(1.0, "warm"), row(0.1, "a"), row(0.1, "b"), row(0.9, "slow in round 1")], 1)
    b = measure([row(1.0, "warm"), row(0.1, "c"), row(0.1, "d"), row(0.1, "e")], 1)
    assert a["steps"][3]["stacks"]["top"] == [["slow in round 1", 1.0]]  # (every step's row keeps its places)
    pooled = pool_rounds([a, b])
    assert [(x["index"], x["stacks"]["top"][0][0]) for x in pooled["slow_steps"]] == [(2, "slow in round 1")]
