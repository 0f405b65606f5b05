"""The training loop: a run learns, writes its adapter and metrics, and resumes bit-identically."""

import json

import numpy as np
import pytest

from qlora_jax import cli
from qlora_jax.config import load_config
from qlora_jax.models import write_tiny_checkpoint
from qlora_jax.train import train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    base = write_tiny_checkpoint(root / "base", "llama", num_hidden_layers=2)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):
        word = "".join(rng.choice(list("abcdef"), 4))
        rows.append({"prompt": f"reverse {word}:", "completion": f" {word[::-1]}"})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return base, data, root


def _config(setup, out, *extra):
    base, data, _ = setup
    return load_config(None, [f"model={base}", f"data.path={data}", f"output_dir={out}", "model.dtype=float32",
                              "quantization.compute_dtype=float32", "lora.r=8", "lora.lora_alpha=16",
                              "lora.lora_dropout=0.1", "training.max_steps=6", "training.save_steps=2",
                              "training.logging_steps=1", "training.per_device_train_batch_size=4",
                              "training.gradient_accumulation_steps=2", "training.learning_rate=3e-3",
                              "training.lr_scheduler_type=linear", "training.warmup_steps=2", "data.max_seq_length=64",
                              *extra])


def _adapter_bytes(out):
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def test_run_writes_adapter_metrics_and_checkpoints(setup):
    out = setup[2] / "run"
    result = train(_config(setup, out), log=lambda *_: None)
    assert result["step"] == 6 and (out / "adapter" / "adapter_config.json").exists()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6] and lines[-1]["loss"] < lines[0]["loss"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]


def test_resume_is_bit_identical_to_an_uninterrupted_run(setup):
    """6 steps straight vs 3 steps, stop (as a preemption), resume to 6: the same adapter bytes
    (dropout on, so the RNG state must resume too, and the data position)."""
    straight, interrupted = setup[2] / "straight", setup[2] / "interrupted"
    train(_config(setup, straight), log=lambda *_: None)
    first = train(_config(setup, interrupted), stop_after_steps=3, log=lambda *_: None)
    assert first["step"] == 3 and not (interrupted / "adapter").exists()
    messages = []
    second = train(_config(setup, interrupted), log=messages.append)
    assert second["step"] == 6 and any("resumed from step 3" in m for m in messages)
    assert _adapter_bytes(straight) == _adapter_bytes(interrupted)


def test_other_runs_checkpoints_are_refused(setup):
    out = setup[2] / "refuse"
    train(_config(setup, out), stop_after_steps=2, log=lambda *_: None)
    with pytest.raises(ValueError, match="holds checkpoints of a run with a different config"):
        train(_config(setup, out, "lora.r=4"), log=lambda *_: None)
    result = train(_config(setup, out, "lora.r=4", "overwrite_output_dir=true"), log=lambda *_: None)
    assert result["step"] == 6


def test_cli_train(setup, capsys):
    base, data, root = setup
    out = root / "cli"
    args = ["train", f"model={base}", f"data.path={data}", f"output_dir={out}", "training.max_steps=2",
            "training.per_device_train_batch_size=2", "data.max_seq_length=64"]
    assert cli.main(args) == 0
    assert "done: 2 steps" in capsys.readouterr().out and (out / "adapter").exists()
    assert cli.main(["train", "training.learning_rte=1"]) == 2
    assert "unknown key training.learning_rte; did you mean training.learning_rate?" in capsys.readouterr().err


def test_validation_split_and_periodic_eval(setup):
    out = setup[2] / "eval"
    train(_config(setup, out, "data.validation_split=0.25", "training.eval_steps=3", "lora.lora_dropout=0.0"),
          log=lambda *_: None)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_loss" in x]
    assert [x["step"] for x in evals] == [3, 6]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert abs(evals[0]["eval_perplexity"] - np.exp(evals[0]["eval_loss"])) < 1e-3 * evals[0]["eval_perplexity"]


def test_demo_learns_the_task(tmp_path, monkeypatch):
    """configs/demo.yaml as shipped (only output_dir moved): held-out eval loss at most half the
    untrained model's, exact-match accuracy at least 50 points higher (the demo's contract)."""
    from pathlib import Path

    monkeypatch.setenv("QLORA_JAX_CACHE", str(tmp_path / "cache"))
    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    result = train(load_config(demo, [f"output_dir={tmp_path / 'demo'}"]), log=lambda *_: None)
    before, after = result["before"], result["after"]
    assert after["eval_loss"] <= 0.5 * before["eval_loss"]
    assert after["exact_match"] >= before["exact_match"] + 0.5
    assert (tmp_path / "demo" / "eval_summary.json").exists() and (tmp_path / "demo" / "adapter").exists()
