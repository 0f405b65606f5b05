"""The one quantized-linear op that every model linear calls (design principle 3)."""

from ._qmatmul import BACKENDS, qmatmul

__all__ = ["BACKENDS", "qmatmul"]
