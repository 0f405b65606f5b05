"""Decoder hyper-parameters from transformers configs, and RoPE against transformers' own."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from qlora_jax.models import DecoderConfig, apply_rope, rope_cos_sin, rope_inv_freq

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def test_llama_fields():
    c = DecoderConfig.from_hf(transformers.LlamaConfig(**SMALL, rms_norm_eps=1e-5, tie_word_embeddings=True))
    assert (c.model_type, c.head_dim, c.num_key_value_heads, c.rms_norm_eps) == ("llama", 16, 2, 1e-5)
    assert c.tie_word_embeddings and not c.qkv_bias and not c.qk_norm and c.sliding_window is None
    assert c.rope_theta == 10000.0 and c.rope_scaling is None


def test_mistral_qwen2_qwen3_fields():
    m = DecoderConfig.from_hf(transformers.MistralConfig(**SMALL, sliding_window=32))
    assert m.sliding_window == 32 and not m.qkv_bias
    q2 = DecoderConfig.from_hf(transformers.Qwen2Config(**SMALL))
    assert q2.qkv_bias and not q2.o_bias and q2.sliding_window is None
    q3 = DecoderConfig.from_hf(transformers.Qwen3Config(**SMALL, head_dim=32))
    assert q3.qk_norm and q3.head_dim == 32 and not q3.qkv_bias


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported; supported architectures: "
                                         "llama, mistral, qwen2, qwen3"):
        DecoderConfig.from_hf(transformers.GPT2Config())


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope", [None, LLAMA3, {"rope_type": "linear", "factor": 4.0}], ids=["default", "llama3", "linear"])
@pytest.mark.parametrize("head_dim,theta", [(64, 10000.0), (128, 500000.0)])
def test_inv_freq_matches_transformers(rope, head_dim, theta):
    params = {"rope_theta": theta, **(rope or {"rope_type": "default"})}
    hf = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, rope_parameters=params,
                                  max_position_embeddings=131072)
    cfg = DecoderConfig.from_hf(hf)
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_parameters)
    if rope is None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        theirs, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    # The unscaled frequencies are correctly rounded; torch's fp32 pow lands up to 4 ulps away
    # (seen at theta 5e5, head_dim 128), and the scaling arithmetic carries that difference along.
    exact = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    if rope is None:
        np.testing.assert_array_equal(ours, exact)
    ulps = np.abs(ours - theirs.numpy()) / np.spacing(theirs.numpy())
    assert ulps.max() <= 4, ulps.max()


def test_apply_rope_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    rot = LlamaRotaryEmbedding(hf)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 64, generator=g)  # [batch, heads, seq, head_dim] (transformers' layout)
    k = torch.randn(2, 4, 7, 64, generator=g)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 3, 4]])  # the second row left-padded
    cos_t, sin_t = rot(q, pos)
    q_t, k_t = apply_rotary_pos_emb(q, k, cos_t, sin_t)
    cos, sin = rope_cos_sin(jnp.asarray(pos.numpy()), rope_inv_freq(64, 10000.0))
    np.testing.assert_allclose(np.asarray(cos), cos_t.numpy(), rtol=1e-6, atol=1e-6)
    ours_q = apply_rope(jnp.asarray(q.numpy()).transpose(0, 2, 1, 3), cos, sin)  # ours: [batch, seq, heads, dim]
    np.testing.assert_allclose(np.asarray(ours_q).transpose(0, 2, 1, 3), q_t.numpy(), rtol=1e-5, atol=1e-6)


def test_positions_from_padding_masks_and_packed_segment_ids():
    from qlora_jax.models._decoder import position_ids_from_mask

    masks = np.array([[0, 0, 1, 1, 1, 1],    # left padding: transformers' cumsum(mask) - 1 on the tokens
                      [1, 1, 1, 1, 0, 0],    # right padding
                      [1, 0, 1, 1, 0, 1],    # holes in a 0/1 mask: one sequence, as cumsum
                      [1, 1, 2, 2, 2, 0],    # packed: positions restart per segment
                      [1, 2, 3, 3, 0, 0]])
    pos = np.asarray(position_ids_from_mask(masks))
    ref = np.cumsum(masks[:3], axis=1) - 1
    assert (pos[:3][masks[:3] > 0] == ref[masks[:3] > 0]).all()
    assert pos[3].tolist()[:5] == [0, 1, 0, 1, 2] and pos[4].tolist()[:4] == [0, 0, 0, 1]
    # padding: 0 before the first token, counting on after a token (a right-padded row: arange,
    # transformers' forward without positions)
    assert pos.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5], [0, 1, 1, 2, 3, 3],
                            [0, 1, 0, 1, 2, 3], [0, 0, 0, 1, 2, 3]]
