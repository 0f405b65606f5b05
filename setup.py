"""Package discovery only (metadata lives in pyproject.toml).

The top-level ``kernels/`` folder is installed as ``qlora_jax.kernels`` (a top-level ``kernels``
module would clash with the PyPI package of that name), so its packages are renamed here.
"""

from setuptools import find_packages, setup

kernel_packages = ["qlora_jax.kernels"] + [f"qlora_jax.kernels.{p}" for p in find_packages("kernels")]
setup(
    packages=find_packages(include=["qlora_jax", "qlora_jax.*"]) + kernel_packages,
    package_dir={p: p.replace("qlora_jax.kernels", "kernels", 1).replace(".", "/") for p in kernel_packages},
    # the native CPU kernel's source, compiled on first use (qlora_jax.kernels.cpu_nf4)
    package_data={"qlora_jax.kernels": ["cpu/*.cc", "cpu/*.h"]},
)
