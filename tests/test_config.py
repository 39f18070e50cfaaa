"""Config loading: defaults, overrides, and errors that name the field."""
from __future__ import annotations

import re

import pytest

from vlm_treegrpo.config import ConfigError, config_from_dict, load_config


def test_defaults_and_overrides():
    cfg = config_from_dict({"rollout": {"K": 3}}, ["rollout.M=4", "optim.lr=2e-5", "log.name=x", "algo.rewards=[correctness, format]"])
    assert (cfg.rollout.K, cfg.rollout.M, cfg.rollout.G) == (3, 4, 12)
    assert cfg.optim.lr == 2e-5 and cfg.log.name == "x"
    assert cfg.algo.rewards == ["correctness", "format"]


def test_int_widens_to_float_but_nothing_else_converts():
    assert config_from_dict({}, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"^rollout.K: must be an integer"):
        config_from_dict({}, ["rollout.K=2.5"])
    with pytest.raises(ConfigError, match=r"^log.progress: must be true or false"):
        config_from_dict({}, ["log.progress=yes please"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("rollout.K=0", "rollout.K"),
        ("algo.clip_eps=-0.1", "algo.clip_eps"),
        ("algo.loss=ppo2", "algo.loss"),
        ("algo.scale=max", "algo.scale"),
        ("optim.lr=0", "optim.lr"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("algo.bogus=1", "algo.bogus"),
        ("nonsense.x=1", "nonsense"),
        ("data.n_test=0", "data.n_test"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, [override])
    assert str(info.value).startswith(field)
    assert "\n" not in str(info.value)


def test_impossible_combinations():
    with pytest.raises(ConfigError, match=r"^algo.answer_scope"):
        config_from_dict({"rollout": {"K": 4, "M": 1}, "algo": {"answer_scope": "thought"}})
    with pytest.raises(ConfigError, match=r"^algo.baseline"):
        config_from_dict({"rollout": {"K": 4, "M": 2}, "algo": {"baseline": "rloo"}})
    with pytest.raises(ConfigError, match=r"^rollout.K"):
        config_from_dict({"rollout": {"K": 1, "M": 1}})


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("rollout:\n  K: 2\n  M: 3\n")
    assert load_config(p).rollout.M == 3
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_every_shipped_config_loads():
    from pathlib import Path

    for path in sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml")):
        load_config(path)


def test_theory_fields_defaults_and_validation():
    a = config_from_dict({}).algo
    assert (a.credit, a.rredcot_segmenter, a.rredcot_values, a.diag_every) == ("outcome", "delimiters", "answer_prob", 5)
    cfg = config_from_dict({}, ["algo.credit=rredcot", "algo.rredcot_segmenter=hybrid", "algo.rredcot_values=importance", "algo.diag_every=0"])
    assert cfg.algo.credit == "rredcot" and cfg.algo.diag_every == 0
    for override, field in [
        ("algo.credit=mc", "algo.credit"),
        ("algo.rredcot_segmenter=keywords", "algo.rredcot_segmenter"),
        ("algo.rredcot_values=mc", "algo.rredcot_values"),
        ("algo.rredcot_min_len=0", "algo.rredcot_min_len"),
        ("algo.rredcot_entropy_quantile=1.5", "algo.rredcot_entropy_quantile"),
        ("algo.diag_every=-1", "algo.diag_every"),
    ]:
        with pytest.raises(ConfigError) as info:
            config_from_dict({}, [override])
        assert str(info.value).startswith(field)
    with pytest.raises(ConfigError, match=r"^algo.answer_scope"):
        config_from_dict({"rollout": {"K": 2, "M": 2}}, ["algo.credit=rredcot", "algo.answer_scope=thought"])


def test_training_weights_are_fp32_under_auto_except_a_frozen_lora_base_on_a_gpu():
    from vlm_treegrpo.config import ModelConfig

    assert ModelConfig().training_dtype("cpu") == "float32"
    assert ModelConfig().training_dtype("cuda") == "float32"  # master weights; autocast does the bf16 math
    assert ModelConfig(lora_r=8).training_dtype("cuda") == "bfloat16"  # frozen base, adapters trained
    assert ModelConfig(lora_r=8).training_dtype("cpu") == "float32"
    assert ModelConfig(dtype="bfloat16").training_dtype("cpu") == "bfloat16"  # as asked


def test_autocast_auto_is_bf16_on_a_gpu_and_off_on_the_cpu():
    from vlm_treegrpo.config import ModelConfig, resolve_autocast

    assert ModelConfig().autocast == "auto"
    assert resolve_autocast("auto", "cuda") == "bfloat16" and resolve_autocast("auto", "cpu") == "none"
    assert resolve_autocast("bfloat16", "cpu") == "bfloat16" and resolve_autocast("none", "cuda") == "none"
    with pytest.raises(ConfigError, match="model.autocast"):
        ModelConfig(autocast="fp8")


def test_decode_graphs_is_auto_by_default_on_a_gpu_only():
    from vlm_treegrpo.rollout.graphs import wanted
    from vlm_treegrpo.rollout.tree import SamplingParams

    cfg = config_from_dict({})
    assert cfg.rollout.decode_graphs == "auto"
    assert [wanted(s, d) for s in ("auto", True, False) for d in ("cuda", "cpu")] == [True, False, True, True, False, False]
    assert SamplingParams.of(cfg.rollout).graphs == "auto"
    compiled = config_from_dict({"rollout": {"compile_decode": True}})  # auto steps aside for compiled decoding
    assert SamplingParams.of(compiled.rollout).graphs is False and SamplingParams.of(compiled.rollout).compile
    with pytest.raises(ConfigError, match="rollout.decode_graphs"):
        config_from_dict({"rollout": {"compile_decode": True, "decode_graphs": True}})
    for bad in ("yes", 1, None):
        with pytest.raises(ConfigError, match="rollout.decode_graphs: must be true, false or auto"):
            config_from_dict({"rollout": {"decode_graphs": bad}})
    assert config_from_dict({}, ["rollout.decode_graphs=false"]).rollout.decode_graphs is False


def test_non_finite_and_absurd_numbers_are_errors_naming_the_field():
    import math

    for override, field in [("optim.lr=inf", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.lr=2.0", "optim.lr"),
                            ("sft.lr=-.inf", "sft.lr"), ("rollout.temperature=inf", "rollout.temperature"),
                            ("rollout.temperature=0", "rollout.temperature"), ("algo.clip_eps=.inf", "algo.clip_eps"),
                            ("algo.reward_timeout_s=nan", "algo.reward_timeout_s"), ("algo.reward_workers=-1", "algo.reward_workers"),
                            ("log.checkpoint_keep=0", "log.checkpoint_keep")]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: "):
            load_config(None, [override])
    from vlm_treegrpo.config import OptimConfig, RolloutConfig

    for make in (lambda: OptimConfig(lr=math.inf), lambda: RolloutConfig(temperature=math.inf)):  # (built in code, not read)
        with pytest.raises(ConfigError):
            make()


def test_yaml_errors_name_the_file_or_the_override(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1e-5\n")
    with pytest.raises(ConfigError, match=r"^config: .*bad\.yaml is not valid YAML: .* at line 3, column 1$"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^rollout\.K: the value '\{' is not valid YAML"):
        load_config(None, ["rollout.K={"])
    with pytest.raises(ConfigError, match=r"^config: file not found: "):
        load_config(tmp_path)  # (a directory is not a config file)
