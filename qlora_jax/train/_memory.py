"""Peak device memory of a QLoRA train step, estimated from shapes alone.

``estimate_memory(model, batch_size=..., seq_length=...)`` counts the buffers that the step of
``make_train_step`` holds at its peak: the frozen base (NF4 codes, absmax, nested absmax and
offsets; embeddings, norms, LM head), the LoRA adapters, the gradient buffers, the optimizer
state, the token batch, and the activations. It reads only shapes and dtypes: a model built with
``nnx.eval_shape`` will do, a 70B one included.

Activations are counted buffer by buffer from the program's structure (nothing is fitted):

* saved for the backward pass: without gradient checkpointing, each layer's residuals as JAX's
  autodiff saves them into the layer scan's stacks (the RMSNorm inputs and their rows' 1/RMS; each adapter's input
  in the activation dtype (with dropout: its dropped copy in the adapter dtype) and its rank-r
  projection; the rotated queries and keys and the values;
  the pre-softmax scores [B, heads, S, S] in the activation dtype (the attention's written-out
  backward recomputes the softmax from them; the native CPU attention, where it runs, saves the
  mask [B, S, S] and each row's softmax max and sum instead); the gate and up outputs
  [B, S, intermediate], from which swiglu's gradient recomputes silu). With checkpointing (``nothing_saveable``)
  only each layer's input [B, S, hidden] is kept.
* the working set of the busiest moment, whichever is largest: the backward pass of one layer at
  its MLP (the layer's residuals, rebuilt or sliced out of the stacks, the gradients of the down
  projection's input, of gate and up and the adapters' copies of them, and the layer's
  dequantized weights) or at its attention (the recomputed fp32 softmax, the gradient of the
  probabilities, the scores' gradient and the probabilities); or the loss (the logits in the
  activation dtype and their fp32 gradient; on one device one chunk of rows of them).

The counts follow the program's buffers as XLA keeps them after fusion (elementwise residuals of a
recomputed layer are fused into their consumers, the random bits of recomputed dropout masks stay,
the scan's stacked residuals are sliced into buffers of their own for matmuls, and so on). They
were validated against ``compiled.memory_analysis()`` of the real step on XLA's CPU backend
(``tests/test_memory_estimate.py``, fp32 models, within a few percent); other backends fuse and
schedule somewhat differently. The saved activations are exactly what JAX's autodiff saves, in any
dtype. For bf16 models the buffers are counted in bf16, as GPUs and TPUs keep them; XLA's CPU
backend, which has no bf16 arithmetic, holds some of them in fp32 instead, so it cannot check
them. ``compiled_memory`` gives the compiler's own figure for a compiled step on the current
backend.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

_F32 = 4

# Which tensor each projection reads: adapters reading the same tensor may share its saved copy.
_INPUT_OF = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
             "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_act", "lm_head": "final"}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of device memory at the train step's peak, by component (``total`` is their sum).

    base_weights: the frozen model (quantized linears with their statistics, embeddings, norms,
      LM head). adapters: the LoRA weights. gradients: one micro-batch's gradient in the adapters'
      dtype, plus the step's fp32 accumulator when there are several micro-batches.
      optimizer_state: e.g. AdamW's mu and nu. batch: the token batch (ids, mask, labels) and the
      RNG state. activations: what the backward pass keeps (``saved_activations``) plus the
      working set of the busiest moment (``peak_phase``).
      gradient_checkpointing: whether the estimate counts layers as rematerialized. notes: caveats
      that apply to this estimate.
    """

    base_weights: int
    adapters: int
    gradients: int
    optimizer_state: int
    activations: int
    saved_activations: int
    batch: int
    gradient_checkpointing: bool
    peak_phase: str = ""
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return (self.base_weights + self.adapters + self.gradients + self.optimizer_state + self.activations
                + self.batch)

    @property
    def working_set(self) -> int:
        return self.activations - self.saved_activations

    def format(self) -> str:
        """A table, one line per component, in MiB or GiB."""
        def size(b: int) -> str:
            return f"{b / 2**30:,.2f} GiB" if b >= 2**30 else f"{b / 2**20:,.2f} MiB"

        ckpt = "with" if self.gradient_checkpointing else "without"
        rows = [("base weights", self.base_weights), ("LoRA adapters", self.adapters),
                ("gradients", self.gradients), ("optimizer state", self.optimizer_state),
                ("batch", self.batch), (f"activations ({ckpt} checkpointing)", self.activations),
                ("  saved for backward", self.saved_activations),
                ("  working set" + (f" ({self.peak_phase})" if self.peak_phase else ""), self.working_set)]
        rows.append(("total (estimated peak)", self.total))
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {size(b):>12}" for name, b in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def __str__(self) -> str:
        return self.format()


def compiled_memory(compiled) -> int:
    """The compiler's own peak for a compiled step (``jax.jit(f).lower(...).compile()``), in bytes.

    ``memory_analysis()`` reports the arguments, the outputs, the outputs that alias (reuse) donated
    arguments, and the temporaries (XLA's buffer assignment packs every intermediate into one arena
    sized for the moment most of them are live). Peak = arguments + outputs - aliased + temporaries:
    everything the step holds at once. Generated code is not device memory and is left out.
    """
    m = compiled.memory_analysis()
    if m is None:
        raise ValueError("this backend gives no memory analysis for the compiled step")
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def _itemsize(dtype) -> int:
    return int(getattr(dtype, "itemsize", None) or np.dtype(dtype).itemsize)  # PRNG key dtypes have one too


def _nbytes(x) -> int:
    return sum(int(math.prod(leaf.shape)) * _itemsize(leaf.dtype) for leaf in jax.tree.leaves(x))


@dataclasses.dataclass(frozen=True)
class _Adapter:
    proj: str
    layer: int | None  # an unrolled layer's index; None for a scanned stack or outside the layers
    stacked: bool  # in every layer of the scanned stack
    in_features: int
    rank: int
    itemsize: int
    dropout: bool


def _adapters(model) -> list[_Adapter]:
    """The active adapter of every LoRA layer (a merged one computes nothing apart)."""
    from ..lora._inject import lora_modules

    found = []
    for path, m in lora_modules(model):
        name = m.active_adapter
        if name is None or m.unmerged_weight is not None or name not in m.lora:
            continue
        ad = m.lora[name]
        a = ad.lora_A.get_value()
        in_layers = path[0] == "layers"
        layer = path[1] if in_layers and isinstance(path[1], int) else None
        found.append(_Adapter(str(path[-1]), layer, in_layers and layer is None, int(a.shape[-1]), int(a.shape[-2]),
                              _itemsize(a.dtype), ad.dropout is not None))
    return found


def _adapter_residuals(adapters: list[_Adapter], n: int, act: int) -> dict[str, int]:
    """Bytes the adapters save, by the tensor they read: each adapter's rank-r projection (for dB)
    and its input (for dA). Without dropout the input is saved in its own (activation) dtype and
    cast to the adapter dtype in the backward (``lora._layers._lora_product``), so adapters reading
    the same tensor share it; with dropout each keeps its dropped copy in the adapter dtype and
    the mask."""
    out: dict[str, int] = {}
    shared: dict[str, int] = {}
    for ad in adapters:
        group = _INPUT_OF.get(ad.proj, ad.proj)
        own = n * ad.rank * ad.itemsize
        if ad.dropout:
            own += n * ad.in_features * (ad.itemsize + 1)
        else:
            shared[group] = n * ad.in_features * act
        out[group] = out.get(group, 0) + own
    for group, b in shared.items():
        out[group] = out.get(group, 0) + b
    return out


@dataclasses.dataclass(frozen=True)
class _Layer:
    """Bytes of one decoder layer's buffers in the backward pass."""

    saved: int  # what autodiff saves for it (its slice of the scan's residual stacks)
    sliced: int  # without checkpointing: its residuals read out of the stacks as matmul operands
    rebuilt_attention: int  # with checkpointing: the recomputed attention's residuals
    rebuilt_mlp: int  # with checkpointing: the recomputed MLP's residuals
    probabilities: int  # the probabilities [B, heads, S, S]
    mlp_work: int  # gradient temporaries of the MLP's backward pass
    attention_work: int  # gradient temporaries of the attention's backward pass
    dropout_bits: int  # with checkpointing and dropout: the random bits of the recomputed masks


def uses_native_attention(model) -> bool:
    """Whether the model's attention runs in the native CPU kernels here (``models._layers.attend_native``:
    CPU with AVX-512 BF16, bf16, no mesh, kernel "auto" or "cpu")."""
    from ..models._layers import Attention, native_attention_takes

    cfg = model.config
    kernel = next((m.kernel for _, m in nnx.iter_graph(model) if isinstance(m, Attention)), "auto")
    q = jax.ShapeDtypeStruct((1, 1, cfg.num_attention_heads, cfg.head_dim), model.dtype)
    k = jax.ShapeDtypeStruct((1, 1, cfg.num_key_value_heads, cfg.head_dim), model.dtype)
    return native_attention_takes(q, k, kernel)


def _layer_buffers(cfg, b: int, s: int, act: int, adapters: list[_Adapter], quantized: bool,
                   native_attention: bool = False) -> _Layer:
    n = b * s
    e, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    h, k = cfg.num_attention_heads, cfg.num_key_value_heads
    ad = _adapter_residuals(adapters, n, act)
    wide = max([a.itemsize for a in adapters] + [act])  # the adapters' dtype (fp32 master weights)
    projs = {a.proj for a in adapters}
    scores = b * h * s * s  # [B, heads, S, S]
    norm = n * e * act + n * _F32  # RMSNorm: its input in the activation dtype and the rows' 1/RMS [N, 1]
    qkv = n * (h + 2 * k) * d * act + (n * (h + k) * (d * act + _F32) if cfg.qk_norm else 0)
    attention = (norm + ad.get("attn_in", 0) + ad.get("attn_out", 0)
                 + qkv)  # rotated queries and keys, values (and the q_norm / k_norm inputs with their 1/RMS)
    # the attention's written-out backward (models._layers._attend) saves the pre-softmax scores in
    # the activation dtype and recomputes the softmax from them
    softmax = scores * act
    if native_attention:  # the native kernels save the mask [B, S, S] and each row's (max, sum), no scores
        softmax = b * s * s * act + b * h * s * 2 * _F32
    mlp_inputs = norm + ad.get("mlp_in", 0) + ad.get("mlp_act", 0)
    mlp = mlp_inputs + 2 * n * i * act  # gate and up outputs (swiglu's gradient recomputes silu from them)
    # Recomputed inside the backward pass, elementwise residuals are fused into their consumers: the
    # MLP keeps the matmul outputs of gate and up (base and adapter apart).
    n_gate_up = ("gate_proj" in projs) + ("up_proj" in projs)
    rebuilt_mlp = mlp_inputs + n * i * (2 * act + n_gate_up * wide)
    # A layer's backward pass dequantizes all its weights up front (XLA schedules the dequantization,
    # which needs only the weights, early; when recomputing, the forward and backward matmuls share
    # it), and each stays live until its last matmul transpose.
    dense_attention = 2 * (h + k) * d * e * act if quantized else 0
    dense_mlp = 3 * i * e * act if quantized else 0
    # MLP backward, at gate and up: the down projection's input gradient (base and adapter matmuls),
    # the gradients of gate and up, and for each adapted gate / up the adapter's scaled gradient and
    # its transposed matmul operand ([N, I] each); the incoming gradient [N, E]; the dequantized
    # weights of the whole layer.
    lora_terms = ("down_proj" in projs) + 2 * n_gate_up
    mlp_work = n * i * (3 * act + lora_terms * wide) + n * e * act + dense_attention + dense_mlp
    # Attention backward (written out, models._layers._attend): the softmax recomputed in fp32 from
    # the saved scores, the gradient of the probabilities (fp32), the scores' gradient and the
    # probabilities in the activation dtype for the two matmuls; the gradients of the queries,
    # keys and values; the incoming gradient and the residual stream's; the attention's
    # dequantized weights.
    attention_work = (scores * (2 * _F32 + 2 * act) + n * (h + 2 * k) * d * act + 2 * n * e * act
                      + dense_attention)
    if native_attention:  # the kernels' scratch is their own (per thread, a block of rows), not XLA's
        attention_work -= scores * (2 * _F32 + 2 * act)
    # A dropout mask comes from threefry2x32, whose two uint32 outputs [N, in] its consumers xor
    # and compare: recomputed, they stay live through the layer's backward pass.
    bits = sum(2 * n * a.in_features * 4 for a in adapters if a.dropout)
    return _Layer(saved=attention + softmax + mlp,
                  sliced=softmax + 2 * norm + ad.get("attn_in", 0) + ad.get("attn_out", 0) + ad.get("mlp_in", 0),
                  rebuilt_attention=attention + softmax, rebuilt_mlp=rebuilt_mlp,
                  probabilities=0 if native_attention else scores * act,
                  mlp_work=mlp_work, attention_work=attention_work, dropout_bits=bits)


def _checkpointing(model, gradient_checkpointing) -> tuple[bool, tuple[str, ...]]:
    """(layers counted as rematerialized?, notes)."""
    policy = getattr(model, "gradient_checkpointing", None) if gradient_checkpointing is None \
        else gradient_checkpointing
    if policy in (None, False, "everything_saveable"):
        return False, ()
    if policy not in (True, "nothing_saveable"):
        return False, (f"checkpoint policy {policy!r} saves part of each layer: counted as no checkpointing "
                       "(an upper bound)",)
    if not getattr(model, "scan_layers", True):
        # jax-ml/jax#20763: outside a scan XLA may schedule the recomputation early (on CPU it does).
        return False, ("layers are unrolled (scan_layers=False): XLA may schedule the recomputation early, "
                       "so the figure without checkpointing is given; scan_layers=True makes it effective",)
    return True, ()


def estimate_memory(model, *, batch_size: int, seq_length: int, micro_batches: int = 1,
                    gradient_checkpointing: bool | str | None = None, optimizer: Any = "adamw") -> MemoryEstimate:
    """Estimate the peak device memory of one ``make_train_step`` step on ``model`` (LoRA applied)
    for batches of ``micro_batches`` x ``batch_size`` sequences of ``seq_length`` tokens.

    Only shapes and dtypes are read: ``model`` may be abstract (``nnx.eval_shape``). The
    activations are in ``model.dtype``; a different quantization compute dtype is not counted.

    Args:
      model: a CausalLM, usually with adapters from ``apply_lora``.
      batch_size, seq_length: one micro-batch's shape.
      micro_batches: gradient accumulation steps (more than one adds the fp32 gradient
        accumulator).
      gradient_checkpointing: None takes the model's setting; True / False or a
        ``jax.checkpoint_policies`` name overrides it. Policies other than ``nothing_saveable``
        and ``everything_saveable`` save part of each layer and are estimated as no checkpointing
        (an upper bound); so are unrolled layers (see ``MemoryEstimate.notes``).
      optimizer: a ``training.optim`` name (``adamw``: mu and nu in the adapters' dtype;
        ``adamw_8bit``; ``paged_adamw_32bit`` / ``paged_adamw_8bit``: a paged state counts one
        chunk on the device), "sgd" (no state), or an optax
        ``GradientTransformation`` whose state is sized by ``jax.eval_shape``.
    """
    from ..lora import LoraParam
    from ..quant import is_quantized

    cfg = model.config
    b, s, m = int(batch_size), int(seq_length), int(micro_batches)
    if min(b, s, m) < 1:
        raise ValueError(f"batch_size={batch_size}, seq_length={seq_length} and micro_batches={micro_batches} "
                         "must be positive")
    n = b * s
    act = _itemsize(model.dtype)
    adapter_bytes = base = rng = trainable_numel = 0
    quantized = False
    for _, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        quantized = quantized or is_quantized(value)
        if isinstance(var, LoraParam):
            adapter_bytes += _nbytes(value)
            trainable_numel += int(math.prod(value.shape))
        elif isinstance(var, nnx.RngState):
            rng += _nbytes(value)
        else:
            base += _nbytes(value)
    # make_train_step: one micro-batch's gradient in the adapters' dtype and, when there are several
    # micro-batches, the fp32 accumulator (XLA folds a single-trip accumulation loop away).
    gradients = adapter_bytes + (trainable_numel * _F32 if m > 1 else 0)
    notes: tuple[str, ...] = ()
    if isinstance(optimizer, str) and optimizer != "sgd":
        from ._optim import OPTIMIZERS, make_optimizer

        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; expected 'sgd' or one of {OPTIMIZERS}")
        optimizer = make_optimizer(1e-4, num_training_steps=1, optim=optimizer)
    if optimizer in ("sgd", None):
        opt = 0
    elif hasattr(optimizer, "init"):
        from ._paged import PagedState

        state = jax.eval_shape(optimizer.init, nnx.state(model, LoraParam))
        paged = [c for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, PagedState))
                 if isinstance(node, PagedState) for c in node.chunks]
        opt = _nbytes(state)
        if paged:  # in host memory between steps; one chunk at a time on the device
            host = sum(_nbytes(c) for c in paged)
            opt = opt - host + max(_nbytes(c) for c in paged)
            notes += (f"paged optimizer: {host / 2**20:,.1f} MiB of state in host memory between steps, at most one "
                      f"chunk ({opt / 2**20:,.2f} MiB) on the device during the update",)
    else:
        raise ValueError(f"optimizer={optimizer!r} is not supported; expected 'adamw', 'sgd', an `optim` name or an "
                         "optax GradientTransformation")
    batch = 3 * m * n * 4 + rng  # input_ids, attention_mask, labels: int32

    remat, remat_notes = _checkpointing(model, gradient_checkpointing)
    notes += remat_notes
    adapters = _adapters(model)
    native = uses_native_attention(model)
    layers = [_layer_buffers(cfg, b, s, act, [a for a in adapters if a.proj != "lm_head"
                                              and (a.stacked or (a.layer == li and a.layer is not None))], quantized,
                              native)
              for li in range(cfg.num_hidden_layers)]
    head = _adapter_residuals([a for a in adapters if a.layer is None and not a.stacked], n, act)
    # Outside the layers: RoPE's cos and sin broadcast over heads [B, S, 1, D] (two uses each), the
    # final norm's fp32 input, adapters on the LM head.
    outside = 4 * n * cfg.head_dim * act + n * cfg.hidden_size * _F32 + sum(head.values())
    if remat:
        saved = cfg.num_hidden_layers * n * cfg.hidden_size * act + outside
    else:
        saved = sum(x.saved for x in layers) + outside
    # The backward pass of one layer, at its MLP and at its attention. With checkpointing the
    # layer's residuals are rebuilt first; without, they sit in the scan's stacks (all layers'
    # until the backward loop ends) and the layer at hand slices its matmul operands out of them
    # (unrolled layers read them in place).
    working, phase = 0, ""
    for x in layers:
        if remat:
            mlp_phase = x.rebuilt_attention + x.rebuilt_mlp + x.mlp_work + x.dropout_bits
            att_phase = x.rebuilt_attention - x.probabilities + x.attention_work + x.dropout_bits
        else:
            mlp_phase = (x.sliced if getattr(model, "scan_layers", True) else 0) + x.mlp_work
            att_phase = x.attention_work
        for value, name in ((mlp_phase, "layer backward, MLP"), (att_phase, "layer backward, attention")):
            if value > working:
                working, phase = value, name
    # The loss: the logits in the activation dtype and their fp32 gradient (softmax minus one-hot;
    # the fp32 copy, log-sum-exp and softmax are fused into these two), and the final hidden state;
    # on one device the train step's head runs in chunks of rows (ops.linear_cross_entropy_sum
    # with grad_scale), one chunk's logits at a time.
    # (a dense head only: an adapted or quantized one makes its whole logits)
    from ..models._layers import Linear
    from ..ops._head import _chunk_rows

    head = getattr(model, "lm_head", None)
    dense_head = head is None or (type(head) is Linear and head.bias is None
                                  and not is_quantized(head.weight.get_value()))
    chunked = dense_head and jax.device_count() == 1 and jax.sharding.get_abstract_mesh().empty
    rows = _chunk_rows(n, cfg.vocab_size, act) if chunked else n
    loss = rows * cfg.vocab_size * (act + _F32) + 2 * n * cfg.hidden_size * act
    if loss > working:
        working, phase = loss, "loss"
    return MemoryEstimate(base_weights=base, adapters=adapter_bytes, gradients=gradients, optimizer_state=opt,
                          activations=saved + working, saved_activations=saved, batch=batch,
                          gradient_checkpointing=remat, peak_phase=phase, notes=notes)
