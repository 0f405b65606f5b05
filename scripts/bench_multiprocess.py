"""Step time of the demo's QLoRA step across process layouts on CPU (processes x devices), and the
share of op time in cross-device collectives from a profile (docs/benchmarks.md).

    python scripts/bench_multiprocess.py [--layouts 1x8 2x4 4x2] [--global-batch 32 --seq 64 --steps 8]

Each layout runs ``python -m qlora_jax.bench multiprocess`` in every process with the environment
``qlora-jax launch`` gives (forced CPU devices, gloo across processes), data parallel over all
devices, on the demo's model (builtin:tiny-llama, NF4 + double quant, LoRA r=16 on all linear
layers, gradient checkpointing, paged AdamW). Process 0's figures are printed as a Markdown row.
"""

import argparse
import json
import subprocess
import sys
import tempfile

from qlora_jax.builtin import resolve
from qlora_jax.distributed import _free_port, process_env


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=["1x8", "2x4", "4x2"])
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--r", type=int, default=16)
    a = p.parse_args()
    ckpt = resolve("builtin:tiny-llama")
    print("| processes x devices | step (ms) | tokens/s | collectives / op time (process 0's devices) |")
    print("|---|---|---|---|")
    for layout in a.layouts:
        procs, devices = (int(x) for x in layout.split("x"))
        per_device = a.global_batch // (procs * devices)
        coordinator = f"127.0.0.1:{_free_port()}"
        runs = []
        for rank in range(procs):
            kw = dict(steps=a.steps, batch_per_device=per_device, seq=a.seq, r=a.r,
                      profile_dir=tempfile.mkdtemp(prefix=f"trace{rank}_"))
            env = process_env(rank, procs, coordinator, cpu_devices_per_process=devices, timeout=120)
            cmd = [sys.executable, "-P", "-m", "qlora_jax.bench", "multiprocess", ckpt, json.dumps(kw)]
            runs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        outs = [r.communicate()[0] for r in runs]
        if any(r.returncode for r in runs):
            print(f"layout {layout} failed: {[r.returncode for r in runs]}", file=sys.stderr)
            return 1
        first = json.loads(outs[0].strip().splitlines()[-1])
        rate = first["tokens_per_step"] / first["step_s"]
        print(f"| {procs} x {devices} | {1000 * first['step_s']:.1f} | {rate:,.0f} | {100 * first['collective_share']:.1f}% |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
