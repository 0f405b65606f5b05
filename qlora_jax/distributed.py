"""Several processes that train as one: start-up through ``jax.distributed`` and the local launcher.

``initialize()`` joins the process group the environment describes, before any JAX computation:

* ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
  (read here and passed on): what ``qlora-jax launch`` sets, and what a user sets by hand on
  each host;
* otherwise a cluster JAX detects itself (SLURM, Open MPI, Kubernetes, Cloud TPU) when it
  reports more than one process;
* otherwise nothing: a single process needs no set-up.

``QLORA_JAX_CPU_COLLECTIVES=gloo`` (set by ``launch --cpu-devices-per-process``) selects gloo for
cross-process collectives on CPU. ``QLORA_JAX_DISTRIBUTED_TIMEOUT`` (seconds, default 300) bounds
the wait for the coordinator and for a silent peer: a process that cannot join, or whose peer
dies, ends with a clear error instead of hanging.

``launch(command, num_processes=N, cpu_devices_per_process=K)`` is the ``torchrun
--nproc-per-node`` of this library (``qlora-jax launch``): N local processes with that
environment, their output streamed with a ``[rank]`` prefix; if one fails, the others are stopped
and the launcher exits non-zero naming it, with its last lines.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_COLLECTIVES = "QLORA_JAX_CPU_COLLECTIVES"
ENV_TIMEOUT = "QLORA_JAX_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT = 300


class DistributedError(RuntimeError):
    """A process group that cannot form (the coordinator unreachable, a join timed out)."""


_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def timeout_seconds() -> int:
    t = _int_env(ENV_TIMEOUT)
    if t is not None and t <= 0:
        raise ValueError(f"{ENV_TIMEOUT}={t} must be a positive number of seconds")
    return DEFAULT_TIMEOUT if t is None else t


def initialize() -> bool:
    """Join the process group the environment describes (see the module doc); True when this run
    has several processes. Safe to call twice."""
    import jax

    if jax.distributed.is_initialized():
        return True
    num, pid = _int_env(ENV_NUM_PROCESSES), _int_env(ENV_PROCESS_ID)
    coordinator = os.environ.get(ENV_COORDINATOR) or None
    explicit = coordinator is not None or num is not None or pid is not None
    clustered = any((_int_env(v) or 0) > 1 for v in _CLUSTER_SIZE_VARS)
    if not explicit and not clustered:
        return False
    if explicit:
        missing = [name for name, v in ((ENV_COORDINATOR, coordinator), (ENV_NUM_PROCESSES, num),
                                        (ENV_PROCESS_ID, pid)) if v is None]
        if missing:
            raise ValueError(f"a multi-process run needs {ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}; "
                             f"{', '.join(missing)} not set")
        if num < 1 or not 0 <= pid < num:
            raise ValueError(f"{ENV_PROCESS_ID}={pid} must be in [0, {ENV_NUM_PROCESSES}={num})")
        if num == 1:
            return False
    collectives = os.environ.get(ENV_COLLECTIVES)
    if collectives:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    timeout = timeout_seconds()
    if coordinator is not None and pid != 0:
        # JAX's client aborts the process when it cannot register (a fatal log, no exception): find
        # an unreachable coordinator first and say so
        _wait_for(coordinator, timeout, pid, num)
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                                   initialization_timeout=timeout,
                                   heartbeat_timeout_seconds=max(10, min(timeout, 100)))
    except Exception as e:  # noqa: BLE001 - re-raised with what to check
        where = coordinator or "the coordinator the cluster names"
        first = str(e).splitlines()[0] if str(e) else ""
        raise DistributedError(f"process {pid} of {num} could not join the process group at {where} within "
                               f"{timeout} s ({ENV_TIMEOUT}): {type(e).__name__}: {first}; check that process 0 runs "
                               "and that its address and port are reachable from every host") from e
    return jax.process_count() > 1


def _wait_for(coordinator: str, timeout: int, pid, num) -> None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{ENV_COORDINATOR}={coordinator!r} is not host:port")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"process {pid} of {num}: the coordinator at {coordinator} cannot be reached "
                                       f"after {timeout} s ({ENV_TIMEOUT}): {e.strerror or e}; check that process 0 "
                                       "runs and that this address and port are reachable from every host") from None
            time.sleep(0.5)


def is_main_process() -> bool:
    """True in process 0 (or a single process): the one that logs and writes run outputs."""
    import jax

    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process reaches this point (nothing to wait for in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(rank: int, num_processes: int, coordinator: str, *, cpu_devices_per_process: int = 0,
                timeout: int = DEFAULT_TIMEOUT, base: dict | None = None) -> dict:
    """The environment of local process ``rank`` (what ``launch`` gives each process)."""
    env = dict(os.environ if base is None else base)
    env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(rank),
                ENV_TIMEOUT: str(timeout), "PYTHONUNBUFFERED": "1"})
    if cpu_devices_per_process > 0:
        forced = "--xla_force_host_platform_device_count"
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(forced)]
        env["XLA_FLAGS"] = " ".join([*flags, f"{forced}={cpu_devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
        env[ENV_COLLECTIVES] = "gloo"
    return env


def launch(command: list[str], *, num_processes: int, cpu_devices_per_process: int = 0,
           timeout: int = DEFAULT_TIMEOUT, port: int | None = None, out=None) -> int:
    """Run ``command`` (a ``qlora-jax`` subcommand and its arguments, e.g. ``["train", "run.yaml"]``)
    in ``num_processes`` local processes that form one JAX process group; returns the exit code
    (0 when every process succeeded). Output lines are prefixed with ``[rank]``."""
    if num_processes < 1:
        raise ValueError(f"--num-processes={num_processes} must be at least 1")
    if cpu_devices_per_process < 0:
        raise ValueError(f"--cpu-devices-per-process={cpu_devices_per_process} must be 0 (the machine's devices) "
                         "or a positive count of forced CPU devices")
    if not command:
        raise ValueError("launch needs a command after '--', e.g. qlora-jax launch --num-processes 2 -- train run.yaml")
    out = out or sys.stdout
    coordinator = f"127.0.0.1:{port or _free_port()}"
    lock = threading.Lock()
    tails = [collections.deque(maxlen=20) for _ in range(num_processes)]
    procs = []
    for rank in range(num_processes):
        env = process_env(rank, num_processes, coordinator, cpu_devices_per_process=cpu_devices_per_process,
                          timeout=timeout)
        # -P: the working directory off sys.path (a checkout's kernels/ folder is not PyPI's `kernels`)
        procs.append(subprocess.Popen([sys.executable, "-P", "-m", "qlora_jax.cli", *command], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                      start_new_session=True))

    def pump(rank, stream):
        for line in stream:
            tails[rank].append(line.rstrip("\n"))
            with lock:
                out.write(f"[{rank}] {line}" if line.endswith("\n") else f"[{rank}] {line}\n")
                out.flush()

    readers = [threading.Thread(target=pump, args=(r, p.stdout), daemon=True) for r, p in enumerate(procs)]
    for t in readers:
        t.start()

    def stop_all():
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    failed = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
            if failed is not None or all(c == 0 for c in codes):
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        stop_all()
        raise
    if failed is not None:
        stop_all()
    for t in readers:
        t.join(timeout=5)
    if failed is None:
        return 0
    rank, code = failed
    why = f"signal {-code}" if code < 0 else f"exit code {code}"
    with lock:
        out.write(f"qlora-jax launch: process {rank} of {num_processes} failed ({why}); stopped the others. "
                  f"Its last lines:\n" + "".join(f"  [{rank}] {line}\n" for line in tails[rank]))
        out.flush()
    return code if code > 0 else 1
