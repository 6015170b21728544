"""Multi-process training on this machine: 2 JAX processes x 2 CPU devices, joined through
``launch/local_multiprocess.sh`` (gloo collectives), against 1 process fed the same global
batches; preemption, a lost process and bad cluster settings."""

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from evclip_jax import distributed

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "tests" / "configs" / "tiny.py")
LAUNCHER = str(REPO / "launch" / "local_multiprocess.sh")
STEPS = 40
PREEMPTED = 75  # main.PREEMPTED_EXIT_CODE: saved after SIGTERM, run again to resume
HEARTBEAT_S = 5
COMMON = [f"--config.num_train_steps={STEPS}", "--config.checkpoint.every_steps=10",
          "--config.log_every_steps=10", "--config.eval.at_end=True",
          f"--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}",
          "--config.distributed.initialization_timeout_s=120"]


def tiny_config(data_dir: Path):
    sys.path.insert(0, str(REPO / "tests" / "configs"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    config = tiny.get_config()
    config.data.dir = str(data_dir)
    config.num_train_steps = STEPS
    config.checkpoint.every_steps = 10
    config.log_every_steps = 10
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from evclip_jax.data.synthetic import make_synthetic_dataset

    config = tiny_config(Path("unused"))
    s = config.data.synthetic
    out = tmp_path_factory.mktemp("data")
    make_synthetic_dataset(out, num_classes=s.num_classes, per_class=s.per_class,
                           image_size=config.model.vision.image_size, seed=s.seed,
                           splits=dict(s.splits), num_shards=s.num_shards)
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One XLA compilation cache for every launch: the later ones skip recompiling."""
    return tmp_path_factory.mktemp("xla_cache")


def env(cache_dir: Path, log_dir: Path) -> dict:
    out = dict(os.environ)
    out.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, "GPUS_PER_PROCESS": "0",
                "LOG_DIR": str(log_dir), "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"})
    return out


def launch(workdir: Path, log_dir: Path, data_dir: Path, cache_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", LAUNCHER, "2", TINY, str(workdir), f"--config.data.dir={data_dir}", *COMMON],
        cwd=REPO, env=env(cache_dir, log_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def logs(log_dir: Path) -> list[str]:
    return [(log_dir / f"process_{i}.log").read_text() for i in range(2)]


def complete_steps(workdir: Path) -> list[int]:
    ckpt = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() \
        else []


def wait_for_checkpoint_after(workdir: Path, proc: subprocess.Popen, after: int) -> int:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        later = [s for s in complete_steps(workdir) if s > after]
        if later:
            return later[0]
        time.sleep(0.02)
    out, err = proc.communicate(timeout=60)
    raise AssertionError(f"no checkpoint after step {after}; exit {proc.returncode}\n{err}")


def finish(proc: subprocess.Popen, log_dir: Path, status: int = 0) -> str:
    out, err = proc.communicate(timeout=300)
    if proc.returncode != status:
        raise AssertionError(f"exit {proc.returncode}\n{err[-3000:]}\n" +
                             "\n".join(t[-3000:] for t in logs(log_dir)))
    return out


def data_order(workdir: Path) -> dict[int, list[int]]:
    """step -> the global batch's labels; a step run again after a resume must have seen the
    same batch."""
    order = {}
    for line in (workdir / "data_order.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert order.setdefault(rec["step"], rec["labels"]) == rec["labels"], rec["step"]
    return order


def host_labels(data_dir: Path, config, host: int, steps: int) -> list[list[int]]:
    """The labels that host ``host`` of 2 reads at each step, from the pipeline alone."""
    from evclip_jax.data import pipeline

    ds = pipeline.make_dataset(
        data_dir, "train", global_batch_size=config.batch_size, out_size=16, train=True,
        seed=config.seed, process_index=host, process_count=2)
    return [b["labels"].tolist() for b in ds.take(steps).as_numpy_iterator()]


def reference_run(config, workdir: Path, monkeypatch) -> dict:
    """1 process (this one) fed each global batch of the 2-process run: host 0's half, then
    host 1's, as jax.make_array_from_process_local_data lays them out."""
    import tensorflow as tf

    from evclip_jax import trainer
    from evclip_jax.data import pipeline

    real = pipeline.make_dataset

    def two_hosts(*args, train, **kwargs):
        if not train:
            return real(*args, train=train, **kwargs)
        halves = [real(*args, train=True, process_index=i, process_count=2, **kwargs)
                  for i in range(2)]
        return tf.data.Dataset.zip(tuple(halves)).map(
            lambda a, b: {k: tf.concat([a[k], b[k]], 0) for k in a})

    monkeypatch.setattr(pipeline, "make_dataset", two_hosts)
    return trainer.train_and_evaluate(config, str(workdir))


def trainable(params: dict) -> dict[str, np.ndarray]:
    """The trained params by path, without the attention key biases: softmax ignores a shift
    of every key's logit, so their gradient is zero up to rounding, and Adam turns that
    rounding noise into steps of about the learning rate."""
    flat = jax.tree_util.tree_flatten_with_path(
        {k: params[k] for k in ("event_tower", "logit_scale")})[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat
            if "k_proj']['bias" not in jax.tree_util.keystr(path)}


def trained(workdir: Path) -> dict[str, np.ndarray]:
    from evclip_jax import checkpoints

    return trainable(checkpoints.load_model(workdir)[1])


def test_two_processes_match_one_through_preemption_and_a_lost_process(
        tmp_path, data_dir, cache_dir, monkeypatch):
    workdir = tmp_path / "two"

    # 1. SIGTERM to both processes (the launcher passes it on) once a checkpoint exists.
    proc = launch(workdir, tmp_path / "logs1", data_dir, cache_dir)
    wait_for_checkpoint_after(workdir, proc, 0)
    proc.send_signal(signal.SIGTERM)
    finish(proc, tmp_path / "logs1", status=PREEMPTED)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["preempted"], "the run finished before SIGTERM arrived"
    stopped_at = summary["step"]
    assert stopped_at in complete_steps(workdir)

    # 2. Restart both: they resume; then process 1 is killed with -9 after the next checkpoint.
    proc = launch(workdir, tmp_path / "logs2", data_dir, cache_dir)
    saved = wait_for_checkpoint_after(workdir, proc, stopped_at)
    killed_at = time.time()
    os.kill(int((tmp_path / "logs2" / "process_1.pid").read_text()), signal.SIGKILL)
    proc.communicate(timeout=300)
    waited = time.time() - killed_at
    p0, _ = logs(tmp_path / "logs2")
    assert proc.returncode != 0
    assert waited < HEARTBEAT_S + 20, f"process 0 took {waited:.0f} s to stop"
    assert re.search(r"stopped sending heartbeats\):\s*1\s", p0), p0[-3000:]
    assert f"at step {stopped_at}" in p0  # the restart resumed

    # 3. Restart both: they resume from the last complete checkpoint and finish, then evaluate.
    resumed_from = complete_steps(workdir)[-1]
    assert resumed_from >= saved
    proc = launch(workdir, tmp_path / "logs3", data_dir, cache_dir)
    finish(proc, tmp_path / "logs3")
    p0, p1 = logs(tmp_path / "logs3")
    assert f"at step {resumed_from}" in p0 and f"at step {resumed_from}" in p1
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["finished"] and summary["devices"] == 4

    # Only process 0 writes logs, TensorBoard, the summary and the report.
    assert "eval/" in p0 and "-----" in p0 and "-----" not in p1  # the printed summary
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 3  # 1 a launch
    history = (workdir / "eval_history.jsonl").read_text().splitlines()
    assert len(history) == 1
    assert (workdir / "report").is_dir()

    # Each process read its own half of every global batch (the data order log holds the
    # gathered global batch; each step exactly once over the three launches).
    config = tiny_config(data_dir)
    order = data_order(workdir)
    assert sorted(order) == list(range(STEPS))
    halves = [host_labels(data_dir, config, host, STEPS) for host in range(2)]
    for step in range(STEPS):
        assert order[step] == halves[0][step] + halves[1][step], step

    # The same params as 1 process fed the same global batches, to float32 rounding.
    from evclip_jax import convert

    reference = tmp_path / "one"
    reference_run(config, reference, monkeypatch)
    assert data_order(reference) == order
    ours, theirs = trained(workdir), trained(reference)
    start = trainable(convert.load_evclip(workdir / "init")[1])
    assert ours.keys() == theirs.keys() == start.keys() and len(ours) > 20
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=0, atol=1e-6, err_msg=name)
        assert np.abs(ours[name] - start[name]).max() > 1e-3, f"{name} did not train"

    # Evaluation over 2 processes equals evaluation in 1 process of the same checkpoint.
    from evclip_jax.evaluate import runner

    one = runner.evaluate_checkpoint(config, str(workdir), str(tmp_path / "eval_one"))
    two = summary["eval"]
    assert set(one) == set(two) and one
    for key in one:
        if isinstance(one[key], float):
            assert one[key] == pytest.approx(two[key], abs=1e-5), key
        else:
            assert one[key] == two[key], key


# ----------------------------------------------------------------------------- bad settings

BOUND_S = 3  # config.distributed.initialization_timeout_s of these runs
SLACK_S = 3  # from the deadline to the exit


def join(workdir: Path, process_id: int, num_processes: int, address: str
         ) -> tuple[subprocess.Popen, Path]:
    """``python -m evclip_jax.main`` as one process of a cluster, and the file of its stderr:
    it joins before it reads any data, so it stops at the bad setting."""
    log = Path(f"{workdir}.err")
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "evclip_jax.main", f"--config={TINY}",
             f"--workdir={workdir}", f"--config.distributed.process_id={process_id}",
             f"--config.distributed.num_processes={num_processes}",
             f"--config.distributed.coordinator_address={address}",
             f"--config.distributed.initialization_timeout_s={BOUND_S}"],
            cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu",
                           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
            stdout=subprocess.DEVNULL, stderr=err), log


def stopped(procs: list[tuple[subprocess.Popen, Path]]
            ) -> list[tuple[int, str, float | None]]:
    """(exit status, stderr, seconds from the start of its join to its exit; None when it
    stopped before it began to join) of each process."""
    ended = {}
    deadline = time.time() + 120
    while len(ended) < len(procs) and time.time() < deadline:
        for i, (proc, _) in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = datetime.datetime.now()
        time.sleep(0.01)
    out = []
    for i, (proc, log) in enumerate(procs):
        err = log.read_text()
        began = re.search(r"^I(\d{4} [\d:.]{15}) .*joining a config cluster", err, re.M)
        if began is None:
            out.append((proc.returncode, err, None))
            continue
        began = datetime.datetime.strptime(f"{ended[i].year}{began.group(1)}",
                                           "%Y%m%d %H:%M:%S.%f")
        out.append((proc.returncode, err, (ended[i] - began).total_seconds()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_bad_cluster_settings_fail_within_their_bound(tmp_path):
    ports = set()
    while len(ports) < 3:
        ports.add(free_port())
    silent, short, disagree = (f"localhost:{p}" for p in ports)
    # Started together; each stops on its own.
    procs = [join(tmp_path / "range", 2, 2, silent),
             join(tmp_path / "silent", 1, 2, silent),  # process 1: nothing serves there
             join(tmp_path / "elsewhere", 0, 2, "192.0.2.1:1234"),  # TEST-NET-1
             *(join(tmp_path / f"short{i}", i, 3, short) for i in range(2)),  # 3, 2 started
             *(join(tmp_path / f"apart{i}", i, 2 + i, disagree) for i in range(2))]  # 2 and 3
    (out_of_range, nobody_answers, not_this_machine, *rest) = stopped(procs)
    too_few, told_apart = rest[:2], rest[2:]

    status, err, took = out_of_range
    assert status == 1 and took is None  # refused before joining
    assert "config.distributed.process_id=2 is out of range for 2 processes" in err
    status, err, took = nobody_answers
    assert status == 1 and BOUND_S <= took < BOUND_S + SLACK_S
    assert (f"config.distributed.coordinator_address='{silent}': nothing answered there "
            f"within {BOUND_S} s (config.distributed.initialization_timeout_s)") in err
    status, err, took = not_this_machine
    assert status == 1 and took < SLACK_S
    assert ("config.distributed.coordinator_address='192.0.2.1:1234': this is process 0, "
            "which runs the coordinator, but '192.0.2.1' is not an address of this machine"
            ) in err
    for status, err, took in too_few:
        assert status == distributed.JOIN_TIMEOUT_EXIT and BOUND_S <= took < BOUND_S + SLACK_S
        assert f"not all processes joined within {BOUND_S} s" in err
        assert "Expected 3 processes (config.distributed.num_processes)" in err
    for status, err, took in told_apart:  # they join, then compare
        assert status == 1 and took < BOUND_S + SLACK_S
        assert "the processes disagree on num_processes or process_id (num_processes, " \
               "process_id per process: [[2, 0], [3, 1]])" in err
