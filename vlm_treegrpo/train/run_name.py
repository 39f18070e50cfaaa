"""A run's directory name: ``log.name``, or a new timestamped one, so that runs never write over
one another unless they are given the same name."""
from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from vlm_treegrpo.config import TrainConfig
from vlm_treegrpo.train.distributed import Dist


def timestamped_name(run_dir: Path, now: datetime) -> str:
    """``run-YYYYmmdd-HHMMSS``, with ``-2``, ``-3`` ... appended while ``run_dir`` already has it."""
    base = now.strftime("run-%Y%m%d-%H%M%S")
    name, n = base, 2
    while (run_dir / name).exists():
        name, n = f"{base}-{n}", n + 1
    return name


def with_run_name(cfg: TrainConfig, dist: Dist = Dist()) -> TrainConfig:
    """``cfg`` as it is when ``log.name`` is set, else with process 0's new timestamped name (every
    process of a data-parallel run takes the same)."""
    if cfg.log.name:
        return cfg
    mine = timestamped_name(Path(cfg.log.run_dir), datetime.now()) if dist.main else ""
    name = dist.gather(mine)[0]
    return dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, name=name))
