"""Run configuration: typed, frozen dataclasses loaded from YAML with ``key.sub=value`` overrides.

Sections (../shared/contracts.md): top level ``output_dir``, ``seed``, ``resume``,
``overwrite_output_dir``; ``model``, ``quantization`` (QuantConfig), ``lora`` (LoraConfig),
``data``, ``training`` (transformers' TrainingArguments names), ``mesh``. Unknown keys, values of
the wrong type and values out of range fail at load, before any work, with the key's full name.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .lora import LoraConfig
from .quant import QuantConfig
from .train import OPTIMIZERS, SCHEDULES

REPORTERS = ("tensorboard",)  # training.report_to: where metrics go besides metrics.jsonl


def _positive(section: str, **values):
    for key, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{section}.{key}={value!r} must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    revision: str | None = None
    scan_layers: bool = True


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = ""
    format: Literal["auto", "text", "prompt_completion", "messages", "alpaca"] = "auto"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    max_seq_length: int = 1024
    packing: bool = False
    completion_only_loss: bool = True
    validation_split: float = 0.0

    def __post_init__(self):
        _positive("data", max_seq_length=self.max_seq_length)
        if not 0 <= self.validation_split < 1:
            raise ValueError(f"data.validation_split={self.validation_split!r} must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    max_steps: int = -1
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "constant"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 0.3
    optim: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    gradient_checkpointing: bool = True
    group_by_length: bool = False
    logging_steps: int = 10
    eval_steps: int | None = None
    eval_exact_match: bool = False  # greedy-generate the validation completions before and after training
    save_steps: int = 500
    save_total_limit: int | None = None
    report_to: tuple[str, ...] = ("tensorboard",)  # event files under <output_dir>/runs; [] for none
    disable_tqdm: bool = False
    plot_loss: bool = True  # <output_dir>/loss_curve.png at the end
    early_stopping_patience: int | None = None  # evaluations without improvement of eval_loss before stopping
    early_stopping_threshold: float = 0.0  # the improvement that counts, as transformers' EarlyStoppingCallback

    def __post_init__(self):
        _positive("training", per_device_train_batch_size=self.per_device_train_batch_size,
                  gradient_accumulation_steps=self.gradient_accumulation_steps, learning_rate=self.learning_rate,
                  num_train_epochs=self.num_train_epochs, adam_epsilon=self.adam_epsilon,
                  logging_steps=self.logging_steps, eval_steps=self.eval_steps, save_steps=self.save_steps,
                  save_total_limit=self.save_total_limit, early_stopping_patience=self.early_stopping_patience)
        for name in self.report_to:
            if name not in REPORTERS:
                raise ValueError(f"training.report_to: {name!r} is not supported; expected a list of {REPORTERS} "
                                 "(or [] for none)")
        if self.early_stopping_threshold < 0:
            raise ValueError(f"training.early_stopping_threshold={self.early_stopping_threshold!r} must not be "
                             "negative")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"training.max_steps={self.max_steps!r} must be positive, or -1 (use num_train_epochs)")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"training.lr_scheduler_type={self.lr_scheduler_type!r} is not supported; expected one "
                             f"of {SCHEDULES}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"training.optim={self.optim!r} is not supported; expected one of {OPTIMIZERS}")
        for key in ("warmup_ratio", "adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"training.{key}={getattr(self, key)!r} must be in [0, 1)")
        for key in ("warmup_steps", "weight_decay", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ValueError(f"training.{key}={getattr(self, key)!r} must not be negative")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for key in ("data", "fsdp", "tensor"):
            value = getattr(self, key)
            if value == 0 or value < -1:
                raise ValueError(f"mesh.{key}={value!r} must be a positive size or -1 (all remaining devices)")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    output_dir: str = "out/run"
    seed: int = 0
    resume: bool | None = None
    overwrite_output_dir: bool = False
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    quantization: QuantConfig | None = dataclasses.field(default_factory=QuantConfig)
    lora: LoraConfig = dataclasses.field(default_factory=lambda: LoraConfig(target_modules="all-linear"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        if self.training.early_stopping_patience and not self.data.validation_split:
            raise ValueError("training.early_stopping_patience needs evaluations: set data.validation_split > 0")


# ------------------------------------------------------------------------------------- loading


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value, tp):
    """``value`` (from YAML or an override string already parsed by YAML) as type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, precise error
            return _coerce(key, value, options[0])
        for option in options:
            try:
                return _coerce(key, value, option)
            except ValueError:
                continue
        raise ValueError(f"{key}: expected {' or '.join(_describe(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not allowed; expected one of {list(args)}")
        return value
    if origin in (tuple, list, collections.abc.Sequence):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(key, tp, value)
    raise ValueError(f"{key}: unsupported field type {tp}")


def _build(prefix: str, cls, raw):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}")
    hints = _hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            raise ValueError(f"unknown key {prefix + '.' if prefix else ''}{key}{hint} "
                             f"(known: {', '.join(sorted(fields))})")
    kwargs = {k: _coerce(f"{prefix + '.' if prefix else ''}{k}", v, hints[k]) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        message = str(e)
        raise ValueError(message if not prefix or message.startswith(prefix + ".") else f"{prefix}: {message}") from None


def _set_path(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``key.sub=value`` strings onto a raw mapping (values parsed as YAML; ``model=X`` is short for
    ``model.name_or_path=X``)."""
    raw = yaml.safe_load(yaml.safe_dump(raw)) or {}  # a deep copy
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        key = "model.name_or_path" if key == "model" else key
        value = yaml.safe_load(text) if text != "" else ""
        if key.endswith("name_or_path") or key.endswith("path") or key == "output_dir":
            value = text  # paths stay strings ("1" or "true" are valid directory names)
        _set_path(raw, key, value)
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or none: the defaults) and apply ``key=value`` overrides."""
    raw = {}
    if path is not None:
        file = Path(path)
        if not file.exists():
            raise ValueError(f"config file {str(file)!r} does not exist")
        raw = yaml.safe_load(file.read_text()) or {}
    return _build("", RunConfig, apply_overrides(raw, list(overrides)))


def config_to_dict(config) -> dict:
    """A plain mapping (for saving beside checkpoints and comparing on resume)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return v
    return plain(config)
