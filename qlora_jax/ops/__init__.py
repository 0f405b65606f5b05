"""The one quantized-linear op that every model linear calls (design principle 3)."""

from ._head import linear_cross_entropy_sum
from ._qmatmul import BACKENDS, qmatmul

__all__ = ["BACKENDS", "linear_cross_entropy_sum", "qmatmul"]
