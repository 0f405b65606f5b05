"""The training loop: a run learns, writes its adapter and metrics, and resumes bit-identically."""

import json

import numpy as np
import pytest

from qlora_jax import cli
from qlora_jax.config import load_config
from qlora_jax.train import train

from bnb_ref import write_reverse_task


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return (*write_reverse_task(root), root)


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


def _events(run_dir):
    """(tag, step, value) of every scalar in a TensorBoard event directory (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted(run_dir.glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return out


def test_progress_bar_tensorboard_and_loss_curve(setup, capsys):
    out = setup[2] / "logging"
    train(_config(setup, out, "data.validation_split=0.25", "training.eval_steps=3", "training.logging_steps=2"))
    err = capsys.readouterr()
    assert "train: 100%" in err.err and "6/6" in err.err and "loss=" in err.err and "lr=" in err.err
    assert "tok_s=" in err.err and "<00:00" in err.err  # tqdm's elapsed<remaining (ETA)
    assert "step 6/6  loss" in err.out  # messages printed above the bar
    scalars = _events(out / "runs")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for tag, key in [("train/loss", "loss"), ("train/learning_rate", "learning_rate"), ("eval/loss", "eval_loss"),
                     ("train/grad_norm", "grad_norm"), ("eval/perplexity", "eval_perplexity")]:
        logged = [(x["step"], x[key]) for x in lines if key in x]
        assert [(s, pytest.approx(v, rel=1e-6)) for t, s, v in scalars if t == tag] == logged and logged
    # the rate each logged step used: warmup 1/2 at step 2, then linear decay over steps 3..6
    assert [x["learning_rate"] for x in lines if "learning_rate" in x] == pytest.approx([1.5e-3, 2.25e-3, 0.75e-3])
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_early_stopping(setup):
    """transformers' EarlyStoppingCallback rule: with a threshold no evaluation can beat, patience 2
    stops after the third evaluation; the adapter is written, and running again trains no more."""
    out = setup[2] / "early"
    cfg = _config(setup, out, "data.validation_split=0.25", "training.eval_steps=1",
                  "training.early_stopping_patience=2", "training.early_stopping_threshold=100", "training.max_steps=8")
    messages = []
    result = train(cfg, log=messages.append)
    assert result["step"] == 3 and result["best_step"] == 1 and (out / "adapter").exists()
    assert any("early stopping at step 3" in m for m in messages)
    again = train(cfg, log=lambda *_: None)
    assert again["step"] == 3
    with pytest.raises(ValueError, match="early_stopping_patience needs evaluations"):
        _config(setup, out, "training.early_stopping_patience=2")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, monkeypatch):
    """A loss that becomes NaN at step 5 (the step is made to return NaN): the run stops with a
    message naming the step and the last good checkpoint (4), saves nothing of step 5, writes no
    adapter; once the cause is gone the run resumes from step 4 and finishes."""
    import jax.numpy as jnp

    from qlora_jax.train import _trainer

    real = _trainer.make_train_step

    def poisoned(*args, **kwargs):
        step_fn, calls = real(*args, **kwargs), [0]

        def wrapped(*a):
            trainable, rngs, opt_state, m = step_fn(*a)
            calls[0] += 1
            if calls[0] == 5:
                m = {**m, "loss": jnp.float32(float("nan"))}
            return trainable, rngs, opt_state, m
        return wrapped

    out = setup[2] / "nan"
    monkeypatch.setattr(_trainer, "make_train_step", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss became nan at step 5.*last good checkpoint is step 4"):
        train(_config(setup, out), log=lambda *_: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert not (out / "adapter").exists()
    monkeypatch.setattr(_trainer, "make_train_step", real)
    messages = []
    assert train(_config(setup, out), log=messages.append)["step"] == 6
    assert any("resumed from step 4" in m for m in messages)


def test_packed_run_with_length_grouping(setup):
    out = setup[2] / "packed"
    messages = []
    result = train(_config(setup, out, "data.packing=true", "training.group_by_length=true", "training.max_steps=3",
                           "training.gradient_accumulation_steps=1", "training.per_device_train_batch_size=2"),
                   log=messages.append)
    # 64 examples of 20 or 21 tokens: 3 per 64-token row, 22 rows
    assert any("packed 64 examples into 22 rows of 64 tokens" in m for m in messages), messages
    assert result["step"] == 3 and np.isfinite(result["loss"])


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    from qlora_jax.train._trainer import _drop_metrics_after

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 8)))
    _drop_metrics_after(path, 4)  # the run died at step 7, its last checkpoint is step 4
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_paged_8bit_optimizer_checkpoints_and_resumes_bit_identically(setup):
    """optim=paged_adamw_8bit (r=32: 8-bit moments) through Orbax: 6 steps straight vs 3, stop,
    resume to 6 give the same adapter bytes; the restored state goes back to host memory."""
    extra = ("training.optim=paged_adamw_8bit", "lora.r=32")
    straight, interrupted = setup[2] / "paged_straight", setup[2] / "paged_interrupted"
    train(_config(setup, straight, *extra), log=lambda *_: None)
    train(_config(setup, interrupted, *extra), stop_after_steps=3, log=lambda *_: None)
    assert train(_config(setup, interrupted, *extra), log=lambda *_: None)["step"] == 6
    assert _adapter_bytes(straight) == _adapter_bytes(interrupted)
