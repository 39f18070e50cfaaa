"""Checks of a run's inputs before anything heavy loads: the model name, the data source, the
data against the model. Each failure is one :class:`~vlm_treegrpo.config.ConfigError` or
:class:`~vlm_treegrpo.data.loaders.DataError` naming the field, file or record, raised at once
(offline: the hub is asked once, with a short timeout, only for a name that is neither built in,
nor local, nor in the local hub cache).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import dataset_info, model_info, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from vlm_treegrpo.config import ConfigError, TrainConfig, config_from_dict
from vlm_treegrpo.data.loaders import LOCAL_SUFFIXES, DataError
from vlm_treegrpo.data.sources import SYNTHETIC, Task
from vlm_treegrpo.models.loader import BUILTINS
from vlm_treegrpo.models.shapes import is_random_name, load_shape
from vlm_treegrpo.train import checkpoint_dir
from vlm_treegrpo.vlm.registry import ALIGNED_NAME, TINY_NAMES, checkpoint_family, presets

HUB_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*$")
"""What a hub repository id looks like (``name`` or ``org/name``); anything else is taken for a path."""
HUB_TIMEOUT_S = 10.0
"""How long the one question to the hub may take."""


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_problem(repo_id: str, repo_type: str) -> str | None:
    """None when ``repo_id`` (a ``model`` or ``dataset``) is in the local hub cache or answers
    on the hub; else why not, in a few words."""
    probe = "config.json" if repo_type == "model" else "README.md"
    try:
        if isinstance(try_to_load_from_cache(repo_id, probe, repo_type=repo_type), str):
            return None
    except Exception:  # (an unreadable cache is a cache miss)
        pass
    cache = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache/huggingface/datasets"))
    if repo_type == "dataset" and any(cache.glob(f"{repo_id.replace('/', '___')}*")):
        return None
    if _offline():
        return "not in the local hub cache, and the hub is off (HF_HUB_OFFLINE)"
    try:
        (model_info if repo_type == "model" else dataset_info)(repo_id, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        return "not found on the hub (huggingface.co), nor in the local cache"
    except GatedRepoError:
        return None  # (it exists; loading says what access it needs)
    except Exception as err:  # (no network, a proxy, a timeout: every one means the hub could not answer)
        return f"not in the local hub cache, and the hub could not be reached ({type(err).__name__}: {' '.join(str(err).split())[:100]})"
    return None


def model_is_known(name: str) -> None:
    """``model.name`` names something loadable: a built-in, a checkpoint, a local model
    directory, or a hub id that is cached or on the hub. Else a ConfigError saying which."""
    if name in BUILTINS or name in TINY_NAMES or name == ALIGNED_NAME or name in presets():
        return
    if is_random_name(name):
        load_shape(name)  # (an unknown preset: a ConfigError listing the valid ones)
        return
    path = Path(os.path.expanduser(name))
    builtins = ", ".join([*BUILTINS, *TINY_NAMES])
    if path.is_dir():
        if (path / checkpoint_dir.META).is_file() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            return
        raise ConfigError(f"model.name: {name} is a directory but holds no model (no config.json) and no checkpoint (no meta.json)")
    if not HUB_ID.match(name) or path.exists():
        raise ConfigError(f"model.name: {name!r} is not a built-in ({builtins}; see `vlm-treegrpo presets`) and no such directory exists")
    problem = hub_problem(name, "model")
    if problem is not None:
        raise ConfigError(f"model.name: {name!r} is not a built-in ({builtins}; see `vlm-treegrpo presets`) "
                          f"nor a local directory; as a hub id it is {problem}")


def data_is_there(source: str, field: str) -> None:
    """``data.source`` / ``data.test_source`` names a synthetic task, an existing file, or a hub
    dataset that is cached or on the hub. Else a DataError naming the field."""
    if source in SYNTHETIC:
        return
    path = Path(os.path.expanduser(source))
    if path.exists():
        return
    if source.lower().endswith(LOCAL_SUFFIXES):
        raise DataError(f"{field}: file not found: {source}")
    if not HUB_ID.match(source.split(":", 1)[0]):
        raise DataError(f"{field}: {source!r} is not a synthetic task {list(SYNTHETIC)}, an existing file or a hub dataset id")
    problem = hub_problem(source.split(":", 1)[0], "dataset")
    if problem is not None:
        raise DataError(f"{field}: {source!r} is not a local file; as a hub dataset id it is {problem}")


def check_inputs(cfg: TrainConfig, model_name: str | None = None) -> None:
    """Everything that can be checked about a run before loading its model or data."""
    model_is_known(model_name or cfg.model.name)
    data_is_there(cfg.data.source, "data.source")
    if cfg.data.test_source:
        data_is_there(cfg.data.test_source, "data.test_source")


def sees_images(name: str) -> bool | None:
    """Whether the model ``name`` takes images (a VLM), False for a text model, None when that
    cannot be told without loading it."""
    if name in BUILTINS:
        return False
    if name in TINY_NAMES or name == ALIGNED_NAME or name in presets():
        return True
    if is_random_name(name):
        return load_shape(name).family is not None
    path = Path(os.path.expanduser(name))
    if (path / checkpoint_dir.META).is_file():
        meta = checkpoint_dir.read_whole(path)
        if meta is None or "config" not in meta:
            return None
        return sees_images(config_from_dict(meta["config"]).model.name)
    if path.is_dir():
        return checkpoint_family(name) is not None
    return None


def data_fits_model(task: Task, name: str) -> None:
    """Images in the data of a text model are a DataError naming the split and example (they
    would be dropped, or their placeholders trained on as text)."""
    if sees_images(name) is not False:
        return
    for split, examples in (("train", task.train), ("test", task.test)):
        for i, example in enumerate(examples):
            if example.images:
                raise DataError(f"data: {split} example {i} has {len(example.images)} image(s), but model.name={name!r} is a "
                                "text model; use a vision-language model (see `vlm-treegrpo presets`)")
