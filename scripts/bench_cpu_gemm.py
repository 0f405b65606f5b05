"""The CPU GEMM kernel for training-sized NF4 products against XLA's dequantize + dot and torch's dense matmul.

    python scripts/bench_cpu_gemm.py [--shapes 512x2048x2048,512x5632x2048,512x2048x5632] [--repeats 7]

Each shape is rows x out x in: x [rows, in] bfloat16 times an NF4 weight [out, in] (double
quantization). Forward (x @ W^T) and backward (dy @ W) through ``cpu_nf4.cpu_gemm``, each checked
against its pure-jnp twin; beside them the same products through qlora_jax's XLA path (dequantize
to bf16, one dot with fp32 accumulation) and, as the ceiling the reference reaches, torch's dense
bf16 ``linear`` on an already-dequantized weight (bitsandbytes on CPU trains by dequantizing, then
such a matmul). Median of --repeats after a warm-up, same process. Prints a Markdown table.
"""

import argparse
import datetime
import platform

import jax
import jax.numpy as jnp
import numpy as np
import torch

import qlora_jax
from qlora_jax.bench import median_seconds
from qlora_jax.kernels import cpu_nf4
from qlora_jax.quant._array import dequantize_absmax
from qlora_jax.quant._tables import CODE_TABLES


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="512x2048x2048,512x5632x2048,512x2048x5632,1024x512x512,1024x1376x512,"
                                       "1024x512x1376")
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    if not cpu_nf4.gemm_available():
        raise SystemExit(f"the GEMM kernel is not available here: {cpu_nf4.unavailable_reason() or 'neither AVX-512 BF16 nor AVX2 + FMA'}")
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, jax {jax.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), bfloat16, GFLOP/s (2 * rows * out * in)\n")
    print("| rows x out x in | forward: kernel / XLA path / torch dense "
          "| backward (dx): kernel / XLA path / torch dense |")
    print("|---|---|---|")
    for m, n, k in [tuple(int(d) for d in s.split("x")) for s in a.shapes.split(",")]:
        q = qlora_jax.quantize(jax.random.normal(jax.random.key(0), (n, k), jnp.float32))
        ops = (q.codes, dequantize_absmax(q), jnp.asarray(CODE_TABLES["nf4"]))
        w = qlora_jax.dequantize(q, jnp.bfloat16)
        wt = torch.from_numpy(np.array(w.astype(jnp.float32))).to(torch.bfloat16)
        cells = []
        for transpose in (False, True):
            x = jax.random.normal(jax.random.key(1), (m, n if transpose else k), jnp.float32).astype(jnp.bfloat16)
            kw = dict(n=n, k=k, blocksize=q.blocksize, transpose=transpose)
            ours = jax.jit(lambda x, *o, kw=kw: cpu_nf4.cpu_gemm(x, *o, **kw))
            twin = jax.jit(lambda x, *o, kw=kw: cpu_nf4.reference_cpu_gemm(x, *o, **kw))
            got, want = np.asarray(ours(x, *ops), np.float32), np.asarray(twin(x, *ops), np.float32)
            np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=2 ** -8 * float(np.abs(want).max()))
            xt = torch.from_numpy(np.array(x.astype(jnp.float32))).to(torch.bfloat16)
            dense = (lambda: xt @ wt) if transpose else (lambda: torch.nn.functional.linear(xt, wt))
            flops = 2 * m * n * k
            times = (median_seconds(lambda: ours(x, *ops).block_until_ready(), a.repeats),
                     median_seconds(lambda: twin(x, *ops).block_until_ready(), a.repeats),
                     median_seconds(dense, a.repeats))
            cells.append(" / ".join(f"{flops / t / 1e9:.0f}" for t in times))
        print(f"| {m}x{n}x{k} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
