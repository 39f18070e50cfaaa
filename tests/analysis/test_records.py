"""Measured records: provenance in every record, a new measurement replacing the old one of the
same workload and device, the generated index, and the directory tests write to."""
from __future__ import annotations

import json

from vlm_treegrpo.analysis import records
from vlm_treegrpo.analysis.records import RECORDS_DIR, device_label, resolve_records_dir, script_command, write_record

CPU = {"python": "3.11", "cpu_count": 2}
GPU = {**CPU, "gpu": "NVIDIA H200", "cuda": True}


def test_a_record_holds_commit_dirty_flag_command_machine_and_figures(records_dir):
    path = write_record("Bench Text", {"seconds_per_step": 1.5}, command=["vlm-treegrpo", "bench", "--quick"], machine=CPU)
    assert path.parent == records_dir  # (the test's directory: $VLM_TREEGRPO_RECORDS_DIR)
    r = json.loads(path.read_text())
    assert r["workload"] == "bench-text" and r["device"] == "cpu" and r["command"] == "vlm-treegrpo bench --quick"
    assert r["machine"] == CPU and r["figures"] == {"seconds_per_step": 1.5}
    assert len(r["commit"]) == 40 and isinstance(r["dirty"], bool)
    assert path.name == f"{r['date']}_cpu_bench-text_{r['commit'][:8]}.json"


def test_a_new_measurement_replaces_the_old_of_its_workload_and_device_only(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "git_state", lambda: {"commit": "a" * 40, "dirty": False})
    old = write_record("w", {"x": 1}, command="old", machine=CPU, records_dir=tmp_path)
    other_device = write_record("w", {"x": 2}, command="gpu", machine=GPU, records_dir=tmp_path)
    other_workload = write_record("v", {"x": 3}, command="v", machine=CPU, records_dir=tmp_path)
    monkeypatch.setattr(records, "git_state", lambda: {"commit": "b" * 40, "dirty": True})
    new = write_record("w", {"x": 4}, command="new", machine=CPU, records_dir=tmp_path)
    assert not old.exists() and new.exists() and other_device.exists() and other_workload.exists()
    assert "_h200_w_aaaaaaaa" in other_device.name and new.name.endswith("_cpu_w_bbbbbbbb.json")
    index = (tmp_path / "INDEX.md").read_text().splitlines()
    rows = [line for line in index if line.startswith("| [")]
    assert len(rows) == 3 and not any(old.name in line for line in index)
    assert f"| [{new.name}]({new.name}) | w | cpu |" in "\n".join(rows) and "| bbbbbbbb | True | `new` |" in "\n".join(rows)


def test_the_directory_is_given_else_the_environment_else_the_repository(tmp_path, monkeypatch):
    assert resolve_records_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(records.RECORDS_ENV, str(tmp_path / "env"))
    assert resolve_records_dir() == tmp_path / "env"
    monkeypatch.delenv(records.RECORDS_ENV)
    assert resolve_records_dir() == RECORDS_DIR and RECORDS_DIR.parts[-2:] == ("benchmarks", "records")


def test_device_labels_and_script_commands():
    assert device_label(CPU) == "cpu" and device_label(GPU) == "h200" and device_label({"gpu": "NVIDIA A100-SXM4-80GB"}) == "a100"
    assert script_command("/x/scripts/variance_study.py", ["--quick"]) == ["python", "scripts/variance_study.py", "--quick"]
