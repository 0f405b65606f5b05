"""Logits of the Flax decoders against transformers (eager attention) on the same tiny checkpoints."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import qlora_jax
from qlora_jax.models import position_ids_from_mask

from bnb_ref import hf_model_on_our_base

SMALL = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "llama3-rope-tied": lambda: transformers.LlamaConfig(
        **SMALL, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-sliding": lambda: transformers.MistralConfig(**SMALL, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=32),
}


def _hf_model(name, path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[name]()).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that every weight matters
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                p.copy_(1 + 0.1 * torch.randn_like(p) if n.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, _hf_model(request.param, path), path


def _inputs():
    ids = np.random.default_rng(0).integers(3, 160, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0  # the second prompt left-padded by three
    return ids, mask


def _max_rel(ours, theirs):
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_fp32_logits_match_transformers(checkpoint, scan_layers):
    name, hf, path = checkpoint
    model = qlora_jax.from_pretrained(path, scan_layers=scan_layers)
    ids, mask = _inputs()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids)))
    assert ours.shape == (2, 9, 160)
    assert _max_rel(ours, theirs) < 1e-5, name
    # With padding: transformers' generate passes positions counted over the real tokens.
    pos = np.asarray(position_ids_from_mask(jnp.asarray(mask)))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    valid = mask.astype(bool)
    assert _max_rel(ours[valid], theirs[valid]) < 1e-5, name


def test_nf4_model_matches_transformers_on_dequantized_weights(checkpoint):
    """NF4: our dequantized weights are bitsandbytes' (tests/test_quant_bnb.py); with them put into
    the transformers model, the logits agree to fp32 rounding."""
    name, hf, path = checkpoint
    model = qlora_jax.from_pretrained(path, quantization=qlora_jax.QuantConfig(compute_dtype="float32"))
    q = model.layers.self_attn.q_proj.weight.get_value()
    assert isinstance(q, qlora_jax.QuantizedArray) and q.batch_shape == (3,)
    assert not isinstance(model.embed_tokens.get_value(), qlora_jax.QuantizedArray)
    deq = hf_model_on_our_base(model, path).eval()
    ids, _ = _inputs()
    with torch.no_grad():
        theirs = deq(torch.tensor(ids)).logits.numpy()
    assert _max_rel(np.asarray(model(jnp.asarray(ids))), theirs) < 1e-5, name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute_matches_transformers_in_that_dtype(checkpoint, dtype):
    """Both libraries in the same half dtype: agreement to that dtype's rounding (fp16: 11 bits,
    bf16: 8 bits of mantissa, accumulated over three layers)."""
    name, _, path = checkpoint
    model = qlora_jax.from_pretrained(path, dtype=getattr(jnp, dtype))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                           attn_implementation="eager").eval()
    ids, _ = _inputs()
    ours = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.float().numpy()
    assert _max_rel(ours, theirs) < (2e-2 if dtype == "bfloat16" else 3e-3), name


def test_shardings_place_each_leaf(tmp_path):
    _hf_model("llama", tmp_path)
    device = jax.devices()[0]
    seen = []

    def place(key, value):
        seen.append(key)
        return jax.sharding.SingleDeviceSharding(device)

    model = qlora_jax.from_pretrained(tmp_path, quantization=qlora_jax.QuantConfig(), shardings=place)
    assert "model.layers.2.mlp.down_proj.weight" in seen and "model.embed_tokens.weight" in seen
    leaf = model.layers.mlp.down_proj.weight.get_value().codes
    assert leaf.sharding.device_set == {device}


def test_loading_errors(tmp_path):
    hf = _hf_model("llama", tmp_path / "ok")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        qlora_jax.from_pretrained(tmp_path / "gpt2")
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    bad = dict(state)
    bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    (tmp_path / "bad").mkdir()
    hf.config.save_pretrained(tmp_path / "bad")
    save_file(bad, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(3, 3\); the model "
                                         r"\(llama\) expects \(112, 64\)"):
        qlora_jax.from_pretrained(tmp_path / "bad")
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    save_file(missing, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) the model needs, e.g. \['model.norm.weight'\]"):
        qlora_jax.from_pretrained(tmp_path / "bad")
    extra = {**state, "model.extra.weight": torch.zeros(2)}
    save_file(extra, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        qlora_jax.from_pretrained(tmp_path / "bad")
    assert any("model.extra.weight" in str(x.message) for x in w)
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read safetensors file .*model.safetensors"):
        qlora_jax.from_pretrained(tmp_path / "bad")


def test_gradient_checkpointing_policy(tmp_path):
    from flax import nnx

    _hf_model("llama", tmp_path)
    ids = jnp.asarray(_inputs()[0])
    plain = qlora_jax.from_pretrained(tmp_path)
    remat = qlora_jax.from_pretrained(tmp_path, gradient_checkpointing="dots_saveable")
    np.testing.assert_array_equal(np.asarray(plain(ids)), np.asarray(remat(ids)))

    def grads(model):
        graphdef, state = nnx.split(model)
        loss = lambda s: jnp.mean(nnx.merge(graphdef, s)(ids) ** 2)
        return jax.grad(loss)(state), jax.make_jaxpr(jax.grad(loss))(state)

    (g_plain, jaxpr_plain), (g_remat, jaxpr_remat) = grads(plain), grads(remat)
    assert "remat" in str(jaxpr_remat) and "remat" not in str(jaxpr_plain)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
        # recomputed activations fuse differently: fp32 rounding, relative to the gradient's scale
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * float(np.abs(a).max()))
    with pytest.raises(ValueError, match="gradient_checkpointing='everything' is not a jax.checkpoint_policies name"):
        qlora_jax.from_pretrained(tmp_path, gradient_checkpointing="everything")


def test_prequantized_bitsandbytes_checkpoint_loads_without_requantizing(tmp_path):
    """A checkpoint transformers saved in 4 bits loads as those exact bytes; its logits equal those
    of our own NF4 quantization of the original checkpoint (up to the nested codes' CPU lookup-table
    steps, which shift an absmax by one dynamic-map step at most)."""
    from safetensors import safe_open

    src = tmp_path / "src"
    _hf_model("qwen2", src)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bnb_model = transformers.AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, device_map="cpu")
    bnb_model.save_pretrained(tmp_path / "bnb")
    loaded = qlora_jax.from_pretrained(tmp_path / "bnb")
    w = loaded.layers.self_attn.q_proj.weight.get_value()
    assert isinstance(w, qlora_jax.QuantizedArray) and w.double_quant and w.batch_shape == (3,)
    with safe_open(tmp_path / "bnb" / "model.safetensors", "np") as f:
        for i in range(3):
            prefix = f"model.layers.{i}.self_attn.q_proj.weight"
            ours = qlora_jax.to_bnb_state(jax.tree.map(lambda x: x[i], w), prefix=prefix)
            for k, v in ours.items():
                assert v.tobytes() == f.get_tensor(k).tobytes(), k
    requantized = qlora_jax.from_pretrained(src, quantization=qlora_jax.QuantConfig(compute_dtype="float32"))
    ids, _ = _inputs()
    a, b = np.asarray(loaded(jnp.asarray(ids))), np.asarray(requantized(jnp.asarray(ids)))
    # a one-step nested code difference moves one block's absmax by at most one dynamic-map step
    # (<1% of it); seen here: 5e-5
    assert _max_rel(a, b) < 1e-3
    with pytest.raises(ValueError, match="is already quantized"):
        qlora_jax.from_pretrained(tmp_path / "bnb", quantization=qlora_jax.QuantConfig(quant_type="fp4"))
