"""What keeps runs on one training workdir apart: the run lock and the run's config record.

* ``run.lock``: taken by process 0 for the whole run (an ``flock`` on the file, which holds
  the holder's pid and host), so a second run on the same workdir is refused instead of
  writing into the same step dirs. A lock left by a run that was killed (kill -9, a crash)
  is taken over when its pid is gone from this host; one from another host is only reported,
  since its pid cannot be checked from here.
* ``config.json``: the flat config (``config_base.flatten``) the run started with, written at
  the first start. A resume that changes a field which alters the trajectory
  (``config_base.TRAJECTORY_FIELDS``) is refused, listing the fields, unless allowed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from evclip_jax import config_base

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir."""


class ConfigChangedError(ValueError):
    """A resume would change what the run computes."""


@contextlib.contextmanager
def run_lock(workdir: Path) -> Iterator[None]:
    """Holds ``workdir/run.lock`` while the block runs (process 0; the others hold nothing)."""
    if jax.process_index() != 0:
        yield
        return
    path = workdir / LOCK_FILE
    fd = _acquire(path)
    try:
        yield
    finally:
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                os.unlink(path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def _acquire(path: Path) -> int:
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):  # the file may be removed by its holder between open and flock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirLockedError(
                f"{path}: another run holds this workdir ({_describe(holder)}); wait for it "
                "to end, stop it, or use another --workdir") from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:
            os.close(fd)
            continue
        holder = _holder(fd)
        if holder:
            stale = holder.get("host") == me["host"] and not _alive(holder.get("pid"))
            if not stale:
                os.close(fd)
                where = ("it may still be running" if holder.get("host") == me["host"] else
                         f"it cannot be checked from {me['host']}")
                raise WorkdirLockedError(
                    f"{path}: held by {_describe(holder)}; {where}. If that run is over, "
                    f"delete {path} and start again")
            logging.warning("%s: taking over the lock of pid %s on %s, which is no longer "
                            "running (a run that was killed)", path, holder.get("pid"),
                            holder.get("host"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        return fd
    raise WorkdirLockedError(f"{path}: could not take the lock; it kept changing")


def _holder(fd: int) -> dict:
    """The lock file's {pid, host, since}; {} when empty or unreadable (a torn write)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"since {holder.get('since', '?')}")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def record_config(config, workdir: Path, *, resuming: bool, allow_change: bool) -> None:
    """Compares ``config`` with ``workdir/config.json`` when resuming, then records it.

    ConfigChangedError listing each changed trajectory field ("field: stored -> now") unless
    ``allow_change``, in which case the changes are logged and the new config recorded.
    """
    path = workdir / CONFIG_FILE
    if resuming and path.is_file():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigChangedError(f"{path}: unreadable ({e}); it records the settings "
                                     "this run started with") from e
        changes = config_base.trajectory_changes(stored, config)
        if changes and not allow_change:
            raise ConfigChangedError(
                f"{path}: this resume changes what the run computes: {'; '.join(changes)}. "
                "Resume with the recorded settings, use a fresh --workdir, or pass "
                "--allow_config_change to go on with the new ones")
        if changes:
            logging.warning("resuming with changed settings (--allow_config_change): %s",
                            "; ".join(changes))
    if jax.process_index() == 0:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config_base.flatten(config), indent=1, sort_keys=True,
                                  default=str))
        os.replace(tmp, path)
