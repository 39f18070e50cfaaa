"""The documented data examples (docs/data.md) through the real console script on tiny-qwen2-vl:
a local parquet of image + question + answer without a test split (a seeded held-out part,
logged), and an imagefolder with metadata.jsonl whose columns are mapped."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def _cli() -> list[str]:
    exe = shutil.which("vlm-treegrpo", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "vlm_treegrpo.cli"]


def _picture(n: int) -> Image.Image:
    """``n`` red dots on white: the question is how many."""
    img = Image.new("RGB", (48, 48), "white")
    draw = ImageDraw.Draw(img)
    for i in range(n):
        draw.ellipse([4 + 10 * i, 20, 10 + 10 * i, 26], fill="red")
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _train(tmp_path: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = _cli() + ["train", "--config", str(ROOT / "configs/tiny-qwen2-vl.yaml"), f"log.run_dir={tmp_path}", f"log.name={name}",
                    "log.progress=false", "optim.steps=1", "data.n_test=2", "eval.after=false", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_parquet_without_a_test_split_holds_out_logged_records(tmp_path):
    rows = [{"image": {"bytes": _png(_picture(n % 4 + 1)), "path": None}, "question": "How many red dots are there?",
             "answer": str(n % 4 + 1)} for n in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dots.parquet")
    proc = _train(tmp_path, "parquet", f"data.source={tmp_path / 'dots.parquet'}", "data.test_fraction=0.2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = tmp_path / "parquet"
    held = json.loads((run / "held_out.json").read_text())["records"]
    assert len(held) == 2
    assert f"so 2 of its 10 records (data.test_fraction=0.2, data.seed=0) are held out and never trained on: records {held[0]}, {held[1]}" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_held_out"] == 2 and summary["eval_before"]["n"] == 2 and summary["steps"] == 1


def test_imagefolder_with_metadata_and_mapped_columns(tmp_path):
    folder = tmp_path / "dots"
    folder.mkdir()
    meta = []
    for n in range(6):
        _picture(n % 3 + 1).save(folder / f"{n}.png")
        meta.append({"file_name": f"{n}.png", "prompt": "Count the red dots.", "label": n % 3 + 1})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    proc = _train(tmp_path, "folder", f"data.source={folder}", "data.columns.question=prompt", "data.columns.answer=label",
                  "eval.before=false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "folder" / "summary.json").read_text())
    assert summary["steps"] == 1 and summary["data_held_out"] == 1
    row = json.loads((tmp_path / "folder" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["grad_norm"] > 0
