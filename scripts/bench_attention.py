"""Attention forward + backward per layer on the CPU: the native kernels (kernels/cpu/attention.cc)
against the XLA path (models._layers.attend), bf16, causal mask, random inputs, median of 15 calls.

    python scripts/bench_attention.py B S H K D     # e.g. 4 256 8 8 64 (small), 1 512 32 4 64 (1b)
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.kernels import cpu_nf4
from qlora_jax.models._layers import attend


def median_ms(fn, *args, repeats=15):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main(b, s, h, kh, d):
    rng = np.random.default_rng(0)
    bf = jnp.bfloat16
    q, w = (jnp.asarray(rng.standard_normal((b, s, h, d)), bf) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, s, kh, d)), bf) for _ in range(2))
    mask = jnp.where(jnp.tril(jnp.ones((s, s), bool)), 0, jnp.finfo(bf).min).astype(bf)[None].repeat(b, 0)
    scale = float(np.asarray(d ** -0.5, bf))

    def xla(q, k, v):
        return attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)

    xla_fwd = jax.jit(xla)
    xla_grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(xla(q, k, v).astype(jnp.float32) * w), argnums=(0, 1, 2)))
    fwd = jax.jit(lambda q, k, v: cpu_nf4.cpu_attention(q, k, v, mask, scale=scale))
    stats = fwd(q, k, v)[1]
    bwd = jax.jit(lambda q, k, v, st: cpu_nf4.cpu_attention_bwd(q, k, v, mask, st, w, scale=scale))
    x_f, x_fb = median_ms(xla_fwd, q, k, v), median_ms(xla_grad, q, k, v)
    k_f, k_b = median_ms(fwd, q, k, v), median_ms(bwd, q, k, v, stats)
    print(f"B={b} S={s} H={h} K={kh} D={d}: XLA forward {x_f:.2f} ms, forward + backward {x_fb:.2f} ms; "
          f"kernels forward {k_f:.2f} ms, backward {k_b:.2f} ms, both {k_f + k_b:.2f} ms ({x_fb / (k_f + k_b):.1f}x)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:6]))
