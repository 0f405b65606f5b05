"""LLM.int8() linear: qlora_jax's ``qmatmul`` on an Int8Array against bitsandbytes' Linear8bitLt.

    python scripts/bench_int8.py [--shapes 2048x2048,5632x2048,2048x5632] [--rows 1,16,512]
                                 [--dtype bfloat16] [--repeats 7]

Each shape is a weight [out, in]; x is [rows, in] with one outlier column (|x| = 8 > 6.0, the
default threshold), so both stacks run the decomposition. Columns:
- forward: qlora_jax's qmatmul (MatMul8bitLt's semantics) vs Linear8bitLt in eval mode (bitsandbytes
  on CPU runs MatMul8bitLt there: int8 x int8 via torch._int_mm);
- forward + backward (dx): ours (the same decomposition, dx = dy @ dequantized W) vs Linear8bitLt in
  training mode, which on CPU is MatMul8bitFp (dequantize + a dense linear, no int8 product).
Median of --repeats after a warm-up (compilation excluded), same process, same tensors. Prints a
Markdown table for docs/benchmarks.md.
"""

import argparse
import datetime
import platform
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb

import qlora_jax
from qlora_jax.bench import median_seconds
from qlora_jax.ops import qmatmul


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="2048x2048,5632x2048,2048x5632")
    p.add_argument("--rows", default="1,16,512")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # MatMul8bitLt warns of the float16 cast per call
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"bitsandbytes {bnb.__version__}, {a.dtype}\n")
    print("| weight [out, in] | rows | forward: qlora_jax ms | bnb eval ms | ratio | fwd+bwd: qlora_jax ms | "
          "bnb train ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    tdt = getattr(torch, a.dtype)
    for shape in [tuple(int(d) for d in s.split("x")) for s in a.shapes.split(",")]:
        n, k = shape
        w = torch.randn(shape) * 0.02
        lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
        lin.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        lin = lin.to("cpu")
        q = qlora_jax.quantize(jnp.asarray(w.numpy()), quant_type="int8")
        fwd = jax.jit(lambda x, q: qmatmul(x, q))
        def fwd_bwd(x, dy, q):
            y, vjp = jax.vjp(lambda x: qmatmul(x, q), x)
            return y, vjp(dy)[0]

        fwd_bwd = jax.jit(fwd_bwd)
        for m in [int(r) for r in a.rows.split(",")]:
            x = torch.randn(m, k)
            x[:, 7] = 8.0  # one outlier column
            x = x.to(tdt)
            dy = torch.randn(m, n).to(tdt)
            xj = jnp.asarray(x.float().numpy()).astype(a.dtype)
            dyj = jnp.asarray(dy.float().numpy()).astype(a.dtype)
            np.testing.assert_allclose(np.asarray(fwd(xj, q).astype(jnp.float32)),
                                       lin.eval()(x).detach().float().numpy(), rtol=2e-2, atol=2e-2)

            def bnb_eval():
                with torch.no_grad():
                    lin.eval()(x)

            def bnb_train():
                xi = x.detach().requires_grad_(True)
                lin.train()(xi).backward(dy)

            ours_f = median_seconds(lambda: fwd(xj, q).block_until_ready(), a.repeats)
            theirs_f = median_seconds(bnb_eval, a.repeats)
            ours_b = median_seconds(lambda: jax.block_until_ready(fwd_bwd(xj, dyj, q)), a.repeats)
            theirs_b = median_seconds(bnb_train, a.repeats)
            print(f"| {n}x{k} | {m} | {ours_f * 1e3:.2f} | {theirs_f * 1e3:.2f} | {theirs_f / ours_f:.2f}x | "
                  f"{ours_b * 1e3:.2f} | {theirs_b * 1e3:.2f} | {theirs_b / ours_b:.2f}x |")
    print("\nratio: bitsandbytes' time / qlora_jax's (above 1: qlora_jax faster)")


if __name__ == "__main__":
    main()
