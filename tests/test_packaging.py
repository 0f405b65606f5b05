"""The package as users install it: the wheel, the editable install, the console script."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import qlora_jax
import qlora_jax.kernels

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_kernels_as_a_subpackage(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("qlora_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "qlora_jax/kernels/__init__.py" in names
    for source in ("nf4_gemv.cc", "nf4_gemm.cc", "common.h"):  # the CPU kernels' sources, built on first use
        assert f"qlora_jax/kernels/cpu/{source}" in names
    assert "qlora_jax/quant/_core.py" in names and "qlora_jax/models/_checkpoint.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level 'kernels' would shadow the PyPI package"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "qlora-jax = qlora_jax.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    # Import from the wheel itself (a pure-Python wheel is importable as a zip), not from the checkout.
    code = "import qlora_jax.kernels, qlora_jax.quant; print(qlora_jax.kernels.__file__)"
    env = {**os.environ, "PYTHONPATH": str(wheel)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env=env, cwd=tmp_path).stdout.strip()
    assert out.startswith(str(wheel)), out


def test_installed_kernels_package_location():
    """Editable install (the package imported from this checkout): qlora_jax.kernels is the
    top-level kernels/ folder. Regular install: it sits inside the installed qlora_jax."""
    package_dir = Path(qlora_jax.__file__).resolve().parent
    kernels_file = Path(qlora_jax.kernels.__file__).resolve()
    if package_dir == ROOT / "qlora_jax":
        assert kernels_file == ROOT / "kernels" / "__init__.py"
    else:
        assert kernels_file == package_dir / "kernels" / "__init__.py"


def test_console_script():
    script = Path(sys.executable).parent / "qlora-jax"  # installed beside this environment's python
    out = subprocess.run([str(script), "--help"], check=True, capture_output=True, text=True).stdout
    assert "info" in out


def test_top_level_api():
    for name in ("quantize", "dequantize", "QuantizedArray", "quantize_params", "to_bnb_state", "from_bnb_state"):
        assert name in qlora_jax.__all__ and hasattr(qlora_jax, name)
