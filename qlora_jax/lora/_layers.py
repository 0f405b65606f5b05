"""The adapter modules. A LoRA adapter computes only ``dropout(x) @ A^T @ B^T * scaling``; it wraps
a model's linear from outside (model code never learns about LoRA)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..ops._qmatmul import LayerOfStack
from ..ops._residuals import stash, unstash
from ..quant import Int8Array, QuantizedArray
from ..sharding import constrain


class LoraParam(nnx.Param):
    """A trainable adapter weight (the only trainable kind: see ``trainable_mask``)."""


class LoraLayerMask(nnx.Variable):
    """Per stacked layer, 1.0 where the adapter applies (target rules may select some layers)."""


class UnmergedWeight(nnx.Variable):
    """The base weight as it was before ``merge_adapters(..., keep_adapters=True)`` (often a
    QuantizedArray), kept so that ``unmerge_adapters`` restores it exactly."""


def _init_a(key, shape, in_features, r, init):
    if init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / r
    bound = 1.0 / in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, in], as nn.Linear / PEFT
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoraAdapter(nnx.Module):
    """lora_A [r, in] and lora_B [out, r] (nn.Linear orientation, as PEFT saves them)."""

    def __init__(self, in_features: int, out_features: int, *, r: int, scaling: float, dropout: float, init,
                 dtype, rngs: nnx.Rngs):
        self.lora_A = LoraParam(_init_a(rngs.params(), (r, in_features), in_features, r, init).astype(dtype))
        if init is False:  # PEFT skips its init: nn.Linear's default for B too
            bound = 1.0 / r ** 0.5
            b = jax.random.uniform(rngs.params(), (out_features, r), jnp.float32, -bound, bound)
        else:
            b = jnp.zeros((out_features, r), jnp.float32)
        self.lora_B = LoraParam(b.astype(dtype))
        self.scaling = scaling
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
        self.layer_mask = nnx.data(None)  # set by apply_lora when target rules select some stacked layers

    def __call__(self, x, row_parallel: bool = False):
        a, b = self.lora_A[...], self.lora_B[...]
        # under a mesh (jax.set_mesh) gathered over fsdp, split over tensor as the base layer's
        # weight (column-parallel: B's output features; row-parallel: A's input features)
        a = constrain(a, None, "tensor" if row_parallel else None)
        b = constrain(b, None if row_parallel else "tensor", None)
        h = x
        if self.dropout is not None:
            h = self.dropout(x.astype(a.dtype))  # PEFT casts the adapter's input to lora_A's dtype
        h = _lora_product(h, *stash(h), a, b, self.scaling)
        return h if self.layer_mask is None else h * self.layer_mask[...]


def _dot(x, y, cx, cy):
    return jax.lax.dot_general(x, y, (((cx,), (cy,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _lora_product(x, x_bits, a, b, scaling):
    """``(x @ A^T) @ B^T * scaling`` with x cast to A's dtype first (PEFT's order of operations).
    Its backward is autodiff's arithmetic with the weight gradients contracted over the tokens of
    operands in their own layout: dB = (hr^T @ g)^T (a small transpose of [r, out]), dA = dhr^T @ h.
    Left to autodiff, XLA:CPU wrote g^T [out, tokens] (fp32) element by element before each dB
    product (0.4 s of a 3.1 s 1b-preset step). ``x_bits`` (``ops._residuals.stash(x)``, made by the
    caller, so that the q, k and v adapters keep one residual of their shared input) is what the
    backward keeps of x: the input in its own dtype, a bf16 one as its bits."""
    return _lora_fwd(x, x_bits, a, b, scaling)[0]


def _lora_fwd(x, x_bits, a, b, scaling):
    h = x.astype(a.dtype).reshape(-1, x.shape[-1])
    hr = _dot(h, a, 1, 1)  # [N, r]
    y = _dot(hr, b, 1, 1) * scaling
    return y.reshape(*x.shape[:-1], b.shape[0]), (x_bits, a, b, hr)


def _lora_bwd(scaling, res, g):
    x_bits, a, b, hr = res
    x, = unstash(x_bits)
    h = x.astype(a.dtype).reshape(-1, x.shape[-1])
    gs = g.reshape(-1, g.shape[-1]) * scaling  # [N, out]
    db = _dot(hr, gs, 0, 0).T.astype(b.dtype)  # [r, out] -> [out, r]
    dhr = _dot(gs, b, 1, 0)  # [N, r]
    da = _dot(dhr, h, 0, 0).astype(a.dtype)  # [r, in]
    dx = _dot(dhr, a, 1, 0).astype(x.dtype).reshape(x.shape)
    return dx, None, da, db


_lora_product.defvjp(_lora_fwd, _lora_bwd)


def _native_sum(result, x, a, b) -> bool:
    from ..kernels import cpu_nf4

    return (isinstance(x, jax.Array) and x.dtype == result.dtype == jnp.bfloat16
            and a.dtype == b.dtype == jnp.float32 and result.shape == (*x.shape[:-1], b.shape[0])
            and jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty
            and cpu_nf4.lora_available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _lora_sum_native(result, x, x_bits, a, b, scaling, round_first):
    """``result + (x @ A^T) @ B^T * scaling`` on the CPU kernels: the B product runs in the sum's pass
    (no fp32 [N, out] product written and read back); the gradient's products read the bf16
    cotangent as it is (no fp32 copy of it scaled). ``x_bits`` (``ops._residuals.stash(x)``, made
    by the caller, where the q, k and v adapters share one) is what the backward keeps of x."""
    return _lora_sum_fwd(result, x, x_bits, a, b, scaling, round_first)[0]


def _lora_sum_fwd(result, x, x_bits, a, b, scaling, round_first):
    from ..kernels import cpu_nf4

    hr = cpu_nf4.cpu_lora_down(x, a)  # [..., r] fp32
    return cpu_nf4.cpu_lora_up(hr, b.T, result, scaling=scaling, round_first=round_first), (x_bits, a, b, hr)


def _lora_sum_bwd(scaling, round_first, res, g):
    from ..kernels import cpu_nf4

    x_bits, a, b, hr = res
    x, = unstash(x_bits)
    dhr = cpu_nf4.cpu_lora_down(g, b.T, scaling=scaling)  # (g * scaling) @ B: [..., r]
    db = cpu_nf4.cpu_lora_grad(hr, g, scaling=scaling).T  # [r, out] -> [out, r]
    da = cpu_nf4.cpu_lora_grad(dhr, x)  # [r, in]
    dx = cpu_nf4.cpu_lora_up(dhr, a)  # bf16(dhr @ A), as the fp32 product cast back
    return g, dx, None, da, db


_lora_sum_native.defvjp(_lora_sum_fwd, _lora_sum_bwd)


class LoraLinear(nnx.Module):
    """``base_layer(x) + adapter(x)`` for the active adapter in the base result's dtype, as PEFT: over a
    quantized base (its 4-bit and 8-bit layers) the adapter's output is cast to that dtype first and
    then added; over a dense one (``lora.Linear``) summed in the wider dtype and cast back."""

    def __init__(self, base_layer, adapters: dict, active: str | None):
        self.base_layer = base_layer
        self.lora = nnx.Dict(adapters)
        self.active_adapter = active
        self.unmerged_weight = nnx.data(None)  # set while an adapter is merged into base_layer

    def __call__(self, x):
        result = self.base_layer(x)
        if self.active_adapter is None or self.unmerged_weight is not None:  # merged: the base has it
            return result
        adapter = self.lora[self.active_adapter]
        weight = getattr(self.base_layer, "weight", None)
        weight = weight.get_value() if isinstance(weight, nnx.Variable) else weight
        round_first = isinstance(weight, (QuantizedArray, Int8Array, LayerOfStack))
        row_parallel = getattr(self.base_layer, "row_parallel", False)
        a, b = adapter.lora_A[...], adapter.lora_B[...]
        if adapter.dropout is None and adapter.layer_mask is None and _native_sum(result, x, a, b):
            return _lora_sum_native(result, x, *stash(x), a, b, adapter.scaling, round_first)
        delta = adapter(x, row_parallel=row_parallel)
        if round_first:
            return result + delta.astype(result.dtype)
        wide = jnp.promote_types(result.dtype, delta.dtype)
        return (result.astype(wide) + delta.astype(wide)).astype(result.dtype)
