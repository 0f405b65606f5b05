"""Block sizes chosen by measurement on first use, remembered on disk.

``Autotuner.best(kernel, key, candidates, make)`` times each candidate configuration (a dict of
the kernel's static block arguments) on the current device and returns the fastest; the answer
is stored in a JSON file (``$QLORA_JAX_CACHE/autotune.json``, default ``~/.cache/qlora_jax``)
under the device kind, the JAX version, the kernel and the key (shapes, dtypes, quantization),
so the next process reads it instead of measuring. Candidates that fail to compile or run (too
much shared memory, say) are skipped. Timing follows the device method: inputs are random (never
zeros), one warm-up call, then the median of several timed calls, each waited for.

Tuning runs while the caller's function is being traced (the op is called inside ``jit``); the
measurements run on a worker thread, which has no trace of its own, so the candidates compile and
run for real (``ensure_compile_time_eval`` would instead evaluate the kernel body's primitives one
by one). The file is rewritten atomically
(temporary file, then rename) after merging what other processes wrote meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax

ENV_DISABLE = "QLORA_JAX_AUTOTUNE"  # "0": never measure, use the first candidate (the default)


def cache_file() -> Path:
    root = os.environ.get("QLORA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qlora_jax")
    return Path(root) / "autotune.json"


def _device_kind() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind}"


def time_call(fn: Callable[[], object], repeats: int = 10) -> float:
    """Median seconds of ``fn()`` (its result waited for), after one warm-up call."""
    jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class Autotuner:
    """Chooses and remembers kernel configurations. ``timer(fn) -> seconds`` is replaceable
    (tests); ``path`` defaults to ``cache_file()``."""

    def __init__(self, path: str | os.PathLike | None = None, timer: Callable[[Callable], float] = time_call):
        self.path = Path(path) if path is not None else cache_file()
        self.timer = timer
        self._memory: dict[str, dict] = {}

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):  # missing or unreadable: measure again
            return {}

    def _write(self, entry: str, config: dict, seconds: dict) -> None:
        data = self._read()
        data[entry] = {"config": config, "seconds": seconds}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".autotune.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:  # a read-only or full disk costs a re-measurement next time, nothing else
            pass

    def entry(self, kernel: str, key: dict) -> str:
        return json.dumps({"device": _device_kind(), "jax": jax.__version__, "kernel": kernel, **key},
                          sort_keys=True)

    def best(self, kernel: str, key: dict, candidates: list[dict],
             make: Callable[[dict], Callable[[], object]]) -> dict:
        """The fastest of ``candidates`` for ``key``; ``make(config)`` returns a no-argument
        callable running the kernel so configured on representative inputs."""
        if not candidates:
            raise ValueError("no candidate configurations to choose from")
        if os.environ.get(ENV_DISABLE) == "0":
            return candidates[0]
        entry = self.entry(kernel, key)
        if entry in self._memory:
            return self._memory[entry]
        stored = self._read().get(entry)
        if stored is not None and stored.get("config") in candidates:
            self._memory[entry] = stored["config"]
            return stored["config"]
        def measure() -> dict:
            out = {}
            for config in candidates:
                try:
                    out[json.dumps(config, sort_keys=True)] = self.timer(make(config))
                except Exception:  # does not compile or run on this device: not a candidate here
                    continue
            return out

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # outside the caller's trace
            seconds = pool.submit(measure).result()
        if not seconds:
            raise RuntimeError(f"no configuration of kernel {kernel} ran for {key}; tried {candidates}")
        best = json.loads(min(seconds, key=seconds.get))
        self._memory[entry] = best
        self._write(entry, best, seconds)
        return best


_DEFAULT: Autotuner | None = None


def default_tuner() -> Autotuner:
    global _DEFAULT
    if _DEFAULT is None or _DEFAULT.path != cache_file():
        _DEFAULT = Autotuner()
    return _DEFAULT
