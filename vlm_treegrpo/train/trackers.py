"""Experiment trackers (``log.report_to``): the run's config, its per-step metrics (the rows of
metrics.jsonl) and a table of sample completions (the rows of samples.jsonl), sent to
TensorBoard, Weights & Biases, Trackio or MLflow besides the JSONL files.

One small adapter per tracker behind :class:`Tracker`; each imports its package when the run
opens it, since each is an optional extra (``pip install 'vlm-treegrpo[wandb]'``); a missing
package is a :class:`~vlm_treegrpo.config.ConfigError` naming the extra to install.
"""
from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from vlm_treegrpo.config import ConfigError

SAMPLE_COLUMNS = ["step", "prompt", "answer", "rewards", "completion"]
"""Columns of the sample table: one row per completion of a logged tree."""


class Tracker(Protocol):
    """What the training loop sends to a tracker; a tracker is opened with ``(run directory, run
    name, project, config)``, the config being the whole run's (nested sections)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """One step's numeric metrics (flat names such as ``reward/correctness``)."""

    def log_samples(self, rows: list[list], step: int) -> None:
        """Sample completions, rows of :data:`SAMPLE_COLUMNS`."""

    def close(self) -> None:
        """Flush and finish the run."""


def _require_package(module: str, extra: str) -> Any:
    """Import ``module``, or say which extra installs what it needs."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"log.report_to: {extra} is not installed: pip install 'vlm-treegrpo[{extra}]' ({err})") from err


def numeric_metrics(row: dict) -> dict[str, float]:
    """The numbers of a metrics row (bools and strings, lists and None left out; nested dicts
    flattened with ``/``)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in numeric_metrics(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, str]:
    """``{"algo.loss": "grpo", ...}``: a nested config as dotted names and string values."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


def _markdown_table(rows: list[list]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", "<br>")

    head = "| " + " | ".join(SAMPLE_COLUMNS) + " |\n|" + " --- |" * len(SAMPLE_COLUMNS)
    return head + "".join("\n| " + " | ".join(cell(x) for x in r) + " |" for r in rows)


class TensorBoardTracker:
    """Event files in ``<run>/tensorboard`` (``tensorboard --logdir runs``): metrics as scalars,
    the config and the samples as text (a markdown table)."""

    def __init__(self, run: Path, name: str, project: str, config: dict):
        writer_mod = _require_package("torch.utils.tensorboard", "tensorboard")  # (imports tensorboard)
        self.dir = run / "tensorboard"
        self.writer = writer_mod.SummaryWriter(log_dir=str(self.dir))
        text = "\n".join(f"    {k}: {v}" for k, v in flat_config(config).items())  # (indented: a markdown code block)
        self.writer.add_text("config", text, 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_samples(self, rows: list[list], step: int) -> None:
        self.writer.add_text("samples", _markdown_table(rows), step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (project ``log.project``, name the run's), files under ``<run>``."""

    def __init__(self, run: Path, name: str, project: str, config: dict):
        self.wandb = _require_package("wandb", "wandb")
        self.run = self.wandb.init(project=project, name=name, dir=str(run), config=config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, rows: list[list], step: int) -> None:
        self.run.log({"samples": self.wandb.Table(columns=SAMPLE_COLUMNS, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A Trackio run (Hugging Face's local-first tracker, wandb's API): project ``log.project``."""

    def __init__(self, run: Path, name: str, project: str, config: dict):
        self.trackio = _require_package("trackio", "trackio")
        self.trackio.init(project=project, name=name, config=config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def log_samples(self, rows: list[list], step: int) -> None:
        self.trackio.log({"samples": self.trackio.Table(columns=SAMPLE_COLUMNS, data=rows)}, step=step)

    def close(self) -> None:
        self.trackio.finish()


class MLflowTracker:
    """An MLflow run in experiment ``log.project``: the config as params (dotted names), metrics
    per step, the samples as a table artifact ``samples/step_<n>.json``."""

    def __init__(self, run: Path, name: str, project: str, config: dict):
        self.mlflow = _require_package("mlflow", "mlflow")
        self.mlflow.set_experiment(project)
        self.mlflow.start_run(run_name=name)
        self.mlflow.log_params(flat_config(config))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()}, step=step)

    def log_samples(self, rows: list[list], step: int) -> None:
        table = {col: [json.dumps(r[i]) if not isinstance(r[i], str) else r[i] for r in rows] for i, col in enumerate(SAMPLE_COLUMNS)}
        self.mlflow.log_table(data=table, artifact_file=f"samples/step_{step}.json")

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS: dict[str, Callable[[Path, str, str, dict], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "trackio": TrackioTracker,
    "mlflow": MLflowTracker,
}
"""``log.report_to`` name -> tracker class."""


def sample_rows(step: int, prompt: str, answer: str, rewards: list[float], completions: list[str]) -> list[list]:
    """One table row per completion of a logged tree."""
    return [[step, prompt, answer, r, c] for r, c in zip(rewards, completions)]


class Trackers:
    """The trackers of ``log.report_to`` as one: each call goes to every one."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    @classmethod
    def open(cls, names: list[str], run: Path, name: str, project: str, config: dict) -> "Trackers":
        """Open the named trackers, each sent ``config``."""
        opened: list[Tracker] = []
        try:
            for n in names:
                opened.append(TRACKERS[n](run, name, project, config))
        except BaseException:
            for t in opened:
                t.close()
            raise
        return cls(opened)

    def log_metrics(self, row: dict, step: int) -> None:
        metrics = numeric_metrics({k: v for k, v in row.items() if k != "step"})
        for t in self.trackers:
            t.log_metrics(metrics, step)

    def log_samples(self, rows: list[list], step: int) -> None:
        for t in self.trackers:
            t.log_samples(rows, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
