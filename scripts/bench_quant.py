"""Quantize / dequantize throughput of qlora_jax against bitsandbytes on the same tensors.

    python scripts/bench_quant.py [--shapes 4096x4096,11008x4096] [--dtype bfloat16] [--repeats 7]

GB/s counts the bytes of the floating-point tensor (input of quantize, output of dequantize).
Median of --repeats timed runs after a warm-up (compilation excluded); both libraries run in
this process on the same tensors. ``quantize, jit`` is the XLA program (what runs inside a jitted
function); ``quantize, eager`` is ``quantize`` called on a host array, as checkpoint loading calls
it (on CPU: the native host kernel for the first level, ``kernels/cpu/quantize.cc``). Prints a
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
    import bitsandbytes.functional as F

import qlora_jax
from qlora_jax.bench import median_seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x4096,11008x4096")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=7)
    a = p.parse_args()
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"bitsandbytes {F.__dict__.get('__version__', __import__('bitsandbytes').__version__)}\n")
    print("| shape | dtype | quant | op | qlora_jax GB/s | bitsandbytes GB/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for shape in [tuple(int(d) for d in s.split("x")) for s in a.shapes.split(",")]:
        t = torch.randn(shape).to(getattr(torch, a.dtype))
        x = jnp.asarray(t.float().numpy()).astype(a.dtype)
        gb = t.numel() * t.element_size() / 1e9
        for dq in (True, False):
            quant = jax.jit(lambda v: qlora_jax.quantize(v, double_quant=dq))
            q = quant(x)
            deq = jax.jit(qlora_jax.dequantize)
            packed, st = F.quantize_4bit(t, blocksize=64, compress_statistics=dq, quant_type="nf4")
            host = np.asarray(x)
            bnb_quantize = lambda: F.quantize_4bit(t, blocksize=64, compress_statistics=dq, quant_type="nf4")  # noqa: E731
            rows = {
                "quantize, jit": (lambda: jax.block_until_ready(quant(x)), bnb_quantize),
                "quantize, eager": (lambda: jax.block_until_ready(qlora_jax.quantize(host, double_quant=dq)),
                                    bnb_quantize),
                "dequantize": (lambda: jax.block_until_ready(deq(q)), lambda: F.dequantize_4bit(packed, st)),
            }
            for op, (ours, theirs) in rows.items():
                t_ours, t_bnb = median_seconds(ours, a.repeats), median_seconds(theirs, a.repeats)
                print(f"| {shape[0]}x{shape[1]} | {a.dtype} | nf4{'+dq' if dq else ''} | {op} | "
                      f"{gb / t_ours:.2f} | {gb / t_bnb:.2f} | {t_bnb / t_ours:.2f}x |")


if __name__ == "__main__":
    main()
