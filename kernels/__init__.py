"""GPU and native CPU kernels of qlora_jax, installed as ``qlora_jax.kernels``.

This folder sits at the top of the repository (the product's design card) and is installed as a
subpackage, never as a top-level ``kernels`` module: that name belongs to an existing PyPI
package, which bitsandbytes itself tries to import.

Each kernel lives next to a ``reference_*`` pure-jnp oracle and takes an ``interpret`` switch;
kernels never import model code. The fused dequantize-matmul kernels arrive with the kernel issue;
until then the quantized-linear op's XLA path (dequantize, then dot) serves.
"""

__all__: list[str] = []
