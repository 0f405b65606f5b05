"""Built-in assets for the demo and for trying things without a hub: ``builtin:<name>`` paths.

``model.name_or_path: builtin:tiny-llama`` is a tiny random Llama (2 layers, hidden 128) written
once with numpy into the cache; its weights are drawn with std 0.1 rather than transformers'
0.02 so that its frozen LM head can express confident predictions (at 0.02 the largest logit a
normalised hidden state can reach is about 2.5 and no adapter can fix that). ``data.path:
builtin:has-red`` is a deterministic synthetic task: does a three-word list contain "red"?
(prompt ``has red? tall red cold ->``, completion `` yes`` / `` no``). A random base answers it
by chance at best; QLoRA adapters learn it in a few hundred steps on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

PREFIX = "builtin:"
WORDS = ("red", "blue", "green", "tall", "small", "fast", "slow", "warm", "cold", "soft")


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_JAX_CACHE", Path.home() / ".cache" / "qlora_jax"))


def _has_red_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(WORDS, 3)]
        if rng.random() < 0.5 and "red" not in words:
            words[int(rng.integers(3))] = "red"
        rows.append({"prompt": "has red? " + " ".join(words) + " ->", "completion": " yes" if "red" in words else " no"})
    return rows


def resolve(path: str) -> str:
    """A ``builtin:`` path made concrete (created in the cache on first use); other paths as given."""
    if not str(path).startswith(PREFIX):
        return path
    name = str(path)[len(PREFIX):]
    root = cache_dir()
    if name == "tiny-llama":
        target = root / "tiny-llama-v1"
        if not (target / "model.safetensors").exists():
            from .models import write_tiny_llama

            tmp = root / f".tiny-llama-v1.{os.getpid()}"
            write_tiny_llama(tmp, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=320, initializer_range=0.1, seed=0)
            if target.exists():  # another process got there first
                shutil.rmtree(tmp)
            else:
                tmp.replace(target)
        return str(target)
    if name == "has-red":
        target = root / "has-red-v1.jsonl"
        if not target.exists():
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".has-red-v1.{os.getpid()}.jsonl"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in _has_red_rows(2000, seed=0)))
            tmp.replace(target)
        return str(target)
    raise ValueError(f"{path!r} is not a built-in asset; expected builtin:tiny-llama or builtin:has-red")
