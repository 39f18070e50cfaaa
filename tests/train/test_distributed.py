"""Data parallelism (gloo on the CPU): two processes that each update on half of a step's trees
make exactly the update one process makes on all of them; and two ``torchrun`` processes train
through the real CLI, in sync, with one set of logs."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from vlm_treegrpo.config import ConfigError, config_from_dict
from vlm_treegrpo.train.distributed import Dist, _buckets, from_env, pool_metrics
from vlm_treegrpo.analysis.plots import timeless
from vlm_treegrpo.train.loop import _check_shares

ROOT = Path(__file__).resolve().parents[2]
P = 4  # prompts in the step


def varied_reward(completion: str, example) -> float:
    return (len(completion) % 7) / 6.0


def sigterm_on_rank1_reward(completion: str, example) -> float:
    """:func:`varied_reward`; process 1 sends itself SIGTERM on its 9th call (its 8 leaves a step: in step 2)."""
    if os.environ.get("RANK") == "1":
        CALLS[0] += 1
        if CALLS[0] == 9:
            os.kill(os.getpid(), signal.SIGTERM)
    return varied_reward(completion, example)


CALLS = [0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(agg: str, *overrides: str):
    """A tiny-llama policy in float64, its optimizer, and one rollout of P prompts (seeded, so
    every process builds the same); ``overrides`` come after this module's own."""
    from vlm_treegrpo.data.arithmetic import make_arithmetic
    from vlm_treegrpo.train.optim import adamw, warmup_constant
    from vlm_treegrpo.policy.factory import make_policy
    from vlm_treegrpo.rewards.functions import RewardSet
    from vlm_treegrpo.train.step import rollout_step

    cfg = config_from_dict({"model": {"name": "tiny-llama"}, "rollout": {"K": 2, "M": 2, "thought_max_tokens": 6, "answer_max_tokens": 6,
                                                                          "prompts_per_step": P}},
                           ["algo.rewards=[test_distributed:varied_reward]", f"algo.agg={agg}", "optim.micro_batch=1", "optim.lr=1e-2",
                            *overrides])
    torch.manual_seed(0)
    policy = make_policy("tiny-llama", torch.device("cpu"), "float32")
    policy.model.double()
    examples = make_arithmetic(P, seed=0)
    prompts = [policy.encode(ex, "") for ex in examples]
    data = rollout_step(policy, examples, prompts, RewardSet.from_config(cfg.algo.rewards), cfg)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = adamw(params, cfg.optim.lr, cfg.optim.betas, 0.0)
    return policy, cfg, data, optimizer, warmup_constant(optimizer, 0)


def _shard(data, rank: int, world: int, trim: bool):
    """Process ``rank``'s trees; with ``trim`` its batch also loses the columns no row of it
    uses, as a process that packed only its own trees would have it narrower."""
    n = data.packed.input_ids.shape[0] // world
    packed = data.packed.rows(slice(rank * n, (rank + 1) * n))
    if trim:
        w = int(packed.target_mask.nonzero()[:, 1].max()) + 1
        cut = {k: getattr(packed, k)[:, :w] for k in ("input_ids", "position_ids", "pred_pos", "target_mask", "advantages", "is_thought")}
        mask = packed.attention_mask
        packed = dataclasses.replace(packed, **cut, attention_mask=None if mask is None else mask[:, :w, :w])
    return dataclasses.replace(data, packed=packed)


def _rank_update(rank: int, world: int, port: int, out: str, agg: str, trim: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from vlm_treegrpo.train.step import update_step

    dist, device = from_env(torch.device("cpu"))
    try:
        policy, cfg, data, optimizer, scheduler = _step(agg)
        stats = update_step(policy, None, optimizer, scheduler, _shard(data, rank, world, trim), cfg, device, dist)
        params = {k: v.clone() for k, v in policy.model.state_dict().items()}
        synced = dist.in_sync(policy.model)
        with torch.no_grad():
            next(policy.model.parameters())[0, 0] += rank * 1e-9  # one process drifts
        drifted = dist.in_sync(policy.model)
        torch.save({"params": params, "stats": stats, "in_sync": (synced, drifted)}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.close()


@pytest.mark.parametrize("agg,trim", [("token_mean", False), ("constant", True)])
def test_two_processes_make_the_one_process_update(tmp_path, agg, trim):
    from vlm_treegrpo.train.step import update_step

    policy, cfg, data, optimizer, scheduler = _step(agg)
    assert (data.thought_adv != 0).any()
    want = update_step(policy, None, optimizer, scheduler, data, cfg, torch.device("cpu"))
    ref = policy.model.state_dict()
    mp.spawn(_rank_update, args=(2, _free_port(), str(tmp_path), agg, trim), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key, value in ref.items():
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), key  # the replicas agree exactly
        torch.testing.assert_close(ranks[0]["params"][key], value, rtol=0, atol=1e-12)  # ... on the one-process update
    assert all(r["in_sync"] == (True, False) for r in ranks)  # the checksum sees a drift of 1e-9 in one entry
    got = ranks[0]["stats"]
    assert got["trees_updated"] == want["trees_updated"] == P
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-12) and got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-10)


def _torchrun_train(tmp_path, *overrides: str, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "vlm_treegrpo.cli", "train", "--config", str(ROOT / "configs/tiny-llama.yaml"), f"log.run_dir={tmp_path}",
           "log.progress=false", "model.threads=1", "data.n_test=5", "rollout.prompts_per_step=4", "sft.steps=1", "sft.batch_size=4",
           "algo.rewards=[test_distributed:varied_reward]", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "train"), str(ROOT / "tests"),
                                                                         os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert (proc.returncode == 0) == ok, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [timeless(r) for r in rows]


def test_torchrun_trains_two_processes_through_the_cli_and_resumes_exactly(tmp_path):
    proc = _torchrun_train(tmp_path, "log.save_model=true", "log.checkpoint_every=1", "eval.samples=2")
    assert proc.stdout.count('"replicas_in_sync": true') == 1  # process 0 prints the summary
    run = tmp_path / "tiny-llama"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["replicas_in_sync"] is True and summary["steps"] == 2
    assert summary["eval_before"]["n"] == summary["eval_after"]["n"] == 5  # the test set split 3 + 2, counts summed
    assert 0.0 <= summary["eval_after"]["pass@1"] <= summary["eval_after"]["pass@2"] <= 1.0  # (pass@k summed the same way)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # one process writes
    assert rows[0]["unpacked_tokens"] > 0 and (run / "model" / "config.json").exists()
    assert len((run / "sft.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in (run / "checkpoint").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]  # each process's generators

    resumed = json.loads(_torchrun_train(tmp_path, "log.resume=must", "optim.steps=3").stdout)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 3 and resumed["replicas_in_sync"] is True
    _torchrun_train(tmp_path, "optim.steps=3", "log.name=straight")
    assert _steps(run) == _steps(tmp_path / "straight")  # the resumed step 3 is the never-stopped run's


def test_two_processes_refill_their_own_prompts_from_one_training_order_and_resume_exactly(tmp_path):
    args = ("sft.steps=0", "eval.before=false", "rollout.refill_rounds=2", "algo.rewards=[test_refill:even_is_flat]")
    _torchrun_train(tmp_path, *args, "log.checkpoint_every=1")
    run = tmp_path / "tiny-llama"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["replicas_in_sync"] is True and summary["steps"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["refilled_prompts"] for r in rows) > 0
    resumed = json.loads(_torchrun_train(tmp_path, *args, "log.resume=must", "optim.steps=3").stdout)
    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == 3
    _torchrun_train(tmp_path, *args, "optim.steps=3", "log.name=straight")
    assert _steps(run) == _steps(tmp_path / "straight")  # the samplers stayed the same on both processes


def test_a_signal_to_one_process_stops_every_process_after_the_step_with_a_checkpoint(tmp_path):
    proc = _torchrun_train(tmp_path, "optim.steps=50", "eval.before=false", "sft.steps=0", "log.checkpoint_every=0",
                           "algo.rewards=[test_distributed:sigterm_on_rank1_reward]", "algo.reward_workers=0", ok=False)
    assert proc.stdout.count('"stopped_by": "SIGTERM"') == 1  # process 0 stopped too, and says why
    assert "exitcode  : 143" in proc.stderr  # (torchrun's report of the processes' exit status)
    run = tmp_path / "tiny-llama"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2 and summary["replicas_in_sync"] is True
    assert "eval_after" not in summary and not (run / "model").exists()
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["processes"] == 2 and (run / "checkpoint" / "rng-1.pt").exists()


def test_pool_metrics_sums_counts_takes_the_slowest_time_and_averages_the_rest():
    got = pool_metrics([{"reward": 0.2, "packed_tokens": 10, "time_generate": 1.0, "reward_failures/f": 1, "reward_errors": ["a"]},
                        {"reward": 0.4, "packed_tokens": 30, "time_generate": 3.0}])
    assert got.pop("reward_errors") == ["a"]  # (not a number: process 0's)
    assert got == pytest.approx({"reward": 0.3, "packed_tokens": 40, "time_generate": 3.0, "reward_failures/f": 1})


def test_one_process_is_a_no_op_and_shares_must_split_evenly():
    d = Dist()
    assert d.main and not d.active and d.shard([1, 2, 3]) == [1, 2, 3] and d.sum([2, 3]) == [2.0, 3.0] and d.gather("x") == ["x"]
    assert Dist(rank=1, world=2).shard([0, 1, 2, 3]) == [2, 3]
    assert d.seed(5) == 5 and len({Dist(rank=r, world=3).seed(5) for r in range(3)}) == 3  # process 0 keeps the one-process seed
    cfg = config_from_dict({"rollout": {"prompts_per_step": 3}})
    with pytest.raises(ConfigError, match="rollout.prompts_per_step"):
        _check_shares(cfg, 2)
    _check_shares(cfg, 3)


def test_gradient_buckets_keep_order_and_split_by_size_and_dtype(monkeypatch):
    import vlm_treegrpo.train.distributed as D

    monkeypatch.setattr(D, "BUCKET_ELEMENTS", 10)
    grads = [torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(20), torch.zeros(2, dtype=torch.float64), torch.zeros(1)]
    sizes = [[g.numel() for g in b] for b in _buckets(grads)]
    assert sizes == [[4, 4], [4], [20], [2], [1]]
