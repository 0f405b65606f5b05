"""Faults during saving: a run killed mid-save resumes from the last complete checkpoint, and a full
disk stops the run with a clear message, loses nothing, and resumes bit-identically once space is freed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import backend as epath_backend
from safetensors import SafetensorError

from qlora_jax.checkpoint import RunCheckpointer, is_disk_full
from qlora_jax.config import load_config
from qlora_jax.lora import _peft
from qlora_jax.train import train

from bnb_ref import write_reverse_task

TMP = ".orbax-checkpoint-tmp"  # Orbax writes step N into N.orbax-checkpoint-tmp, renamed to N when complete

# The child: trains; when Orbax is about to commit step `kill_at` (every item written into the step's
# temporary directory, before the rename that makes it a checkpoint), it writes `marker` and hangs there.
CHILD = """
import json, sys, time
from pathlib import Path
from orbax.checkpoint._src.path import atomicity
from qlora_jax.config import load_config
from qlora_jax.train import train

overrides, kill_at, marker = json.loads(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
commit = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):
    final = self.get_final()
    if final.name == kill_at and final.parent.name == "checkpoints":  # the step's commit, not one item's
        marker.write_text(str(self.get()))
        time.sleep(600)
    return await commit(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
train(load_config(None, overrides), log=print)
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return (*write_reverse_task(root), root)


def _overrides(setup, out, *extra) -> list[str]:
    """6 steps, a checkpoint every 2, dropout on (so the RNG state must resume exactly too)."""
    base, data, _ = setup
    return [f"model={base}", f"data.path={data}", f"output_dir={out}", "model.dtype=float32",
            "quantization.compute_dtype=float32", "lora.r=8", "lora.lora_alpha=16", "lora.lora_dropout=0.1",
            "training.max_steps=6", "training.save_steps=2", "training.logging_steps=1",
            "training.per_device_train_batch_size=4", "training.gradient_accumulation_steps=2",
            "training.learning_rate=3e-3", "training.lr_scheduler_type=linear", "training.warmup_steps=2",
            "data.max_seq_length=64", *extra]


def _adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def straight(setup):
    """The uninterrupted run every faulted run must end up identical to: (adapter bytes, trained model)."""
    out = setup[2] / "straight"
    result = train(load_config(None, _overrides(setup, out)), log=lambda *_: None)
    return _adapter_bytes(out), result["model"]


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_run_killed_mid_save_resumes_from_last_complete_checkpoint(setup, straight, tmp_path):
    out = tmp_path / "run"
    overrides = _overrides(setup, out)
    script, marker, log = tmp_path / "child.py", tmp_path / "committing", tmp_path / "child.log"
    script.write_text(CHILD)
    with log.open("w") as sink:
        child = subprocess.Popen([sys.executable, str(script), json.dumps(overrides), "4", str(marker)],
                                 env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not marker.exists():
                assert child.poll() is None, f"the child ended before saving step 4:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"the save of step 4 never started:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(60)
    assert child.returncode == -signal.SIGKILL

    checkpoints = out / "checkpoints"
    partial = checkpoints / f"4{TMP}"
    assert Path(marker.read_text()) == partial
    names = _listing(checkpoints)
    assert "2" in names and "4" not in names and partial.name in names, names
    assert {"trainable", "opt_state", "meta"} <= set(os.listdir(partial))  # written, but never committed
    assert ocp.utils.checkpoint_steps(checkpoints) == [2]  # Orbax never takes the temporary for a step
    assert not (out / "adapter").exists()
    opened = RunCheckpointer(checkpoints)
    try:
        assert opened.latest_step() == 2
        assert not partial.exists()  # removed on opening
    finally:
        opened.close()

    messages = []
    result = train(load_config(None, overrides), log=messages.append)
    assert result["step"] == 6
    assert any(m.startswith("resumed from step 2 ") for m in messages), messages
    assert _listing(checkpoints) == ["2", "4", "6"]
    assert _adapter_bytes(out) == straight[0]


def test_disk_full_during_a_checkpoint_stops_the_run_and_loses_nothing(setup, straight, tmp_path, monkeypatch):
    """ENOSPC on every file Orbax writes for step 4 (its JSON/metadata files, through etils' local backend);
    with save_total_limit=1, step 2 is due for deletion once step 4 is complete, so it must survive."""
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    config = load_config(None, _overrides(setup, out, "training.save_total_limit=1"))
    refused = []
    real_open = epath_backend._OsPathBackend.open

    def full_disk_open(self, path, mode):
        if str(path).startswith(str(checkpoints / f"4{TMP}")) and set(mode) & set("wax+"):
            refused.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(self, path, mode)

    monkeypatch.setattr(epath_backend._OsPathBackend, "open", full_disk_open)
    messages = []
    with pytest.raises(OSError) as failure:
        train(config, log=messages.append)
    assert refused, "the fault was never injected: Orbax no longer writes through etils' local backend"
    error = failure.value
    assert error.errno == errno.ENOSPC and is_disk_full(error.__cause__)
    text = str(error)
    for part in ("the disk is full", f"saving checkpoint step 4 to {checkpoints}.",
                 f"the last complete checkpoint is step 2 ({checkpoints / '2'})", "resume from step 2"):
        assert part in text, text
    assert not (out / "adapter").exists()
    assert _listing(checkpoints) == ["2"]  # step 2 kept although due for rotation; the partial step 4 discarded

    monkeypatch.undo()  # space freed

    messages = []
    result = train(config, log=messages.append)
    assert result["step"] == 6 and any(m.startswith("resumed from step 2 ") for m in messages), messages
    assert _listing(checkpoints) == ["6"]
    assert _adapter_bytes(out) == straight[0]


def test_disk_full_reported_by_tensorstore_names_the_step_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    """Array data is written by tensorstore, which reports a full disk as a ValueError. The failure
    surfaces at the next save (saving is asynchronous) and must still name the step that failed."""
    from orbax.checkpoint._src.serialization import serialization

    real_write = serialization.async_serialize_from_host
    tensorstore_error = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed writing: '
                                   "Failed to write 4096 bytes to file 7: No space left on device [os_error_code='28']")

    async def full_disk_write(*args, **kwargs):
        if f"4{TMP}" in str(args) + str(kwargs):
            raise tensorstore_error
        return await real_write(*args, **kwargs)

    checkpointer = RunCheckpointer(tmp_path, max_to_keep=1)
    checkpointer.save(2, {"a": {"w": jnp.arange(8.0)}}, {"step": 2})
    monkeypatch.setattr(serialization, "async_serialize_from_host", full_disk_write)
    checkpointer.save(4, {"a": {"w": jnp.arange(8.0) + 1}}, {"step": 4})
    assert checkpointer.latest_step() == 2  # step 4 is still being written: not a checkpoint yet
    with pytest.raises(OSError, match="the disk is full") as failure:
        checkpointer.save(6, {"a": {"w": jnp.arange(8.0) + 2}}, {"step": 6})
    assert failure.value.errno == errno.ENOSPC and failure.value.__cause__ is tensorstore_error
    assert "saving checkpoint step 4 to" in str(failure.value) and "last complete checkpoint is step 2" in str(
        failure.value)
    assert checkpointer.latest_step() == 2 and _listing(tmp_path) == ["2"]
    checkpointer.close()  # the failure was reported once; closing is clean
    monkeypatch.undo()
    reopened = RunCheckpointer(tmp_path, max_to_keep=1)
    restored, meta = reopened.restore(2, {"a": {"w": jnp.zeros(8)}})
    assert meta == {"step": 2} and np.array_equal(restored["a"]["w"], np.arange(8.0))
    reopened.close()
    assert _listing(tmp_path) == ["2"]


def test_disk_full_while_writing_the_final_adapter(setup, straight, tmp_path, monkeypatch):
    """safetensors reports a full disk as a SafetensorError, after writing part of the file: no adapter
    directory may be left, the message must be clear, and rerunning the finished run writes it."""
    out = tmp_path / "run"
    config = load_config(None, _overrides(setup, out))
    real_save_file = _peft.save_file

    def full_disk_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(_peft, "save_file", full_disk_save_file)
    with pytest.raises(OSError, match=r"the disk is full .* writing the adapter to .*; nothing was written there\.") \
            as failure:
        train(config, log=lambda *_: None)
    assert failure.value.errno == errno.ENOSPC
    assert str(out / "adapter") in str(failure.value)
    assert not (out / "adapter").exists() and not [p for p in out.iterdir() if p.name.startswith(".adapter")]
    assert [n for n in _listing(out / "checkpoints") if n.isdigit()] == ["2", "4", "6"]

    monkeypatch.setattr(_peft, "save_file", real_save_file)
    messages = []
    assert train(config, log=messages.append)["step"] == 6
    assert any(m.startswith("resumed from step 6 ") for m in messages), messages
    assert _adapter_bytes(out) == straight[0]


@pytest.mark.parametrize("failing", ["weights", "config"])
def test_disk_full_keeps_an_existing_adapter(straight, tmp_path, monkeypatch, failing):
    model = straight[1]
    target = tmp_path / "adapter"
    _peft.save_adapter(model, target)
    (target / _peft.WEIGHTS_NAME).write_bytes(b"previous weights")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    if failing == "weights":
        def fail(*_, **__):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(_peft, "save_file", fail)
    else:
        real_write_text = Path.write_text

        def fail(self, *args, **kwargs):
            if self.name == _peft.CONFIG_NAME:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
            return real_write_text(self, *args, **kwargs)
        monkeypatch.setattr(Path, "write_text", fail)
    with pytest.raises(OSError, match="the disk is full .*; the adapter already there is unchanged") as failure:
        _peft.save_adapter(model, target)
    assert failure.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _listing(tmp_path) == ["adapter"]


# A real full disk: a 256 KiB tmpfs in a private mount namespace (needs unshare and user namespaces).
REAL_DISK = """
import errno, json, os, sys
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file
from qlora_jax.checkpoint import RunCheckpointer, is_disk_full

root = sys.argv[1]
checkpointer = RunCheckpointer(os.path.join(root, "checkpoints"), max_to_keep=1)
checkpointer.save(2, {"a": {"w": jnp.arange(8.0)}}, {"step": 2})
checkpointer.save(4, {"a": {"w": jnp.arange(1e6)}}, {"step": 4})  # 4 MB
try:
    checkpointer.close()
    checkpoint_error = None
except OSError as e:
    checkpoint_error = [e.errno, str(e)]
try:
    save_file({"w": np.zeros(10**6, np.float32)}, os.path.join(root, "w.safetensors"))
    adapter_disk_full = None
except Exception as e:
    adapter_disk_full = is_disk_full(e)
print(json.dumps({"checkpoint_error": checkpoint_error, "adapter_disk_full": adapter_disk_full,
                  "left": sorted(os.listdir(os.path.join(root, "checkpoints")))}))
"""


def test_a_real_full_disk(tmp_path):
    """The simulated errors above have the shapes tensorstore and safetensors really raise: check on a real
    tiny file system where one can be mounted."""
    mount = tmp_path / "disk"
    mount.mkdir()
    script = tmp_path / "real_disk.py"
    script.write_text(REAL_DISK)
    command = f"mount -t tmpfs -o size=256k tmpfs {mount} || exit 77; exec {sys.executable} {script} {mount}"
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command],
                              env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
    except FileNotFoundError:
        pytest.skip("no unshare")
    if done.returncode == 77 or done.stderr.startswith("unshare:"):
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    code, text = result["checkpoint_error"]
    assert code == errno.ENOSPC and "the disk is full" in text and "saving checkpoint step 4" in text, text
    assert "the last complete checkpoint is step 2" in text, text
    assert result["left"] == ["2"] and result["adapter_disk_full"] is True
