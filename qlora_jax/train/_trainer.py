"""The training loop behind ``qlora-jax train``: config -> model, adapters, data -> steps, logs,
Orbax checkpoints (exact resume) -> a PEFT adapter.

Layout under ``output_dir``: ``run_config.json`` (the resolved config), ``checkpoints/<step>/``
(Orbax: adapters, optimizer state, RNG state, step, data position), ``metrics.jsonl`` (one line
per logged step), ``runs/`` (TensorBoard events), ``loss_curve.png``, and ``adapter/`` (the final
adapter in PEFT's format).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ..checkpoint import RunCheckpointer
from ..data import (DataPosition, Fields, Tokenized, batches_per_epoch, iterate_batches, load_records, pack,
                    tokenize)
from ..lora import apply_lora, save_adapter
from ..models import from_pretrained
from ._loss import IGNORE_INDEX
from ._optim import make_optimizer, make_schedule, warmup_steps_for
from ._paged import place_on_host
from ._step import init_opt_state, make_train_step, split_model, update_model

if TYPE_CHECKING:  # qlora_jax.config imports this package (its schedules): no import cycle at run time
    from ..config import RunConfig


def _under(mesh, fn):
    """``fn`` run with ``mesh`` in context (``jax.set_mesh``), where the model's sharding constraints
    apply: batch split over data x fsdp, weights gathered over fsdp and split over tensor."""
    if mesh is None:
        return fn

    def run(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)
    return run


def _comparable(config: dict) -> dict:
    """What must match for a run to resume by default: the config less the resume switches and the
    placement (mesh, per-device batch: a run may resume on another mesh; the global batch it implies
    is checked against the checkpoint's when restoring)."""
    out = {k: v for k, v in config.items() if k not in ("resume", "overwrite_output_dir", "mesh")}
    if isinstance(out.get("training"), dict):
        out["training"] = {k: v for k, v in out["training"].items() if k != "per_device_train_batch_size"}
    return out


def _prepare_output_dir(config: RunConfig) -> tuple[Path, bool]:
    """Create or reuse ``output_dir``; returns (dir, resume?). A directory holding another run's
    checkpoints is refused unless ``resume=true`` (continue anyway) or ``overwrite_output_dir``.
    With several processes each one checks (all raise alike), then process 0 alone writes."""
    from ..config import config_to_dict
    from ..distributed import is_main_process, sync

    out = Path(config.output_dir)
    saved = out / "run_config.json"
    has_checkpoints = (out / "checkpoints").exists() and any((out / "checkpoints").iterdir())
    current = config_to_dict(config)
    main = is_main_process()
    if config.overwrite_output_dir and out.exists():
        sync("qlora_jax.output_dir.read")  # every process has looked before process 0 removes it
        if main:
            shutil.rmtree(out)
        has_checkpoints = False
    elif has_checkpoints and config.resume is not False:
        previous = json.loads(saved.read_text()) if saved.exists() else None
        comparable, before = _comparable(current), _comparable(previous or {})
        if before != comparable and config.resume is not True:
            changed = sorted(k for k in set(comparable) | set(before) if comparable.get(k) != before.get(k))
            raise ValueError(f"output_dir {str(out)!r} holds checkpoints of a run with a different config "
                             f"(sections {changed}); pass resume=true to continue it anyway or "
                             "overwrite_output_dir=true to start over")
    elif has_checkpoints:  # resume=false with checkpoints present
        raise ValueError(f"output_dir {str(out)!r} holds checkpoints and resume=false; pass "
                         "overwrite_output_dir=true to start over")
    sync("qlora_jax.output_dir.checked")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(current, indent=2))
    sync("qlora_jax.output_dir.ready")
    return out, has_checkpoints


def train(config: RunConfig, *, stop_after_steps: int | None = None, log=None) -> dict:
    """Run (or resume) a QLoRA fine-tuning described by ``config``; returns final metrics.

    ``stop_after_steps`` ends this process's run early (after saving), as a preemption would:
    the next call resumes where it stopped. ``log`` receives each message (default: printed
    above the progress bar).
    """
    from transformers import AutoTokenizer

    from ..builtin import resolve

    from ..distributed import initialize, is_main_process

    initialize()  # a multi-process run (qlora-jax launch, SLURM, ...) joins its group; one process: nothing
    main = is_main_process()  # process 0 logs and writes run outputs; every process trains and checkpoints
    out, resume = _prepare_output_dir(config)
    say = (log if log is not None else print) if main else (lambda *_: None)
    t = config.training
    model_path = resolve(config.model.name_or_path)
    mesh = None
    if jax.device_count() > 1:  # a (data, fsdp, tensor) mesh over every device
        from ..sharding import make_mesh

        mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    model = from_pretrained(model_path, quantization=config.quantization,
                            dtype=getattr(jnp, config.model.dtype), scan_layers=config.model.scan_layers,
                            gradient_checkpointing=True if t.gradient_checkpointing else None,
                            revision=config.model.revision, mesh=mesh)
    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=config.model.revision)
    if tokenizer.pad_token is None:  # as TRL: a missing pad token becomes the EOS token
        tokenizer.pad_token = tokenizer.eos_token
    apply_lora(model, config.lora, seed=config.seed)

    d = config.data
    fields = Fields(d.text_field, d.prompt_field, d.completion_field, d.messages_field)
    records = load_records(resolve(d.path))
    eval_data = eval_records = None
    if d.validation_split > 0:
        parts_ = records.train_test_split(test_size=d.validation_split, seed=config.seed)
        records, eval_records = parts_["train"], parts_["test"]
        eval_data = tokenize(parts_["test"], tokenizer, fmt=d.format, fields=fields, max_seq_length=d.max_seq_length,
                             completion_only_loss=d.completion_only_loss)
    data = tokenize(records, tokenizer, fmt=d.format, fields=fields, max_seq_length=d.max_seq_length,
                    completion_only_loss=d.completion_only_loss)
    if data.num_truncated:
        say(f"{data.num_truncated} of {len(data.input_ids)} examples truncated to {d.max_seq_length} tokens")
    if d.packing:
        n_examples = len(data.input_ids)
        data = pack(data, d.max_seq_length)
        fill = sum(len(r) for r in data.input_ids) / (len(data.input_ids) * d.max_seq_length)
        say(f"packed {n_examples} examples into {len(data.input_ids)} rows of {d.max_seq_length} tokens "
            f"({100 * fill:.1f}% filled)")
    dp = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    global_batch = t.per_device_train_batch_size * dp  # as transformers: per device, times the devices
    per_epoch = batches_per_epoch(len(data.input_ids), global_batch, t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.num_train_epochs * per_epoch))

    tx = make_optimizer(t.learning_rate, num_training_steps=total_steps, lr_scheduler_type=t.lr_scheduler_type,
                        warmup_steps=t.warmup_steps, warmup_ratio=t.warmup_ratio, weight_decay=t.weight_decay,
                        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_epsilon=t.adam_epsilon,
                        max_grad_norm=t.max_grad_norm or None, optim=t.optim)
    parts = split_model(model)
    put_batch = jnp.asarray
    if mesh is not None:  # the base came onto its shards while loading; the adapters go now
        from ..sharding import batch_sharding, place, replicated, replicated_leaves, shard
        from ..sharding import put_batch as put_global_batch

        parts = parts._replace(trainable=shard(parts.trainable, mesh), frozen=shard(parts.frozen, mesh),
                               rngs=place(parts.rngs, replicated(mesh)))
        nnx.update(model, parts.trainable, parts.rngs, parts.frozen)  # generation uses the placed weights too
        put_batch = lambda v: put_global_batch(v, batch_sharding(mesh))  # noqa: E731 (this process's rows)
        whole = replicated_leaves(parts.frozen, jax.tree.map(lambda x: x.sharding, parts.frozen), mesh)
        if whole:
            say(f"{len(whole)} base weight(s) of 1 MiB or more stay whole on every device (their shape does not "
                f"split over mesh {dict(mesh.shape)}), e.g. {whole[:3]}")
    fp16 = config.model.dtype == "float16"
    trainable, rngs = parts.trainable, parts.rngs
    opt_state = init_opt_state(tx, trainable, loss_scaling=fp16, sharding=mesh)
    checkpointer = RunCheckpointer(out / "checkpoints", max_to_keep=t.save_total_limit)
    step, position, meta = 0, DataPosition(), {}
    if resume and checkpointer.latest_step() is not None:
        step = checkpointer.latest_step()
        restored, meta = checkpointer.restore(step, {"trainable": trainable, "rngs": rngs, "opt_state": opt_state})
        saved_batch = meta.get("global_batch_size", global_batch)
        if saved_batch != global_batch and config.resume is not True:
            raise ValueError(f"the checkpoint at step {step} was trained with a global batch of {saved_batch} "
                             f"examples; this run's is {global_batch} (training.per_device_train_batch_size="
                             f"{t.per_device_train_batch_size} x {dp} data-parallel devices): set the per-device "
                             "batch so that they match, or pass resume=true to continue with the new batch")
        trainable, rngs, opt_state = restored["trainable"], restored["rngs"], restored["opt_state"]
        opt_state = place_on_host(opt_state)  # a paged state goes back to host memory
        position = DataPosition(meta["epoch"], meta["batch"])
        if main:
            _drop_metrics_after(out / "metrics.jsonl", step)  # steps past the checkpoint are trained again
        if meta.get("stopped_early"):
            total_steps = step  # the run ended by early stopping: nothing more to train
    stream = iterate_batches(data, batch_size=global_batch, micro_batches=t.gradient_accumulation_steps,
                             max_seq_length=d.max_seq_length, pad_token_id=tokenizer.pad_token_id, seed=config.seed,
                             start=position, group_by_length=t.group_by_length)
    train_step = _under(mesh, make_train_step(parts.graphdef, tx, opt_state=opt_state, trainable=trainable, rngs=rngs))
    eval_every = t.eval_steps or t.logging_steps

    @functools.partial(_under, mesh)
    def evaluate() -> dict:
        return evaluate_loss(parts.graphdef, trainable, rngs, parts.frozen, eval_data,
                             batch_size=global_batch, max_seq_length=d.max_seq_length,
                             pad_token_id=tokenizer.pad_token_id)
    summary = {}
    exact_match = eval_data is not None and t.eval_exact_match
    if exact_match and step == 0:
        summary["before"] = {**evaluate(), **evaluate_exact_match(model, tokenizer, eval_records, d.format, fields)}
        say(f"before training: eval_loss {summary['before']['eval_loss']:.4f}, exact match "
            f"{100 * summary['before']['exact_match']:.1f}% on {summary['before']['num_eval_prompts']} "
            "held-out prompts")
    schedule = make_schedule(t.learning_rate, t.lr_scheduler_type, num_training_steps=total_steps,
                             warmup_steps=warmup_steps_for(total_steps, t.warmup_steps, t.warmup_ratio))
    stopper = EarlyStopping(t.early_stopping_patience, t.early_stopping_threshold, **meta.get("early_stopping", {}))
    logger = MetricsLogger(out, tensorboard="tensorboard" in t.report_to, start_step=step, enabled=main)
    bar = tqdm(total=total_steps, initial=step, disable=t.disable_tqdm or not main, desc="train", unit="step",
               dynamic_ncols=True)
    if log is None and not t.disable_tqdm and main:
        say = bar.write  # messages above the bar, not through it
    if resume and step:
        say(f"resumed from step {step} ({out / 'checkpoints' / str(step)})")
    last_loss, tokens, t0, finished = float("nan"), 0, time.perf_counter(), False
    try:
        while step < total_steps:
            position, batch = next(stream)
            trainable, rngs, opt_state, m = train_step(trainable, rngs, parts.frozen, opt_state,
                                                       {k: put_batch(v) for k, v in batch.items()})
            step += 1
            loss = float(m["loss"])
            if not np.isfinite(loss) and not (fp16 and bool(m.get("skipped", False))):
                checkpointer.wait()
                good = checkpointer.latest_step()
                where = (f"the last good checkpoint is step {good} in {out / 'checkpoints'}" if good is not None
                         else "no checkpoint was saved before it")
                raise FloatingPointError(f"the loss became {loss} at step {step}; training stopped and that step "
                                         f"was not saved; {where} (lower training.learning_rate or "
                                         "training.max_grad_norm, or check the data)")
            last_loss, tokens = loss, tokens + int(m["num_tokens"])
            rate = tokens / (time.perf_counter() - t0)
            lr = float(schedule(step - 1))  # the rate this step used
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
            if step % t.logging_steps == 0 or step == total_steps:
                logger.write({"step": step, "loss": loss, "learning_rate": lr, "grad_norm": float(m["grad_norm"]),
                              "tokens_per_s": rate})
                say(f"step {step}/{total_steps}  loss {loss:.4f}  lr {lr:.3e}  grad_norm {float(m['grad_norm']):.3f}"
                    f"  {rate:,.0f} tokens/s")
            stop_early = False
            if eval_data is not None and (step % eval_every == 0 or step == total_steps):
                record = {"step": step, **evaluate()}
                logger.write(record)
                say(f"step {step}/{total_steps}  eval_loss {record['eval_loss']:.4f}  "
                    f"eval_perplexity {record['eval_perplexity']:.2f}")
                stop_early = stopper.update(step, record["eval_loss"])
                if stop_early:
                    say(f"early stopping at step {step}: eval_loss has not improved on {stopper.best:.4f} (step "
                        f"{stopper.best_step}) for {stopper.patience} evaluations")
            stopping = stop_after_steps is not None and step >= stop_after_steps
            if step % t.save_steps == 0 or step == total_steps or stopping or stop_early:
                checkpointer.save(step, {"trainable": trainable, "rngs": rngs, "opt_state": opt_state},
                                  {"step": step, "epoch": position.epoch, "batch": position.batch,
                                   "early_stopping": stopper.state(), "stopped_early": stop_early,
                                   "global_batch_size": global_batch})
            if stop_early:
                finished = True
                break
            if stopping:
                break
        finished = finished or step >= total_steps or bool(meta.get("stopped_early"))
    except BaseException:
        bar.close()
        logger.close()
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            checkpointer.close()
        raise
    bar.close()
    logger.close()
    checkpointer.close()
    update_model(model, trainable, rngs)
    if finished and jax.process_count() > 1:  # the adapters' shards live in several processes: gather to write
        from jax.experimental import multihost_utils

        adapters = multihost_utils.process_allgather(trainable, tiled=True)
        if main:  # written from host copies; the model keeps the global arrays (generation below)
            save_adapter(update_model(model, adapters), out / "adapter")
            update_model(model, trainable)
    elif finished and main:
        save_adapter(model, out / "adapter")
    if finished and main:
        if t.plot_loss:
            plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png")
    if finished:
        if exact_match:
            summary["after"] = {**evaluate(), **evaluate_exact_match(model, tokenizer, eval_records, d.format, fields)}
            say(f"after training:  eval_loss {summary['after']['eval_loss']:.4f}, exact match "
                f"{100 * summary['after']['exact_match']:.1f}% on {summary['after']['num_eval_prompts']} held-out "
                "prompts")
            if main:
                (out / "eval_summary.json").write_text(json.dumps(summary, indent=2))
    if stopper.patience:
        summary["best_eval_loss"], summary["best_step"] = stopper.best, stopper.best_step
    return {"step": step, "total_steps": total_steps, "loss": last_loss, "model": model, **summary}


def _drop_metrics_after(path: Path, step: int) -> None:
    """Keep only the metric lines up to ``step`` (rewritten atomically)."""
    if not path.exists():
        return
    lines = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in lines))
    tmp.replace(path)


class EarlyStopping:
    """transformers' EarlyStoppingCallback on eval_loss: an evaluation improves when it beats the
    best by more than ``threshold``; ``patience`` evaluations in a row without one stop the run.
    Its state rides in each checkpoint, so a resumed run counts on."""

    def __init__(self, patience: int | None, threshold: float = 0.0, best: float | None = None,
                 best_step: int | None = None, bad: int = 0):
        self.patience, self.threshold = patience, threshold
        self.best, self.best_step, self.bad = best, best_step, bad

    def update(self, step: int, value: float) -> bool:
        if self.best is None or value < self.best - self.threshold:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return bool(self.patience) and self.bad >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}


class MetricsLogger:
    """One JSON line per record in ``metrics.jsonl``, and TensorBoard scalars under ``runs/``
    (train/... and eval/...); a resumed run drops TensorBoard events past its checkpoint."""

    def __init__(self, out: Path, *, tensorboard: bool, start_step: int = 0, enabled: bool = True):
        self.file = (out / "metrics.jsonl").open("a") if enabled else None
        self.tb = None
        if tensorboard and enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(out / "runs"), purge_step=start_step or None)

    def write(self, record: dict) -> None:
        if self.file is None:  # not process 0
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    name = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    self.tb.add_scalar(name, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_loss_curve(metrics: Path, png: Path) -> None:
    """Training loss (and eval loss when there is one) against the step, from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    last = {}
    for r in rows:  # a resumed run logs some steps twice: the later line wins
        last[(r["step"], "eval_loss" in r)] = r
    train_ = sorted((k[0], r["loss"]) for k, r in last.items() if not k[1])
    eval_ = sorted((k[0], r["eval_loss"]) for k, r in last.items() if k[1])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train_:
        ax.plot(*zip(*train_), label="train loss")
    if eval_:
        ax.plot(*zip(*eval_), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    tmp.replace(png)


def evaluate_exact_match(model, tokenizer, records, fmt, fields, max_examples: int = 128) -> dict:
    """Greedy-generate each held-out prompt's completion; the share reproduced exactly (whitespace
    trimmed). The model must hold the current adapters (``update_model``)."""
    from ..data import detect_format, render
    from ..generate import generate

    rows = [dict(r) for r in records.select(range(min(len(records), max_examples)))]
    fmt = detect_format(rows[0].keys(), fields) if fmt == "auto" else fmt
    pairs = [render(r, fmt, fields, tokenizer) for r in rows]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = tokenizer([p for p, _ in pairs], return_tensors="np", padding=True)
    finally:
        tokenizer.padding_side = side
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for _, c in pairs) + 1
    out = np.asarray(generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=longest,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    start = batch["input_ids"].shape[1]
    hits = [tokenizer.decode(row[start:], skip_special_tokens=True).strip() == c.strip()
            for row, (_, c) in zip(out, pairs)]
    return {"exact_match": float(np.mean(hits)), "num_eval_prompts": len(hits)}


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(graphdef, trainable, rngs, frozen, batch):
    model = nnx.merge(graphdef, trainable, rngs, frozen)
    model.eval()  # dropout off
    return model.loss_sum(batch["input_ids"], batch["attention_mask"], batch["labels"], IGNORE_INDEX)


def evaluate_loss(graphdef, trainable, rngs, frozen, data, *, batch_size: int, max_seq_length: int,
                  pad_token_id: int) -> dict:
    """Mean token loss and perplexity over every example of ``data`` (in order, no dropout)."""
    total, count = 0.0, 0
    for start in range(0, len(data.input_ids), batch_size):
        chunk = Tokenized(data.input_ids[start:start + batch_size], data.labels[start:start + batch_size], 0)
        _, batch = next(iterate_batches(chunk, batch_size=len(chunk.input_ids), max_seq_length=max_seq_length,
                                        pad_token_id=pad_token_id, shuffle=False))
        replica = jax.tree.leaves(trainable)[0].sharding  # the batch goes where the weights are (all devices)
        if isinstance(replica, jax.sharding.NamedSharding):  # whole on each device of the mesh
            replica = jax.sharding.NamedSharding(replica.mesh, jax.sharding.PartitionSpec())
        s, n = _eval_sums(graphdef, trainable, rngs, frozen,
                          {k: jax.device_put(v[0], replica) for k, v in batch.items()})
        total, count = total + float(s), count + int(n)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
