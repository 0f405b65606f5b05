"""QLoRA training throughput and peak memory: qlora_jax against transformers + PEFT + bitsandbytes (CPU).

    python scripts/bench_train.py [--hidden 512 --layers 8 --intermediate 1408 --heads 8 --vocab 32000]
        [--batch 2 --seq 256 --r 16 --steps 5 --dtype bfloat16]

NF4 base with double quantization, LoRA on all linear layers, gradient checkpointing, AdamW, clipping
0.3; one random Llama checkpoint; each stack in its own process (its peak anonymous memory is its
own). MFU counts ~4.3N FLOPs per token (forward 2N, input-gradient backward 2N, adapters and the
rest ~0.3N; recomputation not counted), N = weights in the matmuls, against the 870 GFLOP/s bf16
peak measured on this 2-core CPU.
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile

from qlora_jax.models import write_tiny_checkpoint

CPU_PEAK_FLOPS = 870e9  # bf16 matmul peak measured on this 2-core machine (torch and XLA alike)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("hidden", 512), ("layers", 8), ("intermediate", 1408), ("heads", 8), ("vocab", 32000),
                          ("batch", 2), ("seq", 256), ("r", 16), ("steps", 5)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = p.parse_args()
    ckpt = write_tiny_checkpoint(tempfile.mkdtemp(), "llama", hidden_size=a.hidden, num_hidden_layers=a.layers,
                                 intermediate_size=a.intermediate, num_attention_heads=a.heads,
                                 num_key_value_heads=a.heads, vocab_size=a.vocab, dtype="bfloat16")
    n_params = a.layers * (4 * a.hidden ** 2 + 3 * a.hidden * a.intermediate) + a.vocab * a.hidden
    kw = json.dumps(dict(batch=a.batch, seq=a.seq, r=a.r, steps=a.steps, dtype=a.dtype))
    results = {}
    for stack in ("qlora_jax", "peft"):
        out = subprocess.run([sys.executable, "-P", "-m", "qlora_jax.bench", stack, str(ckpt), kw], check=True,
                             capture_output=True, text=True).stdout
        results[stack] = json.loads(out.strip().splitlines()[-1])
    print(f"{datetime.date.today()}; llama hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, "
          f"{n_params / 1e6:.0f}M params in matmuls; batch {a.batch} x seq {a.seq}, r={a.r}, {a.dtype}\n")
    print("| stack | tokens/s | MFU (4.3N vs 870 GFLOP/s) | peak added memory (MiB) |")
    print("|---|---|---|---|")
    for stack, r in results.items():
        mfu = 4.3 * n_params * r["tokens_per_s"] / CPU_PEAK_FLOPS
        print(f"| {stack} | {r['tokens_per_s']:,.0f} | {100 * mfu:.1f}% | {r['peak_added_bytes'] / 2**20:,.0f} |")
    ours, theirs = results["qlora_jax"], results["peft"]
    print(f"\nratio (ours / reference): tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, "
          f"peak memory {ours['peak_added_bytes'] / theirs['peak_added_bytes']:.2f}x")
