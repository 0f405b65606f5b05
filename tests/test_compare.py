"""The side-by-side comparison (qlora_jax.compare, scripts/compare_torch.py).

Slow step: the tiny preset end to end in all three stacks (PyTorch + bitsandbytes + PEFT, Qwix,
qlora_jax), float32: every stack completes, comparison.json has every key, qlora_jax's losses
follow the reference's within 1e-4 relative (same bitsandbytes codes, same PEFT adapters, same
batches) and its own NF4 state meets the exactness contract for every quantized weight. Fast: the
library's parts (configuration, batches, the exactness rule, failure reporting, the report).
Timing is never asserted.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import qlora_jax
from qlora_jax import compare
from qlora_jax.compare import _report, _stacks
from qlora_jax.quant import _tables

ROOT = Path(__file__).resolve().parents[1]


def _run_tiny(tmp_path, *args):
    """scripts/compare_torch.py on the tiny preset with ``args``, its cache under tmp_path: (the
    report's JSON, the output directory)."""
    env = dict(os.environ, QLORA_JAX_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_torch.py"), "--preset", "tiny", *args,
                           "--output-dir", str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "comparison.json").read_text()), out


@pytest.mark.slow
def test_tiny_preset_all_stacks_float32(tmp_path):
    report, out = _run_tiny(tmp_path, "--steps", "5", "--dtype", "float32")
    assert {"reference", "qlora_jax", "qwix", "environment", "config"} <= report.keys()
    for stack in compare.STACKS:
        r = report[stack]
        assert r["errors"] == {}, (stack, r["errors"], r.get("tracebacks"))
        for key in compare.FIGURES:
            assert r[key] is not None, (stack, key)
        assert len(r["losses"]) == 5 and len(r["gen_tokens"]) == 64
    env = report["environment"]
    assert env["versions"]["bitsandbytes"] and env["cores"] >= 1 and env["cpu"] and env["date"] and env["command"]
    assert env["device"]["qlora_jax"].startswith("cpu") and env["device"]["reference"].startswith("cpu")
    ref, ours = report["reference"]["losses"], report["qlora_jax"]["losses"]
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    # our own quantization of every linear weight (2 layers x 7) meets the contract against bitsandbytes'
    exact = report["qlora_jax"]["bit_exact"]
    assert exact["tensors"] == 14 and exact["exact"] == 14, exact["mismatches"]
    # float32, the same codes and adapters: greedy decoding agrees token for token
    assert report["qlora_jax"]["gen_tokens"] == report["reference"]["gen_tokens"]
    assert report["reference"]["paths"]["train"], "the reference's 4-bit ops were not recorded"
    md = (out / "comparison.md").read_text()
    assert "| train tokens/s" in md and "14 of 14" in md
    for name in ("loss.png", "throughput.png", "memory.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_config_validation():
    with pytest.raises(ValueError, match="preset='huge'"):
        compare.CompareConfig(preset="huge")
    with pytest.raises(ValueError, match="not both or neither"):
        compare.CompareConfig(preset="tiny", model="/some/ckpt")
    with pytest.raises(ValueError, match="stacks=.*'mlx'"):
        compare.CompareConfig(stacks=("reference", "mlx"))
    with pytest.raises(ValueError, match="dtype='float16'"):
        compare.CompareConfig(dtype="float16")
    with pytest.raises(ValueError, match="steps=2"):
        compare.CompareConfig(steps=2)
    one_b = compare.CompareConfig(preset="1b")
    assert (one_b.batch, one_b.seq) == (1, 512)
    tiny = compare.CompareConfig(preset="tiny", steps=4)
    assert compare.CompareConfig.from_json(tiny.to_json()) == tiny


def test_cli_errors_name_the_bad_value(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main(["--output-dir", str(tmp_path)])
    assert "--preset or --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--preset", "tiny", "--stacks", "reference,mlx", "--output-dir", str(tmp_path)])
    assert "'mlx'" in capsys.readouterr().err


def test_batches_are_the_same_for_every_stack_and_learnable():
    cfg = compare.CompareConfig(preset="tiny", steps=3)
    a, b = compare.make_batches(cfg, 1024), compare.make_batches(cfg, 1024)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 4, 256) and a.min() >= 3 and a.max() < 1024
    np.testing.assert_array_equal(a[:, :, 16:32], a[:, :, :16])  # a repeated motif
    assert compare.make_prompt(cfg, 1024).shape == (1, 32)


def test_state_mismatch_follows_the_contract():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 4096)), jnp.float32)
    q = qlora_jax.quantize(x)
    assert compare.state_mismatch(q, q) is None
    codes = np.asarray(q.codes).copy()
    codes[5] ^= 0x10
    assert "1 packed code bytes differ" in compare.state_mismatch(q, dataclasses.replace(q, codes=jnp.asarray(codes)))
    off = dataclasses.replace(q, offset=q.offset * np.float32(1.001))
    assert "offset" in compare.state_mismatch(off, q)
    one_ulp = dataclasses.replace(q, offset=jnp.float32(np.nextafter(np.float32(q.offset), np.float32(1))))
    assert compare.state_mismatch(one_ulp, q) is None


def test_nested_code_steps_only_at_midpoints():
    lo = 100
    mid = (_tables.DYNAMIC_MAP[lo] + _tables.DYNAMIC_MAP[lo + 1]) / 2
    ours, theirs = np.array([lo, 7], np.uint8), np.array([lo + 1, 7], np.uint8)
    assert compare.nested_code_mismatch(ours, theirs, np.array([mid + 1e-6, 0.0])) is None
    assert "away from a midpoint" in compare.nested_code_mismatch(ours, theirs, np.array([mid + 1e-3, 0.0]))
    assert "more than one step" in compare.nested_code_mismatch(np.array([lo], np.uint8),
                                                                np.array([lo + 2], np.uint8), np.array([mid]))


def test_a_failing_stack_gives_null_figures_with_its_reason(tmp_path):
    cfg = compare.CompareConfig(preset=None, model=str(tmp_path / "missing"), steps=3, stacks=("qlora_jax",))
    result = compare.run_stack("qlora_jax", cfg, tmp_path / "missing", tmp_path / "work")
    assert all(result[k] is None for k in compare.FIGURES)
    assert "load" in result["errors"] and "missing" in result["errors"]["load"]


def test_phase_failure_keeps_other_figures():
    result = _stacks.empty_result()
    result["load_seconds"] = 1.0
    with _stacks._Phase(result, "generate"):
        result["gen_tokens"] = [1]
        raise RuntimeError("shape '[-1, 1376]' is invalid\nmore")
    assert result["gen_tokens"] is None and result["load_seconds"] == 1.0
    assert result["errors"] == {"generate": "RuntimeError: shape '[-1, 1376]' is invalid"}


def test_report_shows_missing_figures_and_ratios(tmp_path):
    def stack(tps, gen):
        r = _stacks.empty_result()
        r.update(load_seconds=2.0, load_peak_rss_bytes=2 ** 30, train_tokens_per_s=tps, train_peak_rss_bytes=2 ** 30,
                 losses=[2.0, 1.5], gen_tokens_per_s=gen, gen_tokens=[4, 5, 6] if gen else None)
        return r

    report = {"config": dataclasses.asdict(compare.CompareConfig(preset="tiny", steps=3)),
              "environment": compare.environment("cmd"), "reference": stack(100.0, None),
              "qlora_jax": stack(250.0, 9.0), "qwix": stack(50.0, 3.0)}
    report["reference"]["errors"]["generate"] = "RuntimeError: shape '[-1, 1376]' is invalid"
    _report.derive(report)
    assert report["qlora_jax"]["max_loss_rel_diff_vs_reference"] == 0.0
    assert report["qwix"]["gen_tokens_agree"] is None
    md = _report.markdown(report, _report.plot(report, tmp_path))
    row = next(line for line in md.splitlines() if line.startswith("| train tokens/s"))
    assert "2.50x" in row and "5.00x" in row and row.endswith("better |")
    assert "PyTorch, generate: RuntimeError: shape '[-1, 1376]'" in md
    assert "| generate tokens/s (batch 1, median of 3) | n/a |" in md


def test_offset_in_torch_thread_order_matches_bitsandbytes_on_threads():
    """A weight of 65536 blocks: bitsandbytes' CPU offset (absmax.mean() over torch's threads) may
    sit an ulp or two from quantize's single-thread order; recomputed in torch's thread order, the
    whole nested state matches. (The comparison report counts both.)"""
    import torch

    from qlora_jax.quant import from_bnb_state
    from qlora_jax.quant._array import quantize_first_level

    from bnb_ref import F

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for seed in range(3):
            w = torch.randn(1024, 4096, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
            packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            theirs = from_bnb_state({"weight": packed.numpy(), **{f"weight.{k}": v.numpy() if hasattr(v, "numpy") else v
                                                                  for k, v in st.as_dict(packed=True).items()}})
            x = jnp.asarray(w.float().numpy()).astype(jnp.bfloat16)
            ours = qlora_jax.quantize(x)
            _, first = quantize_first_level(x, quant_type="nf4", blocksize=64)
            again = compare.in_torch_thread_order(ours, first, 2)
            assert compare.state_mismatch(again, theirs, np.asarray(first)) is None
            np.testing.assert_array_equal(np.asarray(ours.codes), np.asarray(theirs.codes))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_tiny_preset_qwix_in_bfloat16_generates(tmp_path):
    """Qwix's decode in bfloat16, where qlora_jax's dense few-row products would take the AMX kernel:
    Qwix's quantized weights are not arrays, so its own intercepted dot must run (a regression: its
    generation failed with a TypeError in the kernel's call)."""
    r = _run_tiny(tmp_path, "--steps", "3", "--stacks", "qwix")[0]["qwix"]
    assert r["errors"] == {}, (r["errors"], r.get("tracebacks"))
    assert len(r["gen_tokens"]) == 64 and r["gen_tokens_per_s"] > 0


def test_every_stack_runs_with_the_malloc_tunable(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert compare.child_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + compare.MALLOC_TUNABLE
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the caller's own choice stands
    assert compare.child_env()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert compare.child_env()["GLIBC_TUNABLES"] == compare.MALLOC_TUNABLE
    assert compare.environment()["glibc_tunables"] == compare.MALLOC_TUNABLE
