"""16-bit residuals saved as their bits (``ops._residuals``): exact round trip, one residual per
activation however many VJPs save it, and a scanned bf16 model whose layer stacks XLA:CPU keeps in
16 bits (no fp32 copy of a [layers, ...] stack before the backward loop)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.kernels import cpu_nf4
from qlora_jax.lora import LoraConfig
from qlora_jax.ops._residuals import Bits, stash, unstash
from qlora_jax.train import init_opt_state, make_optimizer, make_train_step, split_model
from test_memory_estimate import _config, _qlora_model


def test_stash_round_trip_is_exact():
    x = jax.random.normal(jax.random.key(0), (3, 70)) * 1e3
    for dtype in (jnp.bfloat16, jnp.float16):
        h = x.astype(dtype).at[0, :3].set(jnp.array([jnp.inf, -0.0, jnp.nan], dtype))
        (bits,) = stash(h)
        assert isinstance(bits, Bits) and bits.bits.dtype == jnp.uint16 and bits.dtype == dtype
        (back,) = unstash(bits)
        assert back.dtype == dtype
        np.testing.assert_array_equal(np.asarray(back).view(np.uint16), np.asarray(h).view(np.uint16))
    f, i = x, jnp.arange(4)  # other dtypes pass as they are
    assert stash(f, i)[0] is f and stash(f, i)[1] is i


def test_one_tracer_gets_one_residual():
    """Three VJPs saving the same activation (the q, k and v adapters' input) keep one residual."""
    seen = {}

    def f(x, y):
        a, b = stash(x)[0], stash(x)[0]
        seen["same"] = a.bits is b.bits
        seen["other"] = stash(y)[0].bits is not a.bits
        return x

    jax.jit(f)(jnp.ones(4, jnp.bfloat16), jnp.ones(4, jnp.bfloat16))
    assert seen == {"same": True, "other": True}


@pytest.mark.parametrize("native", [True, False], ids=["native", "xla"])
def test_scanned_bf16_layer_stacks_stay_16_bit(native, monkeypatch):
    """In the compiled train step of a scanned bf16 model, no while loop carries a bf16 or fp32
    [layers, batch, seq, ...] activation stack: the half-precision residuals travel as uint16.
    (XLA:CPU turned each bf16 stack into an fp32 copy for the backward loop, and the norms saved
    their inputs in fp32.) Both the native CPU kernels' layer (where this CPU builds them) and the
    XLA path's (the LoRA product, SwiGLU, attention and RoPE as XLA ops)."""
    if native and not (cpu_nf4.lora_available() and cpu_nf4.attention_available()):
        pytest.skip("the native CPU path's layer (its LoRA and attention kernels: AVX-512 BF16)")
    if not native:
        for name in ("lora_available", "attention_available", "swiglu_available", "rope_available"):
            monkeypatch.setattr(cpu_nf4, name, lambda: False)
    layers, b, s, r = 3, 2, 32, 8
    cfg = _config(64, 160, layers, 4, 2, 300)
    model = _qlora_model(cfg, checkpointing=False, dtype=jnp.bfloat16, abstract=False,
                         lora=LoraConfig(r=r, target_modules="all-linear"))
    parts = split_model(model)
    tx = make_optimizer(1e-4, num_training_steps=10, optim="adamw")
    step = make_train_step(parts.graphdef, tx)
    ids = jnp.ones((1, b, s), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    lowered = step.lower(parts.trainable, parts.rngs, parts.frozen, init_opt_state(tx, parts.trainable), batch)
    hlo = lowered.compile().as_text()
    carried = [line.split(" while(")[0] for line in hlo.splitlines() if " while(" in line]
    stacks = [t for head in carried for t in re.findall(rf"\b(\w+\[{layers},{b},{s}[0-9,]*\])", head)]
    # fp32 by nature: the rows' 1/RMS [..., 1] and the adapters' rank-r projections [..., r]
    fp32_own = [t for t in stacks if t.startswith("f32[") and t.endswith((",1]", f",{r}]"))]
    assert stacks and all(t.startswith("u16[") for t in stacks if t not in fp32_own), sorted(set(stacks))
