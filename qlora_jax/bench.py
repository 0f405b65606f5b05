"""Measurement helpers for scripts/bench_*.py: peak anonymous memory and training throughput.

Each stack is measured in its own process so that its peak memory is its own (the scripts run
this module's functions in subprocesses). Figures are medians after a warm-up.
"""

from __future__ import annotations

import json
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


def main_subprocess(argv: list[str]) -> None:
    """``python -m qlora_jax.bench STACK CKPT JSON_KWARGS``: print one stack's figures as JSON."""
    stack, ckpt, kwargs = argv[0], argv[1], json.loads(argv[2])
    fn = {"qlora_jax": train_throughput_qlora_jax, "peft": train_throughput_peft}[stack]
    print(json.dumps(fn(ckpt, **kwargs)))


if __name__ == "__main__":
    import sys

    main_subprocess(sys.argv[1:])
