"""Launchers and cluster settings: cluster variables in, jax.distributed arguments out; the
commands and environments that launch/ generates, run against stand-in gcloud, srun and python
programs; sweeps fanned out and gathered."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evclip_jax import distributed
from evclip_jax.config_base import base_config

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SLURM = {"SLURM_JOB_ID": "12345", "SLURM_STEP_NODELIST": "gpu[003-004,007],cpu1",
         "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}


def settings(**fields):
    s = base_config().distributed
    s.update(fields)
    return s


def kwargs(env, **fields):
    cluster = distributed.resolve(settings(**fields), env)
    return None if cluster is None else cluster.initialize_kwargs(settings(**fields))


@pytest.mark.parametrize("nodelist", ["node001", "node001,host2", "node[001-0015],host2",
                                      "node[001,007-015],host2", "gpu-a[3-4]"])
def test_slurm_coordinator_is_jax_own_choice(nodelist, monkeypatch):
    """The coordinator we derive is the one JAX's own SLURM detection derives."""
    from jax._src.clusters.slurm_cluster import SlurmCluster

    env = {**SLURM, "SLURM_STEP_NODELIST": nodelist}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ours = distributed.resolve(settings(), env).coordinator_address
    assert ours == SlurmCluster.get_coordinator_address(None, None)


def test_slurm_variables_in_jax_distributed_arguments_out():
    # 12345 % 4096 + 61440 = 61497; no SLURM_LOCALID pinning: SLURM hides the other GPUs.
    assert kwargs(SLURM) == {
        "coordinator_address": "gpu003:61497", "num_processes": 16, "process_id": 5,
        "cluster_detection_method": "deactivate", "initialization_timeout": 300,
        "heartbeat_timeout_seconds": 100}
    # A config field wins over SLURM's variable, and the timeouts come from the config.
    out = kwargs(SLURM, coordinator_address="head:1234", initialization_timeout_s=20,
                 heartbeat_timeout_s=7)
    assert out["coordinator_address"] == "head:1234" and out["process_id"] == 5
    assert (out["initialization_timeout"], out["heartbeat_timeout_seconds"]) == (20, 7)
    cluster = distributed.resolve(settings(num_processes=16), SLURM)
    assert cluster.sources == {"coordinator_address": "SLURM_STEP_NODELIST and SLURM_JOB_ID",
                               "num_processes": "config.distributed.num_processes",
                               "process_id": "SLURM_PROCID"}


def test_when_a_run_joins_a_cluster():
    # One SLURM task, no cluster, or "off": a single-process run.
    assert kwargs({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert kwargs({}) is None
    assert kwargs(SLURM, enabled="off") is None
    # Settings in the config alone (launch/local_multiprocess.sh).
    assert kwargs({}, coordinator_address="localhost:5000", num_processes=2,
                  process_id=1)["process_id"] == 1
    # Cloud TPU and Open MPI: JAX's own detection finds the settings.
    for env in ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, {"OMPI_COMM_WORLD_SIZE": "4"}):
        out = kwargs(env)
        assert out["cluster_detection_method"] is None
        assert (out["coordinator_address"], out["num_processes"], out["process_id"]) == \
            (None, None, None)
    # "on" joins even where nothing is detected (a one-host TPU VM: JAX's detection).
    assert kwargs({}, enabled="on")["coordinator_address"] is None


@pytest.mark.parametrize("fields, env, named", [
    ({"enabled": "yes"}, {}, "config.distributed.enabled='yes'"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, {},
     "config.distributed.process_id=2 is out of range for 2 processes"),
    ({}, {**SLURM, "SLURM_PROCID": "16"}, "SLURM_PROCID=16 is out of range for 16 processes"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h"}, {},
     "config.distributed.coordinator_address='h': expected host:port"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h:70000"}, {},
     "port in 1..65535"),
    ({"num_processes": 2, "process_id": 0}, {}, "config.distributed.coordinator_address: "
     "not set"),
    ({"num_processes": 2, "coordinator_address": "h:1"}, {},
     "config.distributed.process_id: not set"),
    ({"heartbeat_timeout_s": 0}, SLURM, "config.distributed.heartbeat_timeout_s=0"),
    ({}, {**SLURM, "SLURM_NTASKS": "x"}, "SLURM_NTASKS='x': expected an integer"),
])
def test_bad_settings_are_named_before_anything_connects(fields, env, named):
    with pytest.raises(ValueError) as err:
        distributed.resolve(settings(**fields), env)
    assert named in str(err.value)


# ----------------------------------------------------------------------------- launch scripts


def stand_in(bin_dir: Path, name: str, body: str) -> None:
    """An executable stand-in for a cluster tool: records its arguments, then runs ``body``."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n"
                    f'printf "%s\\0" "$@" >> "$CALLS/{name}.$$"\n'
                    f"{body}\n")
    path.chmod(0o755)


def calls(calls_dir: Path, name: str) -> list[list[str]]:
    files = sorted(calls_dir.glob(f"{name}.*"), key=lambda p: p.stat().st_mtime_ns)
    return [p.read_text().split("\0")[:-1] for p in files]


def test_local_multiprocess_commands_devices_signals_and_status(tmp_path):
    """Each process gets its id, the shared count and coordinator, and its own GPUs; SIGTERM
    reaches every process; the exit status is the first failure."""
    bin_dir, calls_dir = tmp_path / "bin", tmp_path / "calls"
    calls_dir.mkdir()
    # A stand-in python: writes its GPUs, waits for SIGTERM (or a second), exits with the
    # status given for its process id.
    stand_in(bin_dir, "python", """
for a in "$@"; do case "$a" in --config.distributed.process_id=*) id=${a#*=};; esac; done
echo "$CUDA_VISIBLE_DEVICES" > "$CALLS/gpus.$id"
trap 'echo term > "$CALLS/term.$id"; exit 0' TERM
for _ in $(seq 20); do sleep 0.1; done
exit $(( id == 2 ? 7 : 0 ))""")
    env = {**os.environ, "CALLS": str(calls_dir), "PYTHON": str(bin_dir / "python"),
           "PORT": "4321", "GPUS_PER_PROCESS": "2", "LOG_DIR": str(tmp_path / "logs")}
    cmd = ["bash", str(LAUNCH / "local_multiprocess.sh"), "3", "configs/demo.py:steps=6",
           str(tmp_path / "run"), "--config.seed=4"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 7, out.stderr  # process 2's status
    assert "process 2 exited with status 7" in out.stderr
    runs = sorted(calls(calls_dir, "python"),
                  key=lambda a: next(x for x in a if "process_id" in x))
    for i, argv in enumerate(runs):
        assert argv == ["-m", "evclip_jax.main", "--config", "configs/demo.py:steps=6",
                        "--workdir", str(tmp_path / "run"),
                        "--config.distributed.coordinator_address=localhost:4321",
                        "--config.distributed.num_processes=3",
                        f"--config.distributed.process_id={i}", "--config.seed=4"]
    assert [(calls_dir / f"gpus.{i}").read_text().strip() for i in range(3)] == \
        ["0,1", "2,3", "4,5"]
    assert all((tmp_path / "logs" / f"process_{i}.pid").is_file() for i in range(3))

    # SIGTERM to the launcher reaches every process; CPU runs leave the devices alone.
    env["GPUS_PER_PROCESS"] = "0"
    proc = subprocess.Popen(cmd[:2] + ["2"] + cmd[3:], env=env, stderr=subprocess.PIPE,
                            text=True)
    while len(list(calls_dir.glob("gpus.*"))) < 3 or \
            any((calls_dir / f"gpus.{i}").read_text().strip() for i in range(2)):
        time.sleep(0.05)
        assert proc.poll() is None
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert all((calls_dir / f"term.{i}").is_file() for i in range(2))


def free_port_in(lo: int, hi: int) -> int:
    for port in range(lo, hi):
        with socket.socket() as s:
            try:
                s.bind(("", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def test_slurm_batch_script_joins_processes_through_slurm_variables(tmp_path):
    """slurm_gpu.sbatch under a stand-in srun that starts 2 tasks on this machine with SLURM's
    variables: both processes join one JAX cluster through evclip_jax.distributed."""
    bin_dir, calls_dir = tmp_path / "bin", tmp_path / "calls"
    calls_dir.mkdir()
    job_id = free_port_in(61440, 65536) - 61440  # the coordinator port is 61440 + id % 4096
    stand_in(bin_dir, "srun", f"""
while [[ "$1" == --* ]]; do shift; done
for i in 0 1; do
  SLURM_JOB_ID={job_id} SLURM_STEP_NODELIST=localhost SLURM_NTASKS=2 SLURM_PROCID=$i \\
    SLURM_LOCALID=$i "$@" > "$CALLS/task.$i" 2>&1 &
done
wait""")
    # A stand-in for `python -m evclip_jax.main`: checks its flags, then joins as main.py does.
    join = ("import sys; from evclip_jax import distributed; "
            "from evclip_jax.config_base import base_config; import jax; "
            "s = base_config().distributed; s.initialization_timeout_s = 60; "
            "distributed.initialize(s); "
            "print('joined', jax.process_index(), jax.process_count(), jax.device_count())")
    stand_in(bin_dir, "python", f"""
[ "$1 $2 $3 $4" = "-m evclip_jax.main --config=configs/x.py --workdir=/runs/x" ] || exit 9
exec {sys.executable} -c "{join}" """)
    env = {**os.environ, "CALLS": str(calls_dir), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(["bash", str(LAUNCH / "slurm_gpu.sbatch"), "configs/x.py", "/runs/x",
                          "--config.seed=1"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert calls(calls_dir, "srun")[0][:1] == ["--kill-on-bad-exit=1"]
    for i in range(2):
        assert f"joined {i} 2 4" in (calls_dir / f"task.{i}").read_text()


def test_tpu_vm_script_creates_copies_runs_and_deletes(tmp_path):
    bin_dir, calls_dir = tmp_path / "bin", tmp_path / "calls"
    calls_dir.mkdir()
    # The run on the workers fails: the slice is deleted all the same.
    stand_in(bin_dir, "gcloud", '[[ "$*" == *"--command=cd ~/evclip_jax &&"* ]] && exit 5; '
                                "exit 0")
    env = {**os.environ, "CALLS": str(calls_dir), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["bash", str(LAUNCH / "tpu_vm.sh"), "evclip-a", "us-central2-b", "v4-32",
         "gs://bkt/configs/x.py:bf16", "gs://bkt/runs/a b", "--config.data.dir=/gcs/bkt/d"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 5, out.stderr
    got = calls(calls_dir, "gcloud")
    prefix = ["compute", "tpus", "tpu-vm"]
    assert [c[:4] for c in got] == [prefix + [v] for v in ("create", "scp", "ssh", "ssh",
                                                          "delete")]
    assert all(c[-1] == "--zone=us-central2-b" for c in got)
    create, scp, setup, run, delete = got
    assert create[4:7] == ["evclip-a", "--accelerator-type=v4-32",
                           "--version=tpu-ubuntu2204-base"]
    assert scp[5:7] == ["evclip-a:evclip_jax.tgz", "--worker=all"]
    assert "--worker=all" in setup and "--worker=all" in run and "--quiet" in delete
    setup_cmd = next(a for a in setup if a.startswith("--command="))[len("--command="):]
    assert "gcsfuse --implicit-dirs bkt /gcs/bkt" in setup_cmd and "pip install" in setup_cmd
    run_cmd = next(a for a in run if a.startswith("--command="))[len("--command="):]
    # The workers' command, as their shell splits it.
    words = subprocess.run(["bash", "-c", 'printf "%s\\0" ' + run_cmd.split("&&", 1)[1]],
                           capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    assert words == ["python3", "-m", "evclip_jax.main", "--config=/gcs/bkt/configs/x.py:bf16",
                     "--workdir=/gcs/bkt/runs/a b", "--config.distributed.enabled=on",
                     "--config.data.dir=/gcs/bkt/d"]

    local = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "n", "z", "v4-8", "configs/x.py",
                            "/tmp/runs"], env=env, capture_output=True, text=True, timeout=60)
    assert local.returncode == 2 and "WORKDIR=/tmp/runs: expected gs://" in local.stderr


# ----------------------------------------------------------------------------- sweeps


def sweep(*args, check=True, timeout=120):
    out = subprocess.run([sys.executable, str(LAUNCH / "sweep.py"), *args], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, out.stderr
    return out


GRID = ["--config=configs/vitb32_nimagenet.py", "--grid=loss.zs_weight=0.05,0.1",
        "--grid=loss.zs_form=zscl,release,label"]


def test_sweep_emits_a_slurm_array_and_tpu_commands(tmp_path):
    root = f"--workdir_root={tmp_path}"
    line = sweep(*GRID, root, "--scheduler=slurm").stdout.strip()
    assert line.split() == ["sbatch", "--array=0-5", str(LAUNCH / "slurm_gpu.sbatch"),
                            "--sweep", *GRID[:1], root, *GRID[1:]]
    lines = sweep(*GRID, "--workdir_root=gs://b/sw", "--scheduler=tpu", "--tpu_zone=z",
                  "--tpu_accelerator=v4-8").stdout.strip().splitlines()
    assert len(lines) == 6
    assert lines[5].split() == [str(LAUNCH / "tpu_vm.sh"), "evclip-sweep-5", "z", "v4-8",
                                "configs/vitb32_nimagenet.py",
                                "gs://b/sw/zs_weight=0.1_zs_form=label",
                                "--config.loss.zs_weight=0.1", "--config.loss.zs_form=label"]
    bad = sweep(*GRID, root, "--scheduler=tpu", check=False)
    assert bad.returncode != 0 and "--tpu_zone" in bad.stderr


def test_sweep_job_runs_one_job_in_its_own_workdir(tmp_path):
    """--job i (what each SLURM array task runs) becomes that job's main.py run."""
    grid = ["--config=tests/configs/tiny.py", f"--workdir_root={tmp_path}",
            "--grid=data.synthetic.enabled=False", "--grid=data.dir=nowhere_a,nowhere_b"]
    out = sweep(*grid, "--job=1", check=False)
    assert out.returncode != 0 and "nowhere_b" in out.stderr and "nowhere_a" not in out.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["enabled=False_dir=nowhere_b"]
    out = sweep(*grid, "--job=2", check=False)
    assert out.returncode != 0 and "--job=2: the sweep has jobs 0..1" in out.stderr


def test_sweep_gathers_the_results_table(tmp_path):
    def summary(name, finished, loss, top1):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({
            "step": 10 if finished else 4, "finished": finished, "train": {"loss": loss},
            "eval": {"zeroshot/top1": top1, "retrieval/R@1": top1 / 2, "note": "x"}}))

    summary("zs_weight=0.05_zs_form=zscl", True, 1.25, 0.5)
    summary("zs_weight=0.05_zs_form=release", False, 2.0, 0.125)
    out = sweep(*GRID, f"--workdir_root={tmp_path}", "--gather")
    table = (tmp_path / "results.md").read_text()
    assert out.stdout.startswith(table.split("\n\n", 1)[1].strip())
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| zs_")]
    assert len(rows) == 6
    assert rows[0] == ["| zs_weight=0.05_zs_form=zscl", "finished", "10", "1.2500", "0.2500",
                       "0.5000 |"]
    assert rows[1][1:4] == ["stopped early", "4", "2.0000"]
    assert all(r[1] == "not run" for r in rows[2:])
    assert json.loads((tmp_path / "results.json").read_text())[
        "zs_weight=0.1_zs_form=label"]["overrides"] == {"loss.zs_weight": "0.1",
                                                        "loss.zs_form": "label"}


@pytest.mark.slow
def test_sweep_runs_the_jobs_here_in_sequence_then_gathers_them(tmp_path):
    args = ["--config=tests/configs/tiny.py", f"--workdir_root={tmp_path}", "--grid=seed=0,1"]
    sweep(*args, timeout=900)
    rows = [line.split(" | ") for line in (tmp_path / "results.md").read_text().splitlines()
            if line.startswith("| seed=")]
    assert [r[:3] for r in rows] == [["| seed=0", "finished", "12"], ["| seed=1", "finished", "12"]]
    for seed, row in enumerate(rows):
        summary = json.loads((tmp_path / f"seed={seed}" / "summary.json").read_text())
        assert row[3] == f"{summary['train']['loss']:.4f}"
    assert rows[0][3] != rows[1][3]  # the seeds differ
    again = sweep(*args)
    assert again.stdout.count("done already") == 2 and "seed=1 | finished" in again.stdout
