"""Run configs: every shipped YAML loads; overrides; unknown keys, wrong types and bad values fail
at load with the key's full name."""

from pathlib import Path

import pytest

from qlora_jax.config import RunConfig, apply_overrides, config_to_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_yaml_loads(path):
    config = load_config(path)
    assert isinstance(config, RunConfig) and config.model.name_or_path
    assert config.quantization.quant_type == "nf4" and config.quantization.double_quant
    assert config.lora.target_modules == "all-linear"
    if path.name.endswith("-qlora.yaml"):  # the QLoRA paper's recipes (the demo tunes its own)
        assert config.training.max_grad_norm == 0.3 and config.lora.r == 64 and config.lora.lora_alpha == 16


def test_defaults_and_overrides(tmp_path):
    config = load_config(None, ["model=some/hub-id", "lora.r=16", "training.learning_rate=1e-4",
                                "lora.target_modules=[q_proj, v_proj]", "quantization.double_quant=false",
                                "output_dir=123", "resume=true"])
    assert config.model.name_or_path == "some/hub-id" and config.lora.r == 16
    assert config.training.learning_rate == 1e-4  # YAML 1.1 reads "1e-4" as a string: coerced
    assert config.lora.target_modules == ("q_proj", "v_proj") and not config.quantization.double_quant
    assert config.output_dir == "123" and config.resume is True
    dense = load_config(None, ["quantization=null"])
    assert dense.quantization is None
    assert config_to_dict(config)["lora"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("override,needle", [
    (["training.learning_rte=1e-4"], "unknown key training.learning_rte; did you mean training.learning_rate?"),
    (["lora.alpha=16"], "unknown key lora.alpha"),
    (["trainig.max_steps=3"], "unknown key trainig; did you mean training?"),
    (["training.max_steps=ten"], "training.max_steps: expected an integer, got 'ten'"),
    (["training.max_steps=1.5"], "training.max_steps: expected an integer, got 1.5"),
    (["training.gradient_checkpointing=maybe"], "training.gradient_checkpointing: expected true or false"),
    (["training.learning_rate=-1"], r"training.learning_rate=-1.0 must be positive"),
    (["training.warmup_ratio=1.5"], r"training.warmup_ratio=1.5 must be in \[0, 1\)"),
    (["training.optim=adafactor"], r"training.optim='adafactor' is not supported; expected one of \('adamw'"),
    (["training.lr_scheduler_type=polynomial"], "training.lr_scheduler_type='polynomial' is not supported"),
    (["lora.r=0"], "lora: r=0 must be a positive integer"),
    (["lora.lora_dropout=1"], r"lora: lora_dropout=1.0 must be in \[0, 1\)"),
    (["quantization.quant_type=int4"], "quantization: quant_type='int4' is not supported"),
    (["quantization.blocksize=48"], "quantization: blocksize=48 is not supported"),
    (["model.dtype=float64"], r"model.dtype='float64' is not allowed; expected one of \['float32', 'bfloat16', "
                              r"'float16'\]"),
    (["mesh.data=0"], "mesh.data=0 must be a positive size or -1"),
    (["data.max_seq_length=0"], "data.max_seq_length=0 must be positive"),
    (["lora=5"], "lora: expected a mapping of keys"),
    (["training.max_steps"], "override 'training.max_steps' is not key=value"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ValueError, match=needle):
        load_config(None, override)


def test_bad_yaml_file(tmp_path):
    (tmp_path / "c.yaml").write_text("training:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match="unknown key training.max_stepz; did you mean training.max_steps?"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_do_not_touch_the_input():
    raw = {"lora": {"r": 4}}
    out = apply_overrides(raw, ["lora.r=8"])
    assert raw == {"lora": {"r": 4}} and out == {"lora": {"r": 8}}
