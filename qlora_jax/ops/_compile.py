"""XLA compiler options for qlora_jax's training and evaluation programs on the CPU.

XLA:CPU (JAX 0.10) hands dots to YNNPACK fused with the elementwise work and reductions around
them. For attention that fusion is slow: the backward's ``dout @ v^T`` fused with the softmax
gradient's row sums ran ~98 ms a layer at the 1b preset's shapes (1 x 512 tokens, 32 heads); with
every dot alone through YNNPACK and the rest in XLA's own loops the attention's forward and
backward take 95 ms instead of 171 (scripts/bench_train.py figures: docs/benchmarks.md). The
option is passed per program (``jax.jit(..., compiler_options=...)``), never through the
process-wide XLA_FLAGS, so a user's other programs are left as they are.
"""

from __future__ import annotations

import functools
import os

import jax

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"


@functools.cache
def cpu_compiler_options() -> dict | None:
    """``{xla_cpu_experimental_ynn_fusion_type: LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT}`` where the
    default backend is the CPU and this XLA takes the option (tried once on a one-op program);
    None elsewhere, or with ``QLORA_JAX_CPU_DOT_FUSION=default`` (XLA's own choice)."""
    if os.environ.get("QLORA_JAX_CPU_DOT_FUSION") == "default" or jax.default_backend() != "cpu":
        return None
    options = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception:  # noqa: BLE001  (another XLA without this option or value: its defaults)
        return None
    return options
