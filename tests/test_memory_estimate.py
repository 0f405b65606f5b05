"""The peak-memory estimate against the compiled train step's own memory analysis (CPU, fp32), the
saved activations against JAX's autodiff residuals (fp32 and bf16), and the estimate on an abstract
70B model.

bf16 is not held against the CPU's compiled figure: XLA's CPU backend has no bf16 arithmetic and
keeps bf16 buffers in fp32 where it computes on them (the layer scan's residual stacks stay 16-bit
only where the custom VJPs save them as uint16, ``ops._residuals``).
"""

import contextlib
import dataclasses
import io
import math
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import pytest
from flax import nnx

import qlora_jax
from qlora_jax.lora import LoraConfig, LoraParam, apply_lora
from qlora_jax.models import CausalLM, DecoderConfig
from qlora_jax.train import IGNORE_INDEX, init_opt_state, make_optimizer, make_train_step, split_model
from qlora_jax.train._loss import causal_lm_loss_sum
from qlora_jax.train._memory import MemoryEstimate, compiled_memory, estimate_memory

TOLERANCE = 0.15
MiB = 2 ** 20
ALL_LINEAR = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")


def _config(hidden, intermediate, layers, heads, kv_heads, vocab, **kw) -> DecoderConfig:
    return DecoderConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                         max_position_embeddings=4096, tie_word_embeddings=False, qkv_bias=False, o_bias=False,
                         mlp_bias=False, qk_norm=False, sliding_window=None, **kw)


def _qlora_model(cfg, *, checkpointing, dtype=jnp.float32, scan_layers=True, quantize=True, abstract=True,
                 lora=ALL_LINEAR):
    """NF4 decoder linears and LoRA, as ``from_pretrained`` + ``apply_lora`` build them; abstract
    (shapes only) unless asked."""
    def make():
        model = CausalLM(cfg, dtype=dtype, rngs=nnx.Rngs(0), scan_layers=scan_layers,
                         gradient_checkpointing=checkpointing, compute_dtype=dtype)
        if quantize:
            graphdef, state = nnx.split(model)

            def nf4(path, var):
                if path[0] == "layers" and path[-1] == "weight" and str(path[-2]).endswith("_proj"):
                    return var.replace(qlora_jax.quantize(var.get_value(), batch_dims=1 if scan_layers else 0))
                return var

            model = nnx.merge(graphdef, nnx.from_flat_state([(p, nf4(p, v)) for p, v in nnx.to_flat_state(state)]))
        return apply_lora(model, lora)

    return nnx.eval_shape(make) if abstract else make()


def _compiled_step_memory(model, batch_size, seq_length, micro_batches=1) -> int:
    """Lower and compile the real train step (donated adapters, RNG and optimizer state) and take
    the compiler's peak."""
    split = split_model(model)
    tx = make_optimizer(2e-4, num_training_steps=10)
    opt_state = jax.eval_shape(lambda t: init_opt_state(tx, t), split.trainable)
    tokens = jax.ShapeDtypeStruct((micro_batches, batch_size, seq_length), jnp.int32)
    batch = {"input_ids": tokens, "attention_mask": tokens, "labels": tokens}
    step = make_train_step(split.graphdef, tx)
    return compiled_memory(step.lower(split.trainable, split.rngs, split.frozen, opt_state, batch).compile())


def _check(estimate: MemoryEstimate, compiled: int, label: str, capsys):
    with capsys.disabled():
        print(f"\n[{label}] estimate {estimate.total / MiB:.2f} MiB vs compiled {compiled / MiB:.2f} MiB "
              f"({estimate.total / compiled:.3f}); activations {estimate.activations / MiB:.2f} MiB, "
              f"peak at {estimate.peak_phase}")
    # the activations dominate, so a wrong activation formula cannot hide behind the weights
    assert estimate.activations > 0.6 * compiled
    assert abs(estimate.total - compiled) <= TOLERANCE * compiled


SHAPES = {
    # hidden 128, intermediate 344, 2 layers, 4 heads (2 kv), vocab 512, 2 x 256 tokens: the MLP peaks
    "mlp": (_config(128, 344, 2, 4, 2, 512), 2, 256),
    # hidden 64, 4 heads (1 kv), 1 x 512 tokens: the [B, heads, S, S] scores dominate
    "attention": (_config(64, 172, 2, 4, 1, 512), 1, 512),
}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_estimate_within_15_percent_of_compiled_step(shape, checkpointing, capsys):
    cfg, batch_size, seq_length = SHAPES[shape]
    model = _qlora_model(cfg, checkpointing=checkpointing)
    estimate = estimate_memory(model, batch_size=batch_size, seq_length=seq_length)
    assert estimate.gradient_checkpointing is checkpointing
    _check(estimate, _compiled_step_memory(model, batch_size, seq_length), f"{shape}, checkpointing={checkpointing}",
           capsys)


def test_estimate_within_15_percent_qlora_settings(capsys):
    """PEFT's default targets (q_proj, v_proj) with dropout, gradient accumulation and checkpointing;
    a large vocabulary puts the peak at the loss."""
    cfg = _config(64, 176, 2, 2, 1, 4096)
    model = _qlora_model(cfg, checkpointing=True, lora=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05))
    micro, batch_size, seq_length = 2, 4, 128
    estimate = estimate_memory(model, batch_size=batch_size, seq_length=seq_length, micro_batches=micro)
    assert estimate.peak_phase == "loss"
    _check(estimate, _compiled_step_memory(model, batch_size, seq_length, micro), "q,v + dropout, 2 micro-batches",
           capsys)


def test_micro_batches_do_not_copy_the_weights(capsys):
    """Gradient accumulation with checkpointing on a weight-heavy shape: the compiled step holds no
    extra copy of the stacked layer weights (it did while the train step carried them in its
    micro-batch loop: XLA gave each layer loop inside its own copy, two more copies of the base),
    and the estimate, which counts none, is within the tolerance."""
    cfg = _config(512, 1376, 4, 8, 4, 1024)
    model = _qlora_model(cfg, checkpointing=True, lora=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    estimate = estimate_memory(model, batch_size=1, seq_length=32, micro_batches=2)
    layers = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)["layers"]))
    one, two = (_compiled_step_memory(model, 1, 32, micro_batches=k) for k in (1, 2))
    with capsys.disabled():
        print(f"\n[weights, 2 micro-batches, checkpointing] estimate {estimate.total / MiB:.2f} MiB vs compiled "
              f"{two / MiB:.2f} MiB ({estimate.total / two:.3f}); 1 micro-batch {one / MiB:.2f} MiB, "
              f"layer weights {layers / MiB:.2f} MiB")
    assert two - one < 0.5 * layers  # the accumulator and a batch, not a copy of the weights
    assert abs(estimate.total - two) <= TOLERANCE * two


def test_components_are_exact_where_they_can_be():
    """Weights, adapters and optimizer state are byte counts of the model's own state."""
    cfg, batch_size, seq_length = SHAPES["mlp"]
    model = _qlora_model(cfg, checkpointing=True)
    estimate = estimate_memory(model, batch_size=batch_size, seq_length=seq_length, micro_batches=3)

    def nbytes(tree):
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    adapters = nbytes(nnx.state(model, LoraParam))
    assert estimate.adapters == adapters
    assert estimate.base_weights == nbytes(nnx.state(model, nnx.Not(nnx.Any(LoraParam, nnx.RngState))))
    assert estimate.base_weights < 0.5 * nbytes(jax.eval_shape(  # NF4: about a quarter of fp32 for the linears
        lambda: nnx.state(CausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))))
    assert estimate.gradients == 2 * adapters  # fp32 accumulator + one micro-batch's gradient (fp32 adapters)
    assert estimate_memory(model, batch_size=batch_size, seq_length=seq_length).gradients == adapters
    tx = make_optimizer(2e-4, num_training_steps=10)
    assert estimate.optimizer_state == nbytes(jax.eval_shape(tx.init, nnx.state(model, LoraParam)))
    assert estimate_memory(model, batch_size=batch_size, seq_length=seq_length, optimizer=tx).optimizer_state \
        == estimate.optimizer_state
    assert estimate.batch >= 3 * 3 * batch_size * seq_length * 4
    parts = ("base_weights", "adapters", "gradients", "optimizer_state", "activations", "batch")
    assert estimate.total == sum(getattr(estimate, f) for f in parts)
    text = str(estimate)
    for name in ("base weights", "LoRA adapters", "gradients", "optimizer state", "activations (with checkpointing)",
                 "total (estimated peak)"):
        assert name in text
    assert "MiB" in text


def test_checkpointing_saves_and_activations_grow_with_layers():
    cfg, batch_size, seq_length = SHAPES["attention"]

    def est(layers, checkpointing, dtype=jnp.float32):
        model = _qlora_model(dataclasses.replace(cfg, num_hidden_layers=layers), checkpointing=checkpointing,
                             dtype=dtype)
        return estimate_memory(model, batch_size=batch_size, seq_length=seq_length)

    with_ckpt, without = est(4, True), est(4, False)
    assert with_ckpt.total < without.total and with_ckpt.activations < 0.5 * without.activations
    # without checkpointing every layer adds its residuals; with it, only its input [B, S, E]
    per_layer = est(4, False).saved_activations - est(2, False).saved_activations
    assert per_layer > 0 and est(6, False).saved_activations - est(4, False).saved_activations == per_layer
    assert est(6, True).saved_activations - est(4, True).saved_activations \
        == 2 * batch_size * seq_length * cfg.hidden_size * 4
    assert per_layer > 10 * batch_size * seq_length * cfg.hidden_size * 4
    # the step's setting can be overridden, and bf16 activations take less than fp32 ones
    model = _qlora_model(cfg, checkpointing=True)
    assert estimate_memory(model, batch_size=1, seq_length=512, gradient_checkpointing=False).total \
        == est(2, False).total
    assert est(2, False, jnp.bfloat16).activations < est(2, False).activations


def test_unrolled_layers_with_checkpointing_count_as_without():
    """Outside a scan XLA may schedule the recomputation right after the forward pass (on CPU it
    does: the compiled step takes as much memory as without checkpointing)."""
    cfg, batch_size, seq_length = SHAPES["mlp"]
    model = _qlora_model(cfg, checkpointing=True, scan_layers=False)
    estimate = estimate_memory(model, batch_size=batch_size, seq_length=seq_length)
    assert not estimate.gradient_checkpointing and estimate.notes and "unrolled" in str(estimate)
    without = estimate_memory(_qlora_model(cfg, checkpointing=False, scan_layers=False), batch_size=batch_size,
                              seq_length=seq_length)
    assert estimate.total == without.total


_SHORT = re.compile(r"^(bool|bf16|[fiu]\d+)\[([\d,]*)\] (.*)$")


def _residual_bytes(f, *args) -> int:
    """Bytes of what JAX's autodiff saves for ``f``'s backward pass (``print_saved_residuals``),
    leaving out its arguments and constants."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(f, *args)
    total = 0
    for line in out.getvalue().splitlines():
        m = _SHORT.match(line)
        if m is None or re.search(r"from (the argument|a constant|a literal)", m.group(3)):
            continue
        dtype, dims = m.group(1), [int(x) for x in m.group(2).split(",") if x]
        itemsize = 1 if dtype == "bool" else 2 if dtype == "bf16" else int(dtype[1:]) // 8
        total += math.prod(dims) * itemsize
    return total


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("targets", ["all-linear", None], ids=["all-linear", "q,v"])
def test_saved_activations_per_layer_are_autodiff_residuals(dtype, targets):
    """A layer's saved activations (without checkpointing) are exactly what JAX's autodiff saves for
    it, in any dtype (backend-independent: no compiler involved). Unrolled layers each broadcast
    RoPE's cos and sin anew; the scan and XLA share those."""
    batch_size, seq_length, hidden, heads = 2, 64, 64, 4
    ids = jnp.ones((batch_size, seq_length), jnp.int32)

    def per_layer(measure):
        values = []
        for layers in (1, 2):
            cfg = _config(hidden, 160, layers, heads, 2, 300)
            model = _qlora_model(cfg, checkpointing=False, dtype=dtype, scan_layers=False, quantize=False,
                                 abstract=False, lora=LoraConfig(r=8, target_modules=targets))
            values.append(measure(model))
        return values[1] - values[0]

    def autodiff(model):
        graphdef, trainable, rest = nnx.split(model, LoraParam, ...)

        def loss(trainable):
            logits = nnx.merge(graphdef, trainable, rest)(ids)
            return causal_lm_loss_sum(logits, ids, IGNORE_INDEX)[0]

        return _residual_bytes(loss, trainable)

    def estimate(model):
        return estimate_memory(model, batch_size=batch_size, seq_length=seq_length).saved_activations

    from qlora_jax.kernels import cpu_nf4

    itemsize = jnp.dtype(dtype).itemsize
    # cos and sin broadcast over heads, twice each (the jnp RoPE; the native bf16 kernel's custom
    # gradient saves the shared cos and sin themselves). The norms' custom gradient saves their weights
    # as they are (a model input, not a residual of their own)
    native_rope = dtype == jnp.bfloat16 and jax.default_backend() == "cpu" and cpu_nf4.rope_available()
    rebroadcast = 0 if native_rope else 4 * batch_size * seq_length * (hidden // heads) * itemsize
    assert per_layer(autodiff) == per_layer(estimate) + rebroadcast


def test_runs_on_an_abstract_70b_model():
    """Shapes only: a Llama-2-70B-shaped NF4 model with r=64 adapters is never materialised."""
    cfg = _config(8192, 28672, 80, 64, 8, 32000)
    model = _qlora_model(cfg, checkpointing=True, dtype=jnp.bfloat16,
                         lora=LoraConfig(r=64, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
    assert isinstance(nnx.state(model, LoraParam)["layers"]["mlp"]["up_proj"]["lora"]["default"]["lora_A"]
                      .get_value(), jax.ShapeDtypeStruct)
    with_ckpt = estimate_memory(model, batch_size=1, seq_length=2048)
    without = estimate_memory(model, batch_size=1, seq_length=2048, gradient_checkpointing=False)
    gib = 2 ** 30
    assert 32 * gib < with_ckpt.base_weights < 36 * gib  # 4.13 bits per linear weight, bf16 embeddings
    assert 2.5 * gib < with_ckpt.adapters < 3.5 * gib  # ~0.83B fp32 adapter weights
    assert with_ckpt.saved_activations >= 80 * 2048 * 8192 * 2  # every layer's input, bf16
    # checkpointing keeps one [B, S, hidden] per layer instead of every residual: about 3.2x less in
    # all where the XLA attention saves bf16 scores (it was over 4x while it saved fp32 softmax
    # buffers, 3.75x while silu's intermediates were saved too, 3.3x while the norms saved their
    # inputs in fp32); about 2.5x where the native CPU attention runs (it saves no scores, only the mask)
    from qlora_jax.train._memory import uses_native_attention

    assert with_ckpt.total < without.total / (2.4 if uses_native_attention(model) else 3.1)
    assert "GiB" in str(with_ckpt)


def test_compiled_memory_counts_arguments_outputs_and_temporaries():
    def f(x, y):
        return jnp.sin(x) @ y, x * 2

    x = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    compiled = jax.jit(f, donate_argnums=0).lower(x, x).compile()
    m = compiled.memory_analysis()
    assert compiled_memory(compiled) == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                         + m.temp_size_in_bytes)
    assert compiled_memory(compiled) >= 3 * 256 * 256 * 4  # x, y, and the matmul's result


def test_abstract_model_is_from_pretrained_without_tensors_and_info_prints_the_estimate(tmp_path, capsys):
    """``abstract_model`` has exactly the shapes and dtypes ``from_pretrained`` builds (NF4 leaves
    included), and ``qlora-jax info`` prints trainable parameters and the estimate for the run."""
    from qlora_jax import cli
    from qlora_jax.models import abstract_model, from_pretrained, write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny")
    q = qlora_jax.QuantConfig(compute_dtype="float32")
    real = from_pretrained(path, quantization=q, gradient_checkpointing=True)
    abstract = abstract_model(path, quantization=q, gradient_checkpointing=True)
    shapes = lambda m: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(m))  # noqa: E731
    assert shapes(abstract) == shapes(real)
    assert cli.main(["info", str(path), "training.per_device_train_batch_size=2", "data.max_seq_length=128",
                     "model.dtype=float32"]) == 0
    out = capsys.readouterr().out
    apply_lora(abstract, qlora_jax.LoraConfig(target_modules="all-linear"))
    est = estimate_memory(abstract, batch_size=2, seq_length=128)
    assert "trainable params: " in out and "activations (with checkpointing)" in out
    assert str(est).splitlines()[-1] in out  # the total line, the same figure
    assert "with gradient checkpointing off instead" in out
