"""GPU and native CPU kernels of qlora_jax, installed as ``qlora_jax.kernels``.

This folder sits at the top of the repository (the product's design card) and is installed as a
subpackage, never as a top-level ``kernels`` module: that name belongs to an existing PyPI
package, which bitsandbytes itself tries to import.

Each kernel lives next to a ``reference_*`` pure-jnp oracle and takes an ``interpret`` switch;
kernels never import model code.

- ``nf4_matmul``: the fused 4-bit dequantize-matmul in Pallas (Triton lowering): GEMM, skinny
  (decode) and dx kernels; ``qlora_jax.ops.qmatmul(backend="pallas")``.
- ``triton_nf4``: the same GEMM as a plain Triton kernel, called through jax-triton
  (``backend="triton"``, GPU only); imports Triton, nothing of jax-triton, so it runs under
  Triton's interpreter and compiles for sm_90 without a GPU.
- ``autotune``: block sizes measured on first use and cached on disk.
"""

__all__: list[str] = []
