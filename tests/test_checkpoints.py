"""Tiny checkpoints in the exact formats of real ones; transformers' own bitsandbytes 4-bit export."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open

import qlora_jax
from qlora_jax import cli
from qlora_jax.models import iter_tensors, tensor_specs, write_tiny_llama

from bnb_ref import assert_nested_codes_match, nested_scaled


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("ckpt") / "tiny", hidden_size=128, intermediate_size=352,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def test_tiny_checkpoint_loads_in_transformers(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    state = model.state_dict()
    specs = tensor_specs(tiny)
    assert sorted(specs) == sorted(state)
    for name, array in iter_tensors(tiny):
        assert specs[name].shape == array.shape == tuple(state[name].shape)
        np.testing.assert_array_equal(np.asarray(array, np.float32), state[name].float().numpy())


def test_sharded_checkpoint_reads_like_the_single_file(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert tensor_specs(tmp_path).keys() == tensor_specs(tiny).keys()
    ours = dict(iter_tensors(tiny))
    for name, array in iter_tensors(tmp_path):
        np.testing.assert_array_equal(np.asarray(array, np.float32), np.asarray(ours[name], np.float32))


def test_to_bnb_state_matches_transformers_4bit_checkpoint(tiny, tmp_path):
    """Load the checkpoint in 4 bits with transformers + bitsandbytes, save it, and compare every
    quantized weight's entries with ours: same keys, dtypes, shapes and bytes (nested codes up to
    bitsandbytes' CPU lookup-table steps, see bnb_ref)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=cfg, device_map="cpu")
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    weights = {name: array for name, array in iter_tensors(tiny)}
    quantized = [k[: -len(".quant_state.bitsandbytes__nf4")] for k in theirs if k.endswith("bitsandbytes__nf4")]
    assert len(quantized) == 7 * 2  # every linear of both layers; not embeddings or lm_head
    for prefix in quantized:
        q = qlora_jax.quantize(jnp.asarray(weights[prefix]))
        ours = qlora_jax.to_bnb_state(q, prefix=prefix)
        mine = {k: v for k, v in theirs.items() if k == prefix or k.startswith(prefix + ".")}
        assert sorted(ours) == sorted(mine)
        for k, v in ours.items():
            t = mine[k].numpy()
            assert v.dtype == t.dtype and v.shape == t.shape, k
            if k.endswith(".absmax"):
                meta = json.loads(bytes(ours[f"{prefix}.quant_state.bitsandbytes__nf4"]))
                first = np.asarray(qlora_jax.quantize(jnp.asarray(weights[prefix]), double_quant=False).absmax)
                scaled = nested_scaled(first, np.float32(meta["nested_offset"]), mine[prefix + ".nested_absmax"].numpy(), 256)
                assert_nested_codes_match(v, t, scaled)
            else:
                assert v.tobytes() == t.tobytes(), k


def test_cli_info_reports_storage(tiny, capsys):
    assert cli.main(["info", str(tiny)]) == 0
    out = capsys.readouterr().out
    report = qlora_jax.storage_report(jax.eval_shape(qlora_jax.quantize_params, tensor_specs(tiny)))
    assert 4.127 < report.quantized_bits_per_param < 4.13  # small tensors: the per-tensor offset shows
    assert "model_type=llama" in out and "(14 quantized tensors)" in out
    assert f"{report.quantized_bits_per_param:.3f}" in out and f"{report.total_params:,}" in out
    assert cli.main(["info", str(tiny), "--quantize", "--quant-type", "fp4", "--no-double-quant"]) == 0
    out = capsys.readouterr().out
    assert "4.500" in out and "relative RMS error" in out


def test_cli_info_bad_path(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing" / "model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["info", str(tmp_path)]) == 2
    assert "neither model.safetensors nor model.safetensors.index.json" in capsys.readouterr().err


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["info", "--help"])
    out = capsys.readouterr().out
    for flag in ("--quant-type", "--blocksize", "--no-double-quant", "--quantize", "--revision"):
        assert flag in out


def test_eval_shape_of_checkpoint_specs(tiny):
    tree = jax.eval_shape(qlora_jax.quantize_params, tensor_specs(tiny))
    assert isinstance(tree["model.layers.0.mlp.down_proj.weight"], qlora_jax.QuantizedArray)
    assert not isinstance(tree["lm_head.weight"], qlora_jax.QuantizedArray)
