"""Joining a multi-process JAX run: one process per TPU VM host, or one per GPU.

The settings come from ``config.distributed``; those left empty come from the cluster: SLURM
(``srun``), or JAX's own detection (Cloud TPU, Open MPI, ``JAX_COORDINATOR_ADDRESS``). They are
checked before anything connects, and every wait is bounded, so a bad setting stops the process
with a message naming it instead of hanging:

* a coordinator address that is malformed, does not resolve, is not this machine (process 0
  runs the coordinator) or where nothing answers within ``initialization_timeout_s``;
* a process id outside [0, num_processes);
* a process count that does not match the processes started: they do not all join within
  ``initialization_timeout_s``, or they disagree once joined.

Once running, a process that stops sending heartbeats for ``heartbeat_timeout_s`` (killed, its
host lost) makes JAX stop the others; JAX's message names the lost process ("task").
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils

MODES = ("auto", "on", "off")
FIELD = "config.distributed"
# A process that hits the join deadline exits with this status (launchers can tell it apart).
JOIN_TIMEOUT_EXIT = 3


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What this process joins. A None setting is left to JAX's cluster detection; ``sources``
    names where each known setting came from (a config field or an environment variable)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    sources: Mapping[str, str]
    detected_by: str

    def initialize_kwargs(self, settings) -> dict:
        """The arguments of ``jax.distributed.initialize`` (JAX's detection stays off when every
        setting is known: under SLURM it would pin each process to GPU number SLURM_LOCALID,
        which fails where SLURM already hides the other GPUs)."""
        known = None not in (self.coordinator_address, self.num_processes, self.process_id)
        return {
            "coordinator_address": self.coordinator_address,
            "num_processes": self.num_processes,
            "process_id": self.process_id,
            "cluster_detection_method": "deactivate" if known else None,
            "initialization_timeout": int(settings.initialization_timeout_s),
            "heartbeat_timeout_seconds": int(settings.heartbeat_timeout_s),
        }

    def describe(self) -> str:
        def one(name: str, value) -> str:
            return f"{name}={value!r} ({self.sources[name]})" if name in self.sources else \
                f"{name} from JAX's detection"
        return ", ".join([one("coordinator_address", self.coordinator_address),
                          one("num_processes", self.num_processes),
                          one("process_id", self.process_id)])


def slurm_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-004,007],cpu1' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    if match is None:
        raise ValueError(f"environment variable SLURM_STEP_NODELIST={nodelist!r}: expected a "
                         "SLURM node list")
    return match.group(1) + (match.group(2) or "")


def slurm_port(job_id: int) -> int:
    """The coordinator port of a SLURM job: JAX's own choice, in 61440..65535 by job id."""
    return job_id % 4096 + 61440


def resolve(settings, env: Mapping[str, str]) -> Cluster | None:
    """The cluster this process joins per ``settings`` (config.distributed) and ``env`` (the
    environment), or None for a single-process run. Nothing is contacted."""
    mode = settings.enabled
    if mode not in MODES:
        raise ValueError(f"{FIELD}.enabled={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return None
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    detected_by = "config"

    def take(name: str, value, source: str) -> None:
        if name not in values:
            values[name], sources[name] = value, source

    if settings.coordinator_address:
        take("coordinator_address", settings.coordinator_address,
             f"{FIELD}.coordinator_address")
    if settings.num_processes:
        take("num_processes", int(settings.num_processes), f"{FIELD}.num_processes")
    if settings.process_id >= 0:
        take("process_id", int(settings.process_id), f"{FIELD}.process_id")

    if "SLURM_STEP_NODELIST" in env and "SLURM_PROCID" in env:  # inside an srun step
        detected_by = "SLURM"
        host = slurm_first_host(env["SLURM_STEP_NODELIST"])
        take("coordinator_address", f"{host}:{slurm_port(_env_int(env, 'SLURM_JOB_ID'))}",
             "SLURM_STEP_NODELIST and SLURM_JOB_ID")
        take("num_processes", _env_int(env, "SLURM_NTASKS"), "SLURM_NTASKS")
        take("process_id", _env_int(env, "SLURM_PROCID"), "SLURM_PROCID")
    elif env.get("JAX_COORDINATOR_ADDRESS"):
        detected_by = "JAX_COORDINATOR_ADDRESS"
        take("coordinator_address", env["JAX_COORDINATOR_ADDRESS"], "JAX_COORDINATOR_ADDRESS")
    elif "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        detected_by = "Cloud TPU"
    elif _env_int(env, "OMPI_COMM_WORLD_SIZE", 1) > 1:
        detected_by = "Open MPI"

    several = values.get("num_processes", 1) > 1 or detected_by not in ("config", "SLURM")
    if mode == "auto" and not several:
        return None
    if not values and detected_by == "config":  # "on" and nothing known: a Cloud TPU VM
        detected_by = "JAX"
    cluster = Cluster(values.get("coordinator_address"), values.get("num_processes"),
                      values.get("process_id"), sources, detected_by)
    check(cluster, settings)
    return cluster


def check(cluster: Cluster, settings) -> None:
    """Refuses settings that cannot work, naming where each came from."""
    for name in ("initialization_timeout_s", "heartbeat_timeout_s"):
        if not getattr(settings, name) >= 1:
            raise ValueError(f"{FIELD}.{name}={getattr(settings, name)!r}: expected >= 1 s")
    src = cluster.sources
    n, pid = cluster.num_processes, cluster.process_id
    if n is not None and n < 1:
        raise ValueError(f"{src['num_processes']}={n}: expected >= 1 processes")
    if pid is not None and n is not None and not 0 <= pid < n:
        raise ValueError(f"{src['process_id']}={pid} is out of range for {n} processes "
                         f"({src['num_processes']}): expected 0..{n - 1}")
    if pid is not None and pid < 0:
        raise ValueError(f"{src['process_id']}={pid}: expected >= 0")
    if cluster.coordinator_address is not None:
        split_address(cluster.coordinator_address, src["coordinator_address"])
    if cluster.detected_by in ("config", "SLURM"):
        for name in ("coordinator_address", "num_processes", "process_id"):
            if name not in src:
                raise ValueError(f"{FIELD}.{name}: not set, and no cluster environment "
                                 "(SLURM, Cloud TPU, Open MPI, JAX_COORDINATOR_ADDRESS) gives "
                                 f"it; set it for every process ({cluster.describe()})")


def split_address(address: str, source: str) -> tuple[str, int]:
    """(host, port) of 'host:port' ('[v6]:port' too), or ValueError naming ``source``."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{source}={address!r}: expected host:port with a port in 1..65535")
    return host, int(port)


def initialize(settings, env: Mapping[str, str] | None = None) -> Cluster | None:
    """Joins the cluster of ``settings`` (config.distributed); None: a single-process run.

    Must run before anything touches a JAX device. Each wait ends within
    ``settings.initialization_timeout_s`` with a message naming the setting at fault.
    """
    env = os.environ if env is None else env
    cluster = resolve(settings, env)
    if cluster is None:
        return None
    timeout = float(settings.initialization_timeout_s)
    deadline = time.monotonic() + timeout
    logging.info("joining a %s cluster: %s", cluster.detected_by, cluster.describe())
    if cluster.coordinator_address is not None and cluster.process_id is not None:
        _check_coordinator(cluster, timeout, deadline)
    with _Watchdog(deadline, lambda: _join_timeout_message(cluster, timeout)):
        kwargs = cluster.initialize_kwargs(settings)
        # JAX aborts the process when its own wait runs out; ours ends first, with a message.
        kwargs["initialization_timeout"] = int(timeout) + 30
        jax.distributed.initialize(**kwargs)
        sys.excepthook = functools.partial(_leave_on_error,
                                           float(settings.heartbeat_timeout_s) + 10.0)
        _check_agreement(cluster)
    return cluster


def exit_now(message: str, status: int = 1) -> NoReturn:
    """Ends this process with ``message`` on stderr. In a multi-process run it skips JAX's
    shutdown barrier, which would wait for every other process (up to its shutdown timeout)
    while they wait in collectives for this one: they stop within heartbeat_timeout_s."""
    if not jax.distributed.is_initialized():
        sys.exit(message)
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


# How a collective over TCP (Gloo, the CPU collectives) fails when a peer process is gone.
_LOST_PEER = re.compile(r"Connection reset|Connection closed|Connection refused|Broken pipe")


def _leave_on_error(lost_peer_wait_s: float, kind, value, traceback) -> None:
    """sys.excepthook of a multi-process run: the traceback, then ``exit_now``.

    A collective that failed because a peer's connection dropped says nothing of which process
    was lost; JAX's coordinator names it once that process misses its heartbeats, and stops
    this one with that message. So this one waits for that (at most ``lost_peer_wait_s``)
    before it leaves on its own.
    """
    sys.__excepthook__(kind, value, traceback)
    if _LOST_PEER.search(str(value)):
        print(f"process {jax.process_index()}: a collective lost its connection to another "
              f"process; waiting up to {lost_peer_wait_s:.0f} s for JAX to name the lost process "
              f"({FIELD}.heartbeat_timeout_s + 10 s)", file=sys.stderr, flush=True)
        time.sleep(lost_peer_wait_s)
    exit_now(f"process {jax.process_index()} stops on an uncaught {kind.__name__}; the others "
             "stop when its heartbeats do")


# ----------------------------------------------------------------------------- the checks


def _check_coordinator(cluster: Cluster, timeout: float, deadline: float) -> None:
    """Process 0 must be able to serve on the address; any other process must reach it."""
    source = cluster.sources["coordinator_address"]
    address = cluster.coordinator_address
    host, port = split_address(address, source)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"{source}={address!r}: host {host!r} does not resolve ({e})") from e
    if cluster.process_id == 0:
        if not any(_binds(info[0], (info[4][0], 0)) for info in infos):
            raise ValueError(f"{source}={address!r}: this is process 0, which runs the "
                             f"coordinator, but {host!r} is not an address of this machine")
        if not _binds(socket.AF_INET, ("", port)):
            raise ValueError(f"{source}={address!r}: port {port} is in use on this machine")
        return
    while not _answers(infos):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{source}={address!r}: nothing answered there within {timeout:g} s "
                f"({FIELD}.initialization_timeout_s); check the address and that process 0 "
                "is running")
        time.sleep(0.2)


def _binds(family: int, address: tuple) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
        return True
    except OSError:
        return False


def _answers(infos: list) -> bool:
    for family, kind, proto, _, address in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.settimeout(1.0)
                s.connect(address)
            return True
        except OSError:
            continue
    return False


def _check_agreement(cluster: Cluster) -> None:
    """Every process must have been told the same process count, and ids must be distinct
    (JAX itself goes on with the coordinator's count)."""
    n = jax.process_count()
    told = n if cluster.num_processes is None else cluster.num_processes
    mine = np.array([told, jax.process_index()], np.int64)
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    if set(everyone[:, 0].tolist()) != {n} or len(set(everyone[:, 1].tolist())) != n:
        raise ValueError(f"the processes disagree on num_processes or process_id "
                         f"(num_processes, process_id per process: {everyone.tolist()}); "
                         f"this one has {cluster.describe()}")


def _join_timeout_message(cluster: Cluster, timeout: float) -> str:
    n = cluster.num_processes
    src = cluster.sources
    return (f"evclip_jax.distributed: not all processes joined within {timeout:g} s "
            f"({FIELD}.initialization_timeout_s). Expected {n if n is not None else 'the'} "
            f"processes ({src.get('num_processes', 'JAX detection')}) with distinct "
            f"process ids ({src.get('process_id', 'JAX detection')}), all given the same "
            f"coordinator address ({src.get('coordinator_address', 'JAX detection')}); this "
            f"process has {cluster.describe()}")


class _Watchdog:
    """Ends the process with a message if the block has not finished by ``deadline``: JAX's own
    waits end in an abort without one, or not at all."""

    def __init__(self, deadline: float, message) -> None:
        self.deadline = deadline
        self.message = message
        self.done = threading.Event()

    def _watch(self) -> None:
        if not self.done.wait(max(self.deadline - time.monotonic(), 0.0)):
            print(self.message(), file=sys.stderr, flush=True)
            os._exit(JOIN_TIMEOUT_EXIT)

    def __enter__(self):
        threading.Thread(target=self._watch, daemon=True, name="join-watchdog").start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None
