"""Chaos (issue 11, "Must show"): a run killed with SIGKILL at five random moments (while it
builds its data, in a step, during an async save, during an evaluation, at a random time),
resumed after each, ends with exactly the params of a run that was never interrupted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from evclip_jax import checkpoints

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.py")
# Synthetic data built in the workdir (so a kill can land in the build), evaluations every 8
# steps (so one can land in an evaluation), a save every 4 steps (async).
ARGS = ["--config.num_train_steps=40", "--config.checkpoint.every_steps=4",
        "--config.eval.every_steps=8", "--config.eval.evals=zeroshot,retrieval",
        "--config.log_every_steps=1", "--config.debug.log_data_order=False"]


class Run:
    """A training process whose stderr lines are collected as they come."""

    def __init__(self, workdir: Path):
        env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
               "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evclip_jax.main", f"--config={TINY}",
             f"--workdir={workdir}", *ARGS], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.started = time.time()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def seen(self, pattern: str) -> re.Match | None:
        for line in list(self.lines):
            if m := re.search(pattern, line):
                return m
        return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=60)
        self.reader.join(timeout=10)

    def finish(self) -> int:
        self.proc.wait(timeout=600)
        self.reader.join(timeout=10)
        return self.proc.returncode


def _wait_for(run: Run, condition, seconds: float = 300, poll: float = 0.002):
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if run.proc.poll() is not None:
            return None
        time.sleep(poll)
    raise AssertionError("timed out:\n" + "".join(run.lines[-50:]))


def _tmp_checkpoint(workdir: Path):
    ckpt = workdir / "checkpoints"
    names = [p.name for p in ckpt.iterdir()] if ckpt.is_dir() else []
    return [n for n in names if "orbax-checkpoint-tmp" in n]


def kill_in_data_build(run: Run, workdir: Path, rng) -> str:
    """At a random one of: the first event files written, the first TFRecord shard being
    written, the train split's manifest written (the test split still to come)."""
    data = workdir / "data"
    moment = rng.choice(["event files", "a shard", "the train manifest"])
    probe = {"event files": lambda: list(data.glob("events/*/*/*")),
             "a shard": lambda: list(data.glob("*.partial")),
             "the train manifest": lambda: (data / "train.manifest.json").is_file()}[moment]
    _wait_for(run, probe)
    complete = (data / "test.manifest.json").is_file()
    run.kill()
    assert not complete, "the data build finished before the kill"
    return f"data build ({moment})"


def kill_in_step(run: Run, workdir: Path, rng) -> str:
    first = _wait_for(run, lambda: run.seen(r"step (\d+)/40"))
    target = int(first.group(1)) + int(rng.integers(1, 6))
    _wait_for(run, lambda: run.seen(rf"step {target}/40"))
    time.sleep(rng.uniform(0, 0.05))
    run.kill()
    return f"step {target}"


def kill_in_save(run: Run, workdir: Path, rng) -> str:
    _wait_for(run, lambda: run.seen(r"step \d+/40"))
    names = _wait_for(run, lambda: _tmp_checkpoint(workdir))
    assert names, "never saw a save in progress"
    run.kill()
    return f"save ({names[0]})"


def kill_in_eval(run: Run, workdir: Path, rng) -> str:
    at = int(_wait_for(run, lambda: run.seen(r"evaluating at step ([1-9]\d*)")).group(1))
    time.sleep(rng.uniform(0, 0.1))
    history = workdir / "eval_history.jsonl"
    done = history.is_file() and f'"step": {at},' in history.read_text()
    run.kill()
    assert not done, "the evaluation finished before the kill"
    return f"evaluation at step {at}"


def kill_at_random(run: Run, workdir: Path, rng) -> str:
    delay = rng.uniform(5, 25)
    _wait_for(run, lambda: time.time() - run.started > delay, poll=0.01)
    run.kill()
    return f"{delay:.1f} s after the start"


@pytest.mark.slow
def test_killed_at_five_random_moments_ends_with_the_params_of_a_straight_run(tmp_path):
    rng = np.random.default_rng(11)
    straight = tmp_path / "straight"
    assert Run(straight).finish() == 0
    expected = checkpoints.load_model(straight)[1]

    workdir = tmp_path / "chaos"
    later = [kill_in_step, kill_in_save, kill_in_eval, kill_at_random]
    rng.shuffle(later)
    moments = []
    for kill in [kill_in_data_build, *later]:
        run = Run(workdir)
        moments.append(kill(run, workdir, rng))
        assert run.proc.returncode == -9, f"{moments[-1]}: the run had ended by itself"
    final = Run(workdir)
    assert final.finish() == 0, "".join(final.lines[-60:])
    assert final.seen(r"taking over the lock of pid \d+")  # the killed run's lock
    print("killed at:", "; ".join(moments))

    got = checkpoints.load_model(workdir)[1]
    for name in ("event_tower", "logit_scale"):
        for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(expected[name]),
                        strict=True):
            np.testing.assert_array_equal(a, b)
