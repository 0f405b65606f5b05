"""comparison.json, comparison.md and the PNG plots from the stacks' results."""

from __future__ import annotations

import json
import os
from pathlib import Path

LABELS = {"reference": "PyTorch", "qwix": "Qwix", "qlora_jax": "qlora_jax"}
COLUMNS = ("reference", "qwix", "qlora_jax")
# metric, key, unit scale and format, True when higher is better
ROWS = [
    ("load + quantize (s)", "load_seconds", 1, "{:.2f}", False),
    ("load peak RSS (MiB, anonymous)", "load_peak_rss_bytes", 2 ** -20, "{:,.0f}", False),
    ("train tokens/s (median after 2 steps)", "train_tokens_per_s", 1, "{:,.0f}", True),
    ("train compile + warm-up (s)", "train_warmup_seconds", 1, "{:.2f}", False),
    ("train peak RSS (MiB, anonymous)", "train_peak_rss_bytes", 2 ** -20, "{:,.0f}", False),
    ("final loss", "final_loss", 1, "{:.4f}", None),
    ("generate tokens/s (batch 1, median of 3)", "gen_tokens_per_s", 1, "{:,.1f}", True),
    ("generate compile + warm-up (s)", "gen_warmup_seconds", 1, "{:.2f}", False),
    ("leading tokens equal to PyTorch's", "gen_tokens_agree", 1, "{:.0f}", None),
]


def leading_agreement(a, b) -> int | None:
    """How many leading tokens two generations share (None if either is missing)."""
    if a is None or b is None:
        return None
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def max_relative_loss_difference(ours, theirs) -> float | None:
    if not ours or not theirs or len(ours) != len(theirs):
        return None
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, theirs))


def derive(report: dict) -> None:
    """Figures computed from the stacks' own: final loss, agreement with the reference's tokens and
    losses (qlora_jax and Qwix against PyTorch)."""
    ref = report["reference"]
    for stack in COLUMNS:
        r = report[stack]
        r["final_loss"] = r["losses"][-1] if r.get("losses") else None
        other = stack != "reference"  # the reference against itself: no figure
        r["gen_tokens_agree"] = leading_agreement(r.get("gen_tokens"), ref.get("gen_tokens")) if other else None
        r["max_loss_rel_diff_vs_reference"] = (max_relative_loss_difference(r.get("losses"), ref.get("losses"))
                                               if other else None)


def write_json(report: dict, path: Path) -> None:
    """Written whole to a temporary file, then renamed: a reader never sees half a report."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False))
    os.replace(tmp, path)


def _fmt(value, scale, fmt) -> str:
    return "n/a" if value is None else fmt.format(value * scale)


def markdown(report: dict, plots: list[str]) -> str:
    cfg, env = report["config"], report["environment"]
    what = f"preset `{cfg['preset']}`" if cfg.get("preset") else f"model `{cfg['model']}`"
    lines = [f"# qlora_jax vs PyTorch (transformers + bitsandbytes + PEFT) vs Qwix: {what}", "",
             f"{env['date']} on {env['cpu']} ({env['cores']} cores), {env['platform']}; devices: "
             f"{env.get('device')}.  ",
             f"Command: `{env['command']}`", "",
             f"Job: {'LLM.int8() (load_in_8bit, threshold 6.0)' if cfg.get('load_in_8bit') else 'NF4 + double quant'}"
             f"{'' if cfg.get('load_in_8bit') else 'ization'}, compute dtype {cfg['dtype']}, LoRA r={cfg['r']} alpha="
             f"{cfg['lora_alpha']} dropout 0 on all linear layers, AdamW lr {cfg['learning_rate']} (0.9, 0.999, "
             f"1e-8, no decay, no clipping, constant), batch {cfg['batch']} x seq {cfg['seq']}, {cfg['steps']} "
             f"steps, gradient checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'}; generation: greedy, "
             f"batch 1, {cfg['prompt_length']}-token prompt, {cfg['max_new_tokens']} new tokens.", "",
             "| metric | PyTorch | Qwix | qlora_jax | qlora_jax / PyTorch | qlora_jax / Qwix | vs PyTorch |",
             "|---|---|---|---|---|---|---|"]
    ours = report["qlora_jax"]
    for label, key, scale, fmt, higher in ROWS:
        cells = [_fmt(report[s].get(key), scale, fmt) for s in COLUMNS]
        ratios, verdict = [], ""
        for other in ("reference", "qwix"):
            a, b = ours.get(key), report[other].get(key)
            ratios.append(f"{a / b:.2f}x" if a is not None and b not in (None, 0) and higher is not None else "")
        a, b = ours.get(key), report["reference"].get(key)
        if higher is not None and a is not None and b is not None and a != b:
            verdict = "better" if (a > b) == higher else "worse"
        lines.append(f"| {label} | {' | '.join(cells)} | {' | '.join(ratios)} | {verdict} |")
    exact = ours.get("bit_exact")
    if exact:
        rule = ("int8 codes and fp32 row scales, equal" if cfg.get("load_in_8bit") else
                "codes, nested scales, offset within 1 ulp, nested codes but for bitsandbytes' CPU lookup-table steps")
        lines += ["", f"Bit-exactness of qlora_jax's {'LLM.int8()' if cfg.get('load_in_8bit') else 'NF4'} state "
                  f"against bitsandbytes' ({rule}): **{exact['exact']} of {exact['tensors']}** quantized weights."]
        if exact["exact"] < exact["tensors"] and exact.get("torch_threads"):
            lines.append(f"With the double-quantization offset summed in torch's {exact['torch_threads']}-thread order "
                         f"(bitsandbytes' `absmax.mean()` on CPU splits sums of 32768+ values over torch's threads; "
                         f"`quantize` takes the single-thread order, docs/decisions.md): "
                         f"**{exact['exact_in_torch_thread_order']} of {exact['tensors']}**.")
        for k, why in list(exact["mismatches"].items())[:10]:
            lines.append(f"- {k}: {why}")
    diff = ours.get("max_loss_rel_diff_vs_reference")
    if diff is not None:
        lines += ["", f"Per-step losses, qlora_jax against PyTorch (same bitsandbytes codes, same initial adapters, "
                  f"same batches): largest relative difference {diff:.2e}."]
    lines += ["", "## Why a figure is missing, and what ran", ""]
    for stack in COLUMNS:
        r = report[stack]
        for phase, why in r.get("errors", {}).items():
            lines.append(f"- {LABELS[stack]}, {phase}: {why}")
    if report["reference"].get("paths"):
        lines.append(f"- PyTorch's bitsandbytes ops, by phase (torch profiler): {report['reference']['paths']}")
    for stack in COLUMNS:
        for note in report[stack].get("notes", []):
            lines.append(f"- {LABELS[stack]}: {note}")
        for key in ("train_base", "initial_adapter", "configuration", "device"):
            if report[stack].get(key):
                lines.append(f"- {LABELS[stack]} {key.replace('_', ' ')}: {report[stack][key]}")
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()), ""]
    if env.get("glibc_tunables"):
        lines += [f"Every stack ran with GLIBC_TUNABLES={env['glibc_tunables']} (large blocks on transparent huge "
                  "pages: docs/decisions.md, \"Huge pages for XLA's temporaries\").", ""]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[str]:
    """loss.png (curves overlaid), throughput.png and memory.png (bars); the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reference": "tab:orange", "qwix": "tab:green", "qlora_jax": "tab:blue"}
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in COLUMNS:
        losses = report[s].get("losses")
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, marker=".", label=LABELS[s], color=colors[s],
                    linestyle="--" if s == "qlora_jax" else "-")
    ax.set(xlabel="step", ylabel="training loss", title="Loss per step")
    ax.legend()
    fig.tight_layout()
    paths.append(str(out / "loss.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    for name, title, keys, scale, unit in (
            ("throughput", "Throughput", ("train_tokens_per_s", "gen_tokens_per_s"), 1, "tokens/s"),
            ("memory", "Peak anonymous RSS", ("load_peak_rss_bytes", "train_peak_rss_bytes"), 2 ** -20, "MiB")):
        fig, axes = plt.subplots(1, len(keys), figsize=(8, 3.5))
        for ax, key in zip(axes, keys):
            values = [(report[s].get(key) or 0) * scale for s in COLUMNS]
            bars = ax.bar([LABELS[s] for s in COLUMNS], values, color=[colors[s] for s in COLUMNS])
            for bar, s in zip(bars, COLUMNS):
                if report[s].get(key) is None:
                    ax.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom")
            ax.set(title=key.replace("_", " "), ylabel=unit)
        fig.suptitle(title)
        fig.tight_layout()
        paths.append(str(out / f"{name}.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths
