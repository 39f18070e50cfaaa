"""The checkpoint directory protocol: killed at any point of a write (in-process through the
fault seam, and by a real SIGKILL in a child process), a run always finds a whole checkpoint
with exactly what was written for its step; what is not whole is skipped with a warning; keep N;
a full disk says so and keeps the previous checkpoint."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_treegrpo.train import checkpoint, checkpoint_dir
from vlm_treegrpo.train.checkpoint_dir import POINTS, CheckpointWarning, DiskFull

AFTER_COMMIT = POINTS.index("fsync_dir")
"""From this point on a killed write has committed its checkpoint (``meta.json`` renamed in)."""


class Killed(BaseException):
    """A simulated kill: not an ``Exception``, so no clean-up of the writer runs (as under SIGKILL)."""


def payload_of(step: int):
    """Two files whose contents name the step (one in a sub-directory, as a sharded writer's)."""

    def write(into: Path) -> None:
        (into / "model.pt").write_bytes(bytes([step]) * (1000 + step))
        (into / "shards").mkdir()
        (into / "shards" / "0.bin").write_text(f"step {step}")

    return write


def contents(path: Path) -> tuple[int, int, str]:
    """(step in meta, step in model.pt, text of the shard): all equal for a whole checkpoint."""
    meta = json.loads((path / "meta.json").read_text())
    model = (path / "model.pt").read_bytes()
    assert len(model) == 1000 + model[0]
    return meta["step"], model[0], (path / "shards" / "0.bin").read_text()


def kill_at(point: str):
    def fault(at: str) -> None:
        if at == point:
            raise Killed(point)

    return fault


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name != "checkpoint" and not checkpoint_dir.KEPT.match(p.name))


@pytest.mark.parametrize("point", POINTS)
def test_a_write_killed_at_any_point_leaves_a_whole_checkpoint_and_the_next_write_cleans_up(tmp_path, point):
    checkpoint_dir.write(tmp_path, 1, payload_of(1), {"run_id": "r"})
    with pytest.raises(Killed):
        checkpoint_dir.write(tmp_path, 2, payload_of(2), {"run_id": "r"}, fault=kill_at(point))
    found = checkpoint_dir.find(tmp_path)
    expected = 2 if POINTS.index(point) >= AFTER_COMMIT else 1
    assert contents(found) == (expected, expected, f"step {expected}")
    # the resumed run writes its next checkpoint: one whole checkpoint and nothing else is left
    checkpoint_dir.write(tmp_path, expected + 1, payload_of(expected + 1), {"run_id": "r"})
    assert contents(tmp_path / "checkpoint") == (expected + 1, expected + 1, f"step {expected + 1}")
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


KILLER = """
import sys
from pathlib import Path
from vlm_treegrpo.train import checkpoint_dir

def payload_of(step):  # (payload_of above, without importing this test module's torch)
    def write(into):
        (into / "model.pt").write_bytes(bytes([step]) * (1000 + step))
        (into / "shards").mkdir()
        (into / "shards" / "0.bin").write_text(f"step {step}")
    return write

run = Path(sys.argv[1])
for step in (1, 2, 3):
    checkpoint_dir.write(run, step, payload_of(step), {}, keep=2)
"""


@pytest.mark.parametrize("point", POINTS)
def test_a_real_sigkill_at_any_point_of_the_second_write_leaves_a_whole_checkpoint(tmp_path, point):
    script = KILLER
    env = {**os.environ, checkpoint_dir.KILL_ENV: f"{point}:2"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    found = checkpoint_dir.find(tmp_path)
    expected = 2 if POINTS.index(point) >= AFTER_COMMIT else 1
    assert contents(found) == (expected, expected, f"step {expected}")


def test_keep_n_keeps_the_newest_and_prune_promotes_a_whole_leftover(tmp_path):
    for step in range(1, 6):
        checkpoint_dir.write(tmp_path, step, payload_of(step), {}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint-3", "checkpoint-4"]
    assert [contents(tmp_path / n)[0] for n in ("checkpoint", "checkpoint-4", "checkpoint-3")] == [5, 4, 3]
    # a whole checkpoint killed before its rename is kept as checkpoint-<step> by the next write
    with pytest.raises(Killed):
        checkpoint_dir.write(tmp_path, 6, payload_of(6), {}, keep=3, fault=kill_at("retire_current"))
    assert checkpoint_dir.find(tmp_path) == tmp_path / "checkpoint.tmp-6"
    checkpoint_dir.write(tmp_path, 7, payload_of(7), {}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "checkpoint-5", "checkpoint-6"]


def test_the_finder_skips_half_written_and_half_deleted_checkpoints_with_a_warning(tmp_path):
    """The two layouts of the older two-directory swap that left runs unable to resume."""
    checkpoint_dir.write(tmp_path, 4, payload_of(4), {})
    for meta in ("", '{"step": 6, "run'):  # killed while meta.json was written: empty, then half
        (tmp_path / "checkpoint.tmp").mkdir(exist_ok=True)
        (tmp_path / "checkpoint.tmp" / "meta.json").write_text(meta)
        with pytest.warns(CheckpointWarning, match=r"checkpoint\.tmp: not a whole checkpoint"):
            assert checkpoint.find(tmp_path) == tmp_path / "checkpoint"
    # a resumed run killed while deleting checkpoint.tmp (its model.pt first, meta.json last)
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp" / "meta.json").write_text(json.dumps({"step": 6}))
    with pytest.warns(CheckpointWarning):
        assert checkpoint.find(tmp_path) == tmp_path / "checkpoint.old"
    # a file cut short (its size differs from the one meta.json lists) makes a checkpoint not whole
    os.truncate(tmp_path / "checkpoint.old" / "model.pt", 10)
    with pytest.warns(CheckpointWarning):
        assert checkpoint.find(tmp_path) is None
    assert checkpoint.find(tmp_path / "absent") is None


def test_a_full_disk_is_named_and_the_previous_checkpoint_kept(tmp_path):
    checkpoint_dir.write(tmp_path, 1, payload_of(1), {})
    needed = json.loads((tmp_path / "checkpoint" / "meta.json").read_text())["bytes"]
    assert needed == 1001 + len("step 1")
    with pytest.raises(DiskFull, match=r"^\[Errno 28\] disk full: a checkpoint needs about .* the previous checkpoint is kept"):
        checkpoint_dir.write(tmp_path, 2, payload_of(2), {}, free=lambda p: needed)  # (less than needed with the margin)

    def no_space(into: Path) -> None:
        (into / "model.pt").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    def torch_like(into: Path) -> None:  # (torch.save reports a short write as a RuntimeError)
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 5184 vs 5076")

    with pytest.raises(DiskFull, match=r"disk full: writing the checkpoint of step 2 .*OSError"):
        checkpoint_dir.write(tmp_path, 2, no_space, {})
    frees = iter([1 << 40, 1000])  # (room before the write, none after it failed)
    with pytest.raises(DiskFull, match=r"unexpected pos 5184 vs 5076.*the previous checkpoint is kept"):
        checkpoint_dir.write(tmp_path, 2, torch_like, {}, free=lambda p: next(frees))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # (with room left it is not a full disk)
        checkpoint_dir.write(tmp_path, 2, torch_like, {}, free=lambda p: 1 << 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"] and contents(tmp_path / "checkpoint")[0] == 1
