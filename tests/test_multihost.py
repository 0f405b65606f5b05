"""Several processes that train as one (jax.distributed over gloo on 127.0.0.1): ``qlora-jax
launch`` with 2 processes x 4 CPU devices against 1 process x 8 devices; checkpoints written by
one process count restore in the other; a dying peer and an unreachable coordinator end the run
with a clear message within the timeout."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bnb_ref import write_count_task

from qlora_jax import distributed

CLI = [sys.executable, "-P", "-m", "qlora_jax.cli"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    base, data = write_count_task(root)
    common = [f"model={base}", f"data.path={data}", "model.dtype=float32",
              "quantization.compute_dtype=float32", "training.logging_steps=1", "training.learning_rate=1e-3",
              "training.lr_scheduler_type=constant", "training.disable_tqdm=true", "training.report_to=[]",
              "training.plot_loss=false", "data.validation_split=0.2", "training.eval_steps=2",
              "data.max_seq_length=64", "training.save_steps=2", "training.per_device_train_batch_size=1"]
    return root, common


def _launch(processes, devices, args, *, timeout=600, check=True):
    cmd = [*CLI, "launch", "--num-processes", str(processes), "--cpu-devices-per-process", str(devices),
           "--timeout", "120", "--", "train", *args]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"launch failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    return done


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _assert_same_run(run: Path, reference: Path):
    a, b = _metrics(run), _metrics(reference)
    assert [x["step"] for x in a] == [x["step"] for x in b], (a, b)
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss"):
            if key in y:
                np.testing.assert_allclose(x[key], y[key], rtol=1e-5, err_msg=f"{run.name} step {y['step']} {key}")
    ours, theirs = _adapter(run), _adapter(reference)
    assert ours.keys() == theirs.keys()
    # AdamW: a rounding-level change of a near-zero gradient moves its step by up to lr (1e-3); see
    # test_sharding for the SGD check that the gradients themselves agree to fp32 reduction order
    drift = max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours)
    assert drift <= 0.05 * 1e-3, f"{run.name}: adapters differ by {drift}"


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_across_process_counts(task):
    """2 processes x 4 devices (data=8; data=2 x fsdp=4) give the per-step losses, eval losses and
    final adapter of 1 process x 8 devices. A run saved at step 2 by 2 processes resumes in 1
    process, and one saved by 1 process resumes in 2, both continuing as the uninterrupted run.
    Only process 0 writes metrics and the adapter; the launcher prefixes output by rank."""
    root, common = task
    four = ["training.max_steps=4"]
    exact = ["training.eval_exact_match=true"]  # greedy generation on the sharded model, before and after
    _launch(1, 8, [*common, *four, *exact, f"output_dir={root / 'one'}"])
    two = _launch(2, 4, [*common, *four, *exact, f"output_dir={root / 'two'}"])
    assert "[0] step 4/4" in two.stdout and "[1] step" not in two.stdout  # process 1 stays quiet
    _assert_same_run(root / "two", root / "one")
    summaries = [json.loads((root / d / "eval_summary.json").read_text()) for d in ("two", "one")]
    for when in ("before", "after"):
        assert summaries[0][when]["exact_match"] == summaries[1][when]["exact_match"], summaries
        assert summaries[0][when]["num_eval_prompts"] == summaries[1][when]["num_eval_prompts"] > 0
    fsdp = ["mesh.data=2", "mesh.fsdp=4"]
    _launch(2, 4, [*common, *fsdp, "training.max_steps=2", f"output_dir={root / 'two_then_one'}"])
    _launch(1, 8, [*common, *four, "resume=true", f"output_dir={root / 'two_then_one'}"])
    _assert_same_run(root / "two_then_one", root / "one")
    _launch(1, 8, [*common, "training.max_steps=2", f"output_dir={root / 'one_then_two'}"])
    resumed = _launch(2, 4, [*common, *fsdp, *four, "resume=true", f"output_dir={root / 'one_then_two'}"])
    assert "resumed from step 2" in resumed.stdout
    _assert_same_run(root / "one_then_two", root / "one")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"JAX_PROCESS_ID="):
            return int(item.split(b"=", 1)[1])
    return None


@pytest.mark.slow
def test_launcher_stops_every_process_when_one_dies(task):
    root, common = task
    cmd = [*CLI, "launch", "--num-processes", "2", "--cpu-devices-per-process", "4", "--timeout", "60", "--", "train",
           *common, "training.max_steps=10000", "training.save_steps=10000", f"output_dir={root / 'killed'}"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, started = [], threading.Event()

    def read():
        for line in launcher.stdout:
            lines.append(line)
            if "[0] step 1/" in line:
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(600), "".join(lines[-30:])
        children = _children(launcher.pid)
        victim = next(p for p in children if _rank(p) == 1)
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        code = launcher.wait(timeout=90)
        elapsed = time.monotonic() - t0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    reader.join(timeout=10)
    text = "".join(lines)
    assert code != 0 and elapsed < 60, (code, elapsed)
    assert "process 1 of 2 failed (signal 9); stopped the others" in text, text[-3000:]
    assert all(_rank(p) is None for p in children)  # no process left behind


@pytest.mark.slow
def test_unreachable_coordinator_fails_fast_with_a_clear_error(task):
    root, common = task
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "QLORA_JAX_DISTRIBUTED_TIMEOUT": "5", "JAX_PLATFORMS": "cpu"}
    t0 = time.monotonic()
    done = subprocess.run([*CLI, "train", *common, f"output_dir={root / 'unreachable'}"], env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert done.returncode == 2, done.stderr[-2000:]
    assert "process 1 of 2: the coordinator at 127.0.0.1:1 cannot be reached after 5 s" in done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed < 5 + 60


def test_start_up_reads_the_environment(monkeypatch):
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID,
                 "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # a single process needs nothing
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "2")
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "x")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='x' is not an integer"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "0")
    assert distributed.initialize() is False  # one process out of one
    monkeypatch.setenv(distributed.ENV_TIMEOUT, "0")
    with pytest.raises(ValueError, match="QLORA_JAX_DISTRIBUTED_TIMEOUT=0 must be a positive"):
        distributed.timeout_seconds()


def test_launch_environment_and_arguments():
    env = distributed.process_env(1, 2, "127.0.0.1:5555", cpu_devices_per_process=4, timeout=30,
                                  base={"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:5555" and env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_PROCESS_ID"] == "1" and env["QLORA_JAX_DISTRIBUTED_TIMEOUT"] == "30"
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["QLORA_JAX_CPU_COLLECTIVES"] == "gloo"
    plain = distributed.process_env(0, 2, "h:1", base={})
    assert "JAX_PLATFORMS" not in plain and "XLA_FLAGS" not in plain
    with pytest.raises(ValueError, match="--num-processes=0 must be at least 1"):
        distributed.launch(["train"], num_processes=0)
    with pytest.raises(ValueError, match="needs a command after '--'"):
        distributed.launch([], num_processes=2)
    from qlora_jax import cli

    assert cli.main(["launch", "--num-processes", "2", "--", "launch"]) == 2


def test_launcher_runs_processes_and_reports_the_failing_one(tmp_path, capsys):
    """The launcher on a command that fails in process 1 only (no JAX needed): exit code, names it, its
    last lines; every line prefixed with its rank."""
    import io

    out = io.StringIO()
    # `qlora-jax info` of a missing checkpoint fails the same in every process: the first failure is named
    code = distributed.launch(["info", str(tmp_path / "missing")], num_processes=2, out=out)
    text = out.getvalue()
    assert code == 2
    assert "failed (exit code 2); stopped the others" in text
    assert all(line.startswith(("[0] ", "[1] ", "qlora-jax launch:", "  [")) for line in text.splitlines() if line)


LOAD = """
import json, sys
from qlora_jax import distributed
distributed.initialize()
import jax, numpy as np, qlora_jax
from flax import nnx
from jax.experimental import multihost_utils
from qlora_jax.models._checkpoint import bytes_read, tensor_specs
from qlora_jax.sharding import make_mesh

path, out = sys.argv[1], {}
total = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in tensor_specs(path).values())
reference = qlora_jax.from_pretrained(path, quantization=qlora_jax.QuantConfig())  # this process, whole tensors
for name, shape in (("fsdp8", (1, 8, 1)), ("tensor2_fsdp4", (1, 4, 2)), ("data8", (8, 1, 1))):
    before = bytes_read()
    model = qlora_jax.from_pretrained(path, quantization=qlora_jax.QuantConfig(), mesh=make_mesh(*shape))
    read = bytes_read() - before
    ours, ref = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reference))
    same = all(np.array_equal(multihost_utils.process_allgather(x, tiled=True), np.asarray(y)) for x, y in zip(ours, ref))
    out[name] = {"read_fraction": read / total, "bit_identical": bool(same)}
if jax.process_index() == 0:
    json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
def test_each_process_reads_only_its_shards_and_quantizes_exactly(task, tmp_path):
    """2 processes x 4 devices load the tiny checkpoint onto fsdp=8 and tensor=2 x fsdp=4 meshes:
    each process reads about half of the checkpoint's bytes (its devices' rows of each linear and
    columns of the embeddings), and the gathered model (NF4 codes, absmax codes, nested scales,
    offsets, dense weights) equals the one-process load bit for bit, the offsets included (the
    bands' absmax are gathered for double quantization). A mesh whose devices each hold a whole
    copy (data=8) reads everything."""
    root, _ = task
    script = tmp_path / "load.py"
    script.write_text(LOAD)
    coordinator = f"127.0.0.1:{distributed._free_port()}"
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, str(script), str(root / "tiny"), str(tmp_path / "out.json")],
                              env=distributed.process_env(r, 2, coordinator, cpu_devices_per_process=4, timeout=120,
                                                          base=base),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    out = json.loads((tmp_path / "out.json").read_text())
    for name in ("fsdp8", "tensor2_fsdp4"):
        assert out[name]["bit_identical"], name
        assert 0.45 < out[name]["read_fraction"] < 0.55, (name, out[name])
    assert out["data8"]["bit_identical"] and out["data8"]["read_fraction"] > 0.99


@pytest.mark.slow
def test_a_dead_peer_ends_the_others_within_the_timeout_without_a_launcher(task):
    """Two hosts' processes started by hand (no launcher to stop them): when process 1 dies, JAX's
    heartbeat (QLORA_JAX_DISTRIBUTED_TIMEOUT=15 s) ends process 0 within the timeout, with a message
    naming the task that stopped."""
    root, common = task
    coordinator = f"127.0.0.1:{distributed._free_port()}"
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    args = [*common, "training.max_steps=100000", "training.save_steps=100000", f"output_dir={root / 'peer'}"]
    procs = [subprocess.Popen([*CLI, "train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=distributed.process_env(r, 2, coordinator, cpu_devices_per_process=4, timeout=15,
                                                          base=base)) for r in range(2)]
    lines, stepping = [], threading.Event()

    def read():
        for line in procs[0].stdout:
            lines.append(line)
            if "step 2/" in line:
                stepping.set()
    threading.Thread(target=read, daemon=True).start()
    threading.Thread(target=lambda: procs[1].stdout.read(), daemon=True).start()
    try:
        assert stepping.wait(600), "".join(lines[-30:])
        t0 = time.monotonic()
        procs[1].kill()
        code = procs[0].wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(1)
    text = "".join(lines)
    assert code != 0 and elapsed < 15 + 30, (code, elapsed)
    assert "tasks are unhealthy (stopped sending heartbeats)" in text and "another task died" in text, text[-3000:]
