"""Hugging Face checkpoints on disk: find the safetensors files and read them one tensor at a time."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": jax.numpy.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _open(file: Path):
    """safe_open with a clear error for a missing, truncated or corrupt file."""
    try:
        return safe_open(file, "numpy")
    except Exception as e:  # safetensors raises its own error types (SafetensorError, OSError, ...)
        raise ValueError(f"cannot read safetensors file {str(file)!r}: {e}") from e


def resolve_checkpoint(path_or_hub_id: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory, or the hub snapshot of ``path_or_hub_id`` (needs network)."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{str(path)!r} is a file; expected a checkpoint directory or a hub id")
    if str(path_or_hub_id).count("/") > 1 or str(path_or_hub_id).startswith((".", "/")):
        raise ValueError(f"checkpoint directory {str(path)!r} does not exist")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_hub_id), revision=revision,
                                  allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


def _weight_files(ckpt: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it (single file or sharded index)."""
    index = ckpt / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: ckpt / fname for name, fname in weight_map.items()}
    single = ckpt / SINGLE_FILE
    if not single.exists():
        raise ValueError(f"{str(ckpt)!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def tensor_specs(ckpt: str | os.PathLike) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of every tensor, from the safetensors headers only (no data is read)."""
    ckpt = Path(ckpt)
    specs = {}
    by_file: dict[Path, list[str]] = {}
    for name, file in _weight_files(ckpt).items():
        by_file.setdefault(file, []).append(name)
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                sl = f.get_slice(name)
                specs[name] = jax.ShapeDtypeStruct(tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])
    return dict(sorted(specs.items()))


def _each_tensor(ckpt: str | os.PathLike):
    """Yield (open safetensors file, tensor name), file by file, names sorted within each file."""
    by_file: dict[Path, list[str]] = {}
    for name, file in _weight_files(Path(ckpt)).items():
        by_file.setdefault(file, []).append(name)
    for file in sorted(by_file):
        with _open(file) as f:
            for name in sorted(by_file[file]):
                yield f, name


def iter_tensors(ckpt: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time, file by file: host memory holds one tensor."""
    for f, name in _each_tensor(ckpt):
        yield name, f.get_tensor(name)


_BYTES_READ = [0]  # bytes of tensor data read through TensorReader (diagnostics, tests)


def bytes_read() -> int:
    """Bytes of tensor data this process has read through ``iter_tensor_readers`` so far."""
    return _BYTES_READ[0]


class TensorReader:
    """One checkpoint tensor, read lazily: ``shape``, ``dtype`` and ``reader[index]`` (a tuple of
    slices: only that part is read from the file)."""

    def __init__(self, handle):
        self._handle = handle
        self.shape = tuple(handle.get_shape())
        self.dtype = np.dtype(_DTYPES[handle.get_dtype()])

    def __getitem__(self, index) -> np.ndarray:
        part = np.asarray(self._handle[index])
        _BYTES_READ[0] += part.nbytes
        return part


def iter_tensor_readers(ckpt: str | os.PathLike) -> Iterator[tuple[str, TensorReader]]:
    """Yield (name, TensorReader) one tensor at a time, file by file (nothing read until indexed)."""
    for f, name in _each_tensor(ckpt):
        yield name, TensorReader(f.get_slice(name))


@functools.cache
def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``).

    Streaming a checkpoint frees one multi-MB tensor after another; glibc keeps such blocks in
    its heap once its mmap threshold has adapted to them, so the process's resident memory would
    climb towards the checkpoint's size although only one tensor is live at a time.
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_LONG_COMPILE_SECONDS = 1.0
_long_compile_since_trim = [False]


def _note_long_compile(event: str, duration: float, **_) -> None:
    if event == _COMPILE_EVENT and duration >= _LONG_COMPILE_SECONDS:
        _long_compile_since_trim[0] = True
        release_freed_memory()  # before the program's first run allocates its buffers


@functools.cache
def watch_compiles() -> None:
    """Note, from now on, every XLA compile that takes a second or more (a ``jax.monitoring``
    listener, registered once per process), for ``release_memory_after_compile``."""
    jax.monitoring.register_event_duration_secs_listener(_note_long_compile)


def release_memory_after_compile(wait_for=None) -> None:
    """``release_freed_memory`` if a long compile ran since the last call (``watch_compiles``),
    once ``wait_for`` (the outputs of the call that compiled) are ready.
    XLA:CPU's LLVM passes over a training step allocate a few hundred MB that glibc keeps in its
    heap once the compile is done (some freed only as the call that compiled returns): on the
    small comparison preset ~120 MB of the step's peak RSS. Short compiles (eager ops, ~ms each)
    do not trigger it: a trim walks the heap."""
    if _long_compile_since_trim[0]:
        _long_compile_since_trim[0] = False
        jax.block_until_ready(wait_for)
        release_freed_memory()
