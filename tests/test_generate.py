"""KV-cache generation against transformers' generate on the same checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qlora_jax

from test_models_parity import ARCHS, _hf_model


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen-" + request.param)
    return request.param, _hf_model(request.param, path), path


PROMPTS = np.array([[5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 12, 13, 14, 15]])
MASK = (PROMPTS != 0).astype(np.int64)


def _hf_generate(hf, **kw):
    with torch.no_grad():
        return hf.generate(torch.tensor(PROMPTS), attention_mask=torch.tensor(MASK), do_sample=False,
                           pad_token_id=0, **kw).numpy()


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_greedy_matches_transformers(checkpoint, scan_layers):
    name, hf, path = checkpoint
    model = qlora_jax.from_pretrained(path, scan_layers=scan_layers)
    theirs = _hf_generate(hf, max_new_tokens=10, eos_token_id=None)
    ours = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, max_new_tokens=10, pad_token_id=0))
    np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_repetition_penalty_and_eos_match_transformers(checkpoint):
    name, hf, path = checkpoint
    model = qlora_jax.from_pretrained(path)
    free = _hf_generate(hf, max_new_tokens=8, eos_token_id=None)
    eos = int(free[0, 7 + 2])  # a token row 0 produces third: it must stop there
    theirs = _hf_generate(hf, max_new_tokens=8, eos_token_id=eos, repetition_penalty=1.3)
    ours = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, max_new_tokens=8, eos_token_id=eos, pad_token_id=0,
                                         repetition_penalty=1.3))
    # transformers stops once every row is done; ours keeps the fixed length, padded
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs, err_msg=name)
    assert np.all(ours[:, theirs.shape[1]:] == 0)


def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    _hf_model("llama", tmp_path)
    model = qlora_jax.from_pretrained(tmp_path)
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=5, top_p=0.9)
    a = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, seed=1, **kw))
    b = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, seed=1, **kw))
    c = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, seed=2, **kw))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # top_k=1 sampling is greedy
    greedy = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, max_new_tokens=12))
    one = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, max_new_tokens=12, do_sample=True, top_k=1, seed=3))
    np.testing.assert_array_equal(one, greedy)


def test_nf4_model_generates(tmp_path):
    _hf_model("qwen2", tmp_path)
    model = qlora_jax.from_pretrained(tmp_path, quantization=qlora_jax.QuantConfig())
    out = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, max_new_tokens=4))
    assert out.shape == (2, 11) and np.array_equal(out[:, :7], PROMPTS)


def test_bad_requests(tmp_path):
    _hf_model("llama", tmp_path)
    model = qlora_jax.from_pretrained(tmp_path)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's context of {limit} positions"):
        qlora_jax.generate(model, jnp.ones((1, limit), jnp.int32), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, length\]"):
        qlora_jax.generate(model, jnp.ones((4,), jnp.int32))
    with pytest.raises(ValueError, match="temperature=0 must be positive"):
        qlora_jax.generate(model, PROMPTS, do_sample=True, temperature=0)


def test_scanned_nf4_decoding_reads_stacked_codes_in_place(tmp_path, monkeypatch):
    """A scanned NF4 model decodes with each layer's 4-bit weights read from the stacks by the CPU
    GEMV (``LayerOfStack``): the same logits, bit for bit, as slicing every layer's leaves out of the
    stacks (nnx.scan), and the compiled program slices no codes (a copy of them per token)."""
    import importlib
    import re

    import jax
    from flax import nnx

    from qlora_jax.kernels import cpu_nf4
    from qlora_jax.lora import LoraConfig, apply_lora
    from qlora_jax.models import _decoder

    if not cpu_nf4.available():
        pytest.skip(f"the native CPU kernels: {cpu_nf4.unavailable_reason()}")
    _hf_model("qwen2", tmp_path)
    model = qlora_jax.from_pretrained(tmp_path, quantization=qlora_jax.QuantConfig(compute_dtype="bfloat16"),
                                      dtype=jnp.bfloat16)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    # a prefill of 4 rows: under the GEMM kernel's threshold on every CPU (AMX from 6 rows), so that
    # it takes the GEMV as the decoding step does
    ids = jnp.asarray(PROMPTS[:, -2:], jnp.int32)
    mask = jnp.ones_like(ids)
    positions = _decoder.position_ids_from_mask(mask)
    kv_mask = jnp.concatenate([mask, jnp.ones((2, 3), jnp.int32)], axis=1)
    graphdef, state = nnx.split(model)
    assert cpu_nf4.gemv_takes(ids.size, 64, 64, 64, jnp.bfloat16)

    @jax.jit
    def decode(state):
        m = nnx.merge(graphdef, state)
        logits, cache = m.forward(ids, positions, kv_mask, m.init_cache(2, ids.shape[1] + 3), 0)
        tok = jnp.argmax(logits[:, -1], -1)[:, None].astype(jnp.int32)
        step, _ = m.forward(tok, positions[:, -1:] + 1, kv_mask, cache, ids.shape[1])
        return logits, step

    hlo = decode.lower(state).compile().as_text()
    in_place = decode(state)
    tokens = np.asarray(qlora_jax.generate(model, PROMPTS, MASK, max_new_tokens=6, pad_token_id=0))
    monkeypatch.setattr(_decoder, "_reads_stacks_in_place", lambda layers: False)
    sliced = jax.jit(decode.__wrapped__)(state)
    for ours, theirs in zip(in_place, sliced):
        np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
    generate_module = importlib.import_module("qlora_jax.generate")
    generate_module._generate.clear_cache()
    np.testing.assert_array_equal(tokens, np.asarray(qlora_jax.generate(model, PROMPTS, MASK, max_new_tokens=6,
                                                                         pad_token_id=0)))
    layers = model.config.num_hidden_layers
    codes = {v.codes.shape[-1] for v in jax.tree.leaves(nnx.state(model.layers), is_leaf=lambda v: isinstance(
        v, qlora_jax.QuantizedArray)) if isinstance(v, qlora_jax.QuantizedArray)}
    assert hlo.count('custom_call_target="qlora_jax_nf4_gemv_layer"') == 2 * 7  # prefill and one step, 7 linears
    sliced_codes = [s for s in re.findall(r"= u8\[1,(\d+)\]\S* dynamic-slice\(", hlo) if int(s) in codes]
    assert not sliced_codes and layers > 1
