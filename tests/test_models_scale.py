"""7B-shaped models on abstract inputs: lowering and compilation without spending memory."""

import time

import jax
import jax.numpy as jnp
from flax import nnx

import qlora_jax
from qlora_jax.models import CausalLM, DecoderConfig
from qlora_jax.quant import QuantizedArray

LLAMA2_7B = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_attention_heads=32, num_key_value_heads=32, head_dim=128, rms_norm_eps=1e-5,
                 rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False,
                 qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False, sliding_window=None)


def _abstract_nf4_model(num_layers):
    cfg = DecoderConfig(num_hidden_layers=num_layers, **LLAMA2_7B)
    model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), compute_dtype=jnp.bfloat16,
                                            gradient_checkpointing=True))
    graphdef, state = nnx.split(model)

    def quantize_linears(path, var):
        if path[0] == "layers" and path[-1] == "weight" and str(path[-2]).endswith("_proj"):
            return var.replace(jax.eval_shape(lambda w: qlora_jax.quantize(w, batch_dims=1), var.get_value()))
        return var

    flat = [(p, quantize_linears(p, v)) for p, v in nnx.to_flat_state(state)]
    return graphdef, nnx.from_flat_state(flat)


def _lower(num_layers, seq=2048):
    graphdef, state = _abstract_nf4_model(num_layers)

    def loss(state, ids):
        return nnx.merge(graphdef, state)(ids).astype(jnp.float32).mean()

    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    return jax.jit(loss).lower(state, ids), state


def test_7b_nf4_model_lowers_and_compiles_with_constant_program_size(capsys):
    t0 = time.perf_counter()
    lowered32, state = _lower(32)
    compiled = lowered32.compile()
    seconds = time.perf_counter() - t0
    q = state["layers"]["self_attn"]["q_proj"]["weight"].get_value()
    assert isinstance(q, QuantizedArray) and q.shape == (32, 4096, 4096)
    report = qlora_jax.storage_report(state)
    assert 6.7e9 < report.total_params < 6.8e9 and abs(report.quantized_bits_per_param - 4.127) < 0.01
    lowered4, _ = _lower(4)
    # layers are scanned: the program does not grow with depth
    assert len(lowered32.as_text()) < 1.05 * len(lowered4.as_text())
    with capsys.disabled():
        print(f"\n[7B-shaped NF4 Llama, 32 layers, seq 2048] lower+compile: {seconds:.1f} s; "
              f"params {report.total_params:,} stored in {report.total_bytes / 2**30:.2f} GiB")
    assert compiled.memory_analysis() is not None
