"""Runs end the way they should (issue 11: bad cases 1, 3, 8 and 9, the hang tests, exit
codes): SIGTERM while input is stuck still saves and exits 75, a deleted data dir ends the run
within a bound (slow), one run per workdir, a finished run keeps its summary, refusals leave
the workdir as it was."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evclip_jax import run_guard, trainer
from evclip_jax.data.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.py")
PREEMPTED_EXIT_CODE = 75  # main.PREEMPTED_EXIT_CODE, as the README documents it
sys.path.insert(0, str(REPO / "tests" / "configs"))
import tiny  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny config's synthetic records, built in-process."""
    c = tiny.get_config()
    s = c.data.synthetic
    out = tmp_path_factory.mktemp("data") / "records"
    make_synthetic_dataset(out, num_classes=s.num_classes, per_class=s.per_class,
                           image_size=c.model.vision.image_size, seed=s.seed,
                           splits=dict(s.splits), num_shards=s.num_shards)
    return out


def _config(data, **fields):
    c = tiny.get_config()
    c.data.dir = str(data)
    for name, value in fields.items():
        *parents, leaf = name.split("__")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _start(workdir, data, *overrides):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-m", "evclip_jax.main", f"--config={TINY}", f"--workdir={workdir}",
         f"--config.data.dir={data}", *overrides],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps_taken(workdir: Path) -> int:
    path = workdir / "data_order.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait(condition, proc, seconds=240):
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file()}


STEPS = ["--config.num_train_steps=200", "--config.checkpoint.every_steps=1000",
         "--config.log_every_steps=1000"]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory, data_dir):
    """The hang scenario: a run whose shard is replaced by a FIFO nobody writes stalls (the
    open blocks); meanwhile a second run on its workdir is tried; then SIGTERM."""
    root = tmp_path_factory.mktemp("preempted")
    data, workdir = root / "data", root / "run"
    shutil.copytree(data_dir, data)
    proc = _start(workdir, data, *STEPS)
    _wait(lambda: _steps_taken(workdir) >= 3, proc)
    shard = data / json.loads((data / "train.manifest.json").read_text())["shards"][0]
    os.rename(shard, shard.with_name("real"))
    os.mkfifo(shard)
    last, still = -1, time.time()
    while time.time() - still < 4:  # stalled: no step for 4 s
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        if _steps_taken(workdir) != last:
            last, still = _steps_taken(workdir), time.time()
        time.sleep(0.1)
    assert last < 200, "the run finished before its input stalled"
    try:
        trainer.train_and_evaluate(_config(data, num_train_steps=200), str(workdir))
        second = None
    except run_guard.WorkdirLockedError as e:
        second = str(e)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    os.remove(shard)
    os.rename(shard.with_name("real"), shard)
    return {"workdir": workdir, "data": data, "pid": proc.pid, "rc": proc.returncode,
            "stderr": stderr, "last": last, "second": second}


@pytest.fixture(scope="module")
def finished(preempted):
    """The preempted run, resumed in-process to its end."""
    summary = trainer.train_and_evaluate(
        _config(preempted["data"], num_train_steps=200, checkpoint__every_steps=1000,
                log_every_steps=1000), str(preempted["workdir"]))
    return {**preempted, "summary": summary}


def test_sigterm_while_input_is_stuck_still_saves(preempted):
    """SIGTERM while the input is stuck saves the step reached and exits 75 (the documented
    code); the lock is released."""
    workdir, last = preempted["workdir"], preempted["last"]
    assert preempted["rc"] == PREEMPTED_EXIT_CODE, preempted["stderr"][-4000:]
    assert "exiting with code 75" in preempted["stderr"]
    assert (workdir / "checkpoints" / str(last) / "commit_success.txt").is_file()
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["preempted"] and summary["step"] == last and not summary["finished"]
    assert not (workdir / run_guard.LOCK_FILE).exists()


def test_second_run_on_a_workdir_is_refused(preempted):
    """Bad case 8: two runs on one workdir mixed their checkpoints; the second is refused,
    naming the holder, before it writes anything."""
    assert preempted["second"] is not None, "the second run was not refused"
    assert f"pid {preempted['pid']} on host {socket.gethostname()}" in preempted["second"]
    assert str(preempted["workdir"] / run_guard.LOCK_FILE) in preempted["second"]


def test_preempted_run_resumes_at_the_saved_step(finished):
    assert finished["summary"]["finished"] and finished["summary"]["step"] == 200
    order = [json.loads(line)["step"] for line in
             (finished["workdir"] / "data_order.jsonl").read_text().splitlines()]
    assert order == list(range(200))  # resumed at the saved step: none lost, none twice


def test_finished_run_rerun_keeps_its_summary(finished, caplog):
    """Unclear case: a rerun of a finished run used to overwrite its summary with an empty
    train section."""
    workdir = finished["workdir"]
    before = _listing(workdir)
    text = (workdir / "summary.json").read_text()
    summary = trainer.train_and_evaluate(
        _config(finished["data"], num_train_steps=200, checkpoint__every_steps=1000,
                log_every_steps=1000), str(workdir))
    assert "finished already (step 200/200)" in caplog.text
    assert (workdir / "summary.json").read_text() == text
    assert summary == json.loads(text) and summary["train"]["loss"] > 0
    assert _listing(workdir) == before


def test_refused_settings_leave_the_workdir_as_it_was(finished):
    """Bad cases 3 and 9: keep=0 (it deleted every checkpoint) and a changed config on resume
    are refused naming the field, before anything is written."""
    workdir = finished["workdir"]
    before = _listing(workdir)
    with pytest.raises(ValueError, match=r"config\.checkpoint\.keep=0"):
        trainer.train_and_evaluate(_config(finished["data"], checkpoint__keep=0), str(workdir))
    with pytest.raises(run_guard.ConfigChangedError,
                       match=r"optim\.base_lr: 0\.032 -> 0\.1; optim\.warmup_steps: 2 -> 5"):
        trainer.train_and_evaluate(
            _config(finished["data"], num_train_steps=200, optim__base_lr=0.1,
                    optim__warmup_steps=5), str(workdir))
    assert _listing(workdir) == before


def test_stale_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / run_guard.LOCK_FILE
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "x"}))
    with run_guard.run_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert f"taking over the lock of pid {dead.pid}" in caplog.text
    assert not lock.exists()
    # A lock from another host cannot be checked from here: refused, naming it.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "x"}))
    with pytest.raises(run_guard.WorkdirLockedError, match="pid 1 on host elsewhere"):
        with run_guard.run_lock(tmp_path):
            pass


@pytest.mark.slow
def test_deleted_data_dir_ends_the_run_within_a_minute(tmp_path, data_dir):
    """Bad case 1 end to end: the data dir removed mid-run ends the run non-zero, naming the
    shard, within 60 s (it used to spin forever, deaf to SIGTERM); checkpoints stay."""
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    workdir = tmp_path / "run"
    proc = _start(workdir, data, "--config.num_train_steps=100000",
                  "--config.log_every_steps=1000", "--config.checkpoint.keep=100000")
    ckpt = workdir / "checkpoints"
    _wait(lambda: (ckpt / "4" / "commit_success.txt").is_file(), proc)
    kept = _listing(ckpt / "4")
    shutil.rmtree(data)
    gone = time.time()
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - gone < 60
    assert proc.returncode not in (0, PREEMPTED_EXIT_CODE)
    assert "FileNotFoundError: " in stderr and str(data / "train-00000-of-00001") in stderr
    assert _listing(ckpt / "4") == kept
