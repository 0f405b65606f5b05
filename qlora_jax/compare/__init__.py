"""Side-by-side comparison with the PyTorch QLoRA stack (transformers + bitsandbytes + PEFT) and the
JAX peer Qwix: the same job in each stack, each in its own process, one report.

    python scripts/compare_torch.py --preset tiny|small|1b [--model PATH] [--steps N]
        [--dtype bfloat16|float32] [--stacks reference,qlora_jax,qwix] [--gradient-checkpointing]
        --output-dir DIR

writes DIR/comparison.json (under "reference", "qlora_jax" and "qwix": ``FIGURES`` and more; plus
"environment" and "config"), DIR/comparison.md (the table, reasons for missing figures, what ran)
and DIR/{loss,throughput,memory}.png. ``run_comparison`` is the library entry.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ._exact import compare_with_bnb, in_torch_thread_order, nested_code_mismatch, nested_scaled, state_mismatch
from ._presets import (PRESETS, STACKS, CompareConfig, cache_dir, checkpoint_of, make_batches, make_prompt,
                       preset_checkpoint)
from ._report import derive, markdown, plot, write_json
from ._stacks import FIGURES, PHASE_FIGURES, empty_result

__all__ = ["MALLOC_TUNABLE", "PRESETS", "STACKS", "FIGURES", "CompareConfig", "cache_dir", "child_env",
           "compare_with_bnb", "environment", "in_torch_thread_order", "main", "make_batches", "make_prompt",
           "nested_code_mismatch", "nested_scaled", "preset_checkpoint", "run_comparison", "run_stack",
           "state_mismatch", "write_report"]

ORDER = ("reference", "qlora_jax", "qwix")  # the reference first: the others start from its state
_PACKAGES = ("qlora_jax", "jax", "jaxlib", "flax", "optax", "qwix", "torch", "transformers", "peft", "bitsandbytes",
             "numpy")


def environment(command: str | None = None) -> dict:
    """Device, CPU model and cores, library versions, date, the command."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "cores": cores, "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
            "command": command or shlex.join([sys.executable, *sys.argv]), "versions": versions,
            "glibc_tunables": child_env()["GLIBC_TUNABLES"]}


#: glibc's malloc tunable every stack runs with (unless the caller's GLIBC_TUNABLES sets it): large
#: blocks mmapped with transparent huge pages (madvise). XLA:CPU maps each execution's temporaries
#: afresh (the small preset's step: one 382 MB block) and glibc unmaps them after: ~95,000 page
#: faults a step on 4 KiB pages, ~450 on huge pages (small step alone 0.40-0.42 -> 0.35 s, the same
#: peak RSS). torch's CPU allocator goes through the same malloc, so the reference gets it too.
MALLOC_TUNABLE = "glibc.malloc.hugetlb=1"


def child_env() -> dict:
    """The stack's environment: XLA's forced host device count removed (one device, as a user runs),
    and ``MALLOC_TUNABLE`` added to GLIBC_TUNABLES."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("QLORA_JAX_PALLAS_INTERPRET", None)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith(MALLOC_TUNABLE.split("=")[0] + "=") for t in tunables):
        tunables.append(MALLOC_TUNABLE)
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def run_stack(stack: str, config: CompareConfig, ckpt: Path, work: Path, timeout: float | None = None) -> dict:
    """Run one stack in its own process; a crash or timeout gives null figures with the reason."""
    work.mkdir(parents=True, exist_ok=True)
    out, log = work / f"{stack}.json", work / f"{stack}.log"
    out.unlink(missing_ok=True)
    # -P: the working directory stays off sys.path, so a repository checkout's top-level kernels/
    # folder cannot stand in for the PyPI package `kernels` that transformers imports
    cmd = [sys.executable, "-P", "-m", "qlora_jax.compare._worker", stack, config.to_json(), str(ckpt), str(work),
           str(out)]
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(), timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = f"timeout after {timeout} s"
    if code == 0 and out.exists():
        return json.loads(out.read_text())
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    result = empty_result()
    reason = f"the {stack} process failed (exit {code}); last lines: {' / '.join(tail)}"[:800]
    result["errors"] = {phase: reason for phase in PHASE_FIGURES}
    return result


def run_comparison(config: CompareConfig, output_dir: str | os.PathLike, *, command: str | None = None,
                   preset_root: str | os.PathLike | None = None, timeout: float | None = None) -> dict:
    """Run the selected stacks (the reference first) and write comparison.json, comparison.md and
    the plots under ``output_dir``; returns the report (comparison.json's content)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)  # a previous run's bitsandbytes state must not stand in for this one's
    ckpt = checkpoint_of(config, preset_root)
    report = {"config": {**config.__dict__, "stacks": list(config.stacks), "checkpoint": str(ckpt)},
              "environment": environment(command)}
    for stack in ORDER:
        if stack in config.stacks:
            report[stack] = run_stack(stack, config, ckpt, work, timeout)
        else:
            report[stack] = empty_result()
            report[stack]["errors"] = {"all": "not selected (--stacks)"}
    report["environment"]["device"] = {s: report[s].get("device") for s in ORDER}  # as each stack saw it
    return write_report(report, out)


def write_report(report: dict, output_dir: str | os.PathLike) -> dict:
    """Derived figures, plots, comparison.json and comparison.md from the stacks' results (also to
    redo a report's text and plots from its comparison.json without running the stacks again)."""
    out = Path(output_dir)
    derive(report)
    plots = plot(report, out)
    write_json(report, out / "comparison.json")
    md = out / "comparison.md"
    md.with_suffix(".md.tmp").write_text(markdown(report, plots))
    os.replace(md.with_suffix(".md.tmp"), md)
    return report


def main(argv: list[str] | None = None) -> dict:
    """The command line of scripts/compare_torch.py."""
    p = argparse.ArgumentParser(prog="compare_torch.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), help="a Llama-shaped random checkpoint, written once and cached")
    p.add_argument("--model", help="a local Hugging Face checkpoint directory instead of a preset")
    p.add_argument("--steps", type=int, default=10, help="training steps (tokens/s: the median after the first two)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--stacks", default=",".join(STACKS), help="comma-separated subset of " + ",".join(STACKS))
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--load-in-8bit", action="store_true",
                   help="an LLM.int8() base (transformers' load_in_8bit, threshold 6.0) instead of NF4 + double quant")
    p.add_argument("--batch", type=int, help="override the preset's batch size")
    p.add_argument("--seq", type=int, help="override the preset's sequence length")
    p.add_argument("--timeout", type=float, help="seconds each stack may run")
    p.add_argument("--output-dir", required=True)
    a = p.parse_args(argv)
    if a.preset is None and a.model is None:
        p.error("give --preset or --model")
    try:
        config = CompareConfig(preset=None if a.model else a.preset, model=a.model, steps=a.steps, dtype=a.dtype,
                               stacks=tuple(s.strip() for s in a.stacks.split(",") if s.strip()),
                               gradient_checkpointing=a.gradient_checkpointing, batch=a.batch, seq=a.seq,
                               load_in_8bit=a.load_in_8bit)
    except ValueError as e:
        p.error(str(e))
    command = shlex.join(["python", "scripts/compare_torch.py", *(sys.argv[1:] if argv is None else argv)])
    report = run_comparison(config, a.output_dir, command=command, timeout=a.timeout)
    print(Path(a.output_dir) / "comparison.md")
    return report
