"""The comparison's jobs: preset checkpoints (random Llama-shaped weights, written once and cached),
the run configuration every stack reads, and the batches and prompt they all use."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

# Llama-shaped presets: model shape, then the batch each training step sees.
PRESETS: dict[str, dict] = {
    # CI: seconds per stack; every in_features a multiple of 64 (bitsandbytes' CPU inference
    # path needs it, see the small preset)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=384, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, batch=4, seq=256),
    "small": dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1376, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000, batch=4, seq=256),
    # the TinyLlama-1.1B shape
    "1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, batch=1, seq=512),
}
STACKS = ("reference", "qlora_jax", "qwix")
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass
class CompareConfig:
    """One comparison job: the same work for every stack (issue 10 pins these values)."""

    preset: str | None = "tiny"
    model: str | None = None  # a local HF checkpoint instead of a preset's
    steps: int = 10
    dtype: str = "bfloat16"
    stacks: tuple[str, ...] = STACKS
    gradient_checkpointing: bool = False
    batch: int | None = None  # None: the preset's (4, or 1 for 1b; 4 with --model)
    seq: int | None = None  # None: the preset's (256, or 512 for 1b; 256 with --model)
    r: int = 16
    lora_alpha: int = 32
    learning_rate: float = 1e-4
    prompt_length: int = 32
    max_new_tokens: int = 64
    seed: int = 0
    load_in_8bit: bool = False  # LLM.int8() bases instead of NF4 + double quantization (Qwix: its int8)

    def __post_init__(self):
        if (self.preset is None) == (self.model is None):
            raise ValueError(f"give a preset or a model, not both or neither (preset={self.preset!r}, "
                             f"model={self.model!r})")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not known; expected one of {list(PRESETS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; expected one of {DTYPES}")
        self.stacks = tuple(self.stacks)
        bad = [s for s in self.stacks if s not in STACKS]
        if bad or not self.stacks:
            raise ValueError(f"stacks={list(self.stacks)!r}: expected a non-empty subset of {list(STACKS)}")
        if self.steps < 3:
            raise ValueError(f"steps={self.steps}: at least 3 are needed (tokens/s is the median after the first two)")
        shape = PRESETS.get(self.preset, {})
        self.batch = self.batch or shape.get("batch", 4)
        self.seq = self.seq or shape.get("seq", 256)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CompareConfig":
        return cls(**json.loads(text))


def cache_dir() -> Path:
    """Where preset checkpoints are kept: ``$QLORA_JAX_CACHE`` or ``~/.cache/qlora_jax``."""
    return Path(os.environ.get("QLORA_JAX_CACHE", Path.home() / ".cache" / "qlora_jax")) / "presets"


def preset_checkpoint(name: str, root: str | os.PathLike | None = None) -> Path:
    """The preset's checkpoint (bf16 safetensors, config.json, the tiny tokenizer), written once under
    ``root`` (default ``cache_dir()``) and reused; written to a temporary folder and renamed, so an
    interrupted write never leaves a half checkpoint in the cache."""
    from ..models import write_tiny_checkpoint

    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not known; expected one of {list(PRESETS)}")
    root = Path(root) if root is not None else cache_dir()
    path = root / name
    if (path / "config.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    shape = {k: v for k, v in PRESETS[name].items() if k not in ("batch", "seq")}
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        write_tiny_checkpoint(tmp, "llama", dtype="bfloat16", max_position_embeddings=2048, **shape)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def checkpoint_of(config: CompareConfig, root=None) -> Path:
    return Path(config.model) if config.model else preset_checkpoint(config.preset, root)


def make_batches(config: CompareConfig, vocab_size: int) -> np.ndarray:
    """int64 [steps, batch, seq]: each row a random 16-token motif repeated (ids from 3 up, clear of
    the special tokens), a pattern LoRA can learn (induction), so the loss curves move."""
    rng = np.random.default_rng(config.seed)
    motif = rng.integers(3, vocab_size, (config.steps, config.batch, 16))
    reps = -(-config.seq // 16)
    return np.tile(motif, (1, 1, reps))[..., : config.seq].astype(np.int64)


def make_prompt(config: CompareConfig, vocab_size: int) -> np.ndarray:
    """int64 [1, prompt_length]: a fresh motif row, as the training rows are made."""
    rng = np.random.default_rng(config.seed + 1)
    motif = rng.integers(3, vocab_size, (1, 16))
    return np.tile(motif, (1, -(-config.prompt_length // 16)))[:, : config.prompt_length].astype(np.int64)
