"""The README's Python snippets run as written (the model snippet on a tiny checkpoint)."""

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import qlora_jax
from qlora_jax.models import write_tiny_checkpoint

BLOCKS = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md").read_text(), re.S)


def test_readme_api_tour_runs(capsys):
    exec(compile(BLOCKS[0], "README.md", "exec"), {})
    assert "quantized weights" in capsys.readouterr().out


def test_readme_model_snippet_runs(tmp_path):
    path = write_tiny_checkpoint(tmp_path, "llama")
    code = BLOCKS[1].replace('"path/or/hub-id"', repr(str(path)))
    ns = {"qlora_jax": qlora_jax, "jnp": jnp, "input_ids": np.array([[5, 6, 7]]), "attention_mask": np.ones((1, 3))}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["logits"].shape == (1, 3, 320) and ns["tokens"].shape == (1, 35)
    # the LoRA / train-step snippet continues with that model
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 320, (1, 2, 8)))
    ns.update(batch={"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids},
              other_model=qlora_jax.from_pretrained(path))
    exec(compile(BLOCKS[2].replace('"out/adapter"', repr(str(tmp_path / "adapter"))), "README.md", "exec"), ns)
    assert float(ns["metrics"]["loss"]) > 0 and (tmp_path / "adapter" / "adapter_config.json").exists()
