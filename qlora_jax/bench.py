"""Measurement helpers for scripts/bench_*.py: peak anonymous memory and training throughput.

Each stack is measured in its own process so that its peak memory is its own (the scripts run
this module's functions in subprocesses). Figures are medians after a warm-up.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time


class PeakAnonMemory:
    """Samples ``RssAnon`` (anonymous resident memory; memory-mapped checkpoint pages excluded) every
    few milliseconds; ``peak - start`` is what the measured block added at its worst."""

    def __init__(self, period: float = 0.002):
        self.period, self.peak, self._stop = period, 0, threading.Event()

    @staticmethod
    def current() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def __enter__(self):
        self.start = self.peak = self.current()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())

    @property
    def added(self) -> int:
        return self.peak - self.start


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call (compilation,
    caches, allocator); ``fn`` must block until its work is done."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_throughput_qlora_jax(ckpt: str, *, batch: int, seq: int, r: int, steps: int, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import transformers  # noqa: F401  (imported before measuring, as the reference's function does)

    import qlora_jax
    from qlora_jax.train import make_optimizer, make_train_step, split_model

    with PeakAnonMemory() as mem:
        model = qlora_jax.from_pretrained(ckpt, quantization=qlora_jax.QuantConfig(compute_dtype=dtype),
                                          dtype=getattr(jnp, dtype), gradient_checkpointing=True)
        qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
        split = split_model(model)
        tx = make_optimizer(2e-4, num_training_steps=steps + 1, max_grad_norm=0.3)
        state = [split.trainable, split.rngs, tx.init(split.trainable)]
        step = make_train_step(split.graphdef, tx)
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, batch, seq)))
        data = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}

        def run():
            t, rg, o, m = step(state[0], state[1], split.frozen, state[2], data)
            jax.block_until_ready(m["loss"])
            state[:] = [t, rg, o]

        seconds = median_seconds(run, steps)
    return {"tokens_per_s": batch * seq / seconds, "peak_added_bytes": mem.added}


def train_throughput_peft(ckpt: str, *, batch: int, seq: int, r: int, steps: int, dtype: str) -> dict:
    import warnings

    import numpy as np
    import peft
    import torch
    import transformers

    with PeakAnonMemory() as mem:
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=getattr(torch, dtype))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=cfg, device_map="cpu",
                                                                      dtype=getattr(torch, dtype))
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
            model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                               task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
        ids = torch.tensor(np.random.default_rng(0).integers(0, 1000, (batch, seq)))

        def run():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 0.3)
            opt.step()
            opt.zero_grad()

        seconds = median_seconds(run, steps)
    return {"tokens_per_s": batch * seq / seconds, "peak_added_bytes": mem.added}


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collective_seconds(trace_dir: str) -> tuple[float, float]:
    """(seconds in cross-device collectives, seconds of all XLA op events) in the Perfetto trace
    that ``jax.profiler.trace(..., create_perfetto_trace=True)`` wrote under ``trace_dir``, summed
    over the op events of every device (XLA:CPU's thunk executor). A collective's time includes
    waiting for the other devices to arrive."""
    import glob
    import gzip

    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no Perfetto trace under {trace_dir}")
    events = json.load(gzip.open(max(paths, key=os.path.getmtime)))
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    coll = total = 0.0
    for e in events:  # XLA:CPU's per-op events come from its thunk executor ("end: x" marks are not ops)
        args = e.get("args") or {}
        if e.get("ph") != "X" or not str(args.get("_src", "")).endswith("thunk_executor.cc"):
            continue
        name = str(e.get("name", ""))
        if name.startswith("end:"):
            continue
        total += e["dur"] / 1e6
        if name.startswith(COLLECTIVES):
            coll += e["dur"] / 1e6
    return coll, total


def multiprocess_step_time(ckpt: str, *, steps: int, batch_per_device: int, seq: int, r: int,
                           profile_dir: str | None = None) -> dict:
    """One process's part of a data-parallel QLoRA run over every device of every process (start it
    in each process with the ``qlora_jax.distributed`` environment): median step seconds after two
    warm-up steps, and, with ``profile_dir``, the share of profiled op time spent in collectives."""
    import jax
    import numpy as np

    import qlora_jax
    from qlora_jax import distributed
    from qlora_jax.sharding import batch_sharding, make_mesh, place, put_batch, replicated, shard
    from qlora_jax.train import init_opt_state, make_optimizer, make_train_step, split_model

    distributed.initialize()
    mesh = make_mesh(data=-1)
    model = qlora_jax.from_pretrained(ckpt, quantization=qlora_jax.QuantConfig(compute_dtype="float32"),
                                      gradient_checkpointing=True, mesh=mesh)
    qlora_jax.apply_lora(model, qlora_jax.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    parts = split_model(model)
    tx = make_optimizer(2e-4, num_training_steps=steps + 10, optim="paged_adamw_32bit")
    trainable = shard(parts.trainable, mesh)
    rngs = place(parts.rngs, replicated(mesh))
    opt_state = init_opt_state(tx, trainable, sharding=mesh)
    step = make_train_step(parts.graphdef, tx, opt_state=opt_state, trainable=trainable, rngs=rngs)
    ids = np.random.default_rng(0).integers(3, 1000, (1, batch_per_device * jax.device_count(), seq)).astype(np.int32)
    batch = {k: put_batch(v, batch_sharding(mesh)) for k, v in
             {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}.items()}
    state = [trainable, rngs, opt_state]

    def run():
        with jax.set_mesh(mesh):
            t, rg, o, m = step(state[0], state[1], parts.frozen, state[2], batch)
        float(m["loss"])
        state[:] = [t, rg, o]

    run()  # compile; median_seconds warms up once more, then times steps - 1 steps
    out = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
           "step_s": median_seconds(run, steps - 1), "tokens_per_step": int(ids.size)}
    if profile_dir is not None:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                run()
        coll, total = collective_seconds(profile_dir)
        out.update(collective_s=coll, op_s=total, collective_share=coll / total if total else float("nan"))
    return out


def main_subprocess(argv: list[str]) -> None:
    """``python -m qlora_jax.bench STACK CKPT JSON_KWARGS``: print one stack's figures as JSON."""
    stack, ckpt, kwargs = argv[0], argv[1], json.loads(argv[2])
    fn = {"qlora_jax": train_throughput_qlora_jax, "peft": train_throughput_peft,
          "multiprocess": multiprocess_step_time}[stack]
    print(json.dumps(fn(ckpt, **kwargs)))


if __name__ == "__main__":
    import sys

    main_subprocess(sys.argv[1:])
