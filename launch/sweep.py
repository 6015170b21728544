r"""Runs a config's sweep: one workdir per job, in sequence on this machine, or as the commands
that run it on a SLURM GPU cluster (one array task per job) or on Cloud TPU VMs (one slice per
job); then gathers every job's summary into one results table.

    python launch/sweep.py --config configs/demo.py --workdir_root /tmp/sweep
    python launch/sweep.py --config configs/demo.py --workdir_root /tmp/sweep --print_only
    python launch/sweep.py --config configs/vitb32_nimagenet.py --workdir_root /shared/sweep \
        --grid 'loss.zs_weight=0.05,0.1,0.2' --grid 'loss.zs_form=zscl,release' \
        --scheduler slurm            # prints: sbatch --array=0-5 launch/slurm_gpu.sbatch ...
    python launch/sweep.py --config gs://b/configs/vitb32_nimagenet.py \
        --workdir_root gs://b/sweep --scheduler tpu --tpu_zone us-central2-b \
        --tpu_accelerator v4-32     # prints one launch/tpu_vm.sh command per job
    python launch/sweep.py ... --gather   # the results table of jobs run elsewhere

Jobs come from the config file's ``get_sweep()`` ([(name, {field: value})]) or from --grid;
job i runs in <root>/<name i>. ``--job i`` runs job i alone here (the SLURM array task does).
The table (<root>/results.md and results.json) has one row per job: its status, steps, final
training loss and eval metrics. Closed-world jobs (config.world.enabled) share <root>/world and
<root>/teacher, and are also gathered into <root>/report.md (mean and spread over seeds, and
the unseen-class zero-shot curves). A job whose workdir holds a finished summary is not run
again.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from absl import app, flags

LAUNCH = Path(__file__).resolve().parent
FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file (with get_sweep(), or use --grid); with "
                    "--scheduler tpu, a path relative to the checkout.", required=True)
flags.DEFINE_string("workdir_root", None, "One sub-dir per job is made under it.",
                    required=True)
flags.DEFINE_multi_string("grid", [], "key=v1,v2,... (config field and its values).")
flags.DEFINE_enum("scheduler", "local", ["local", "slurm", "tpu"],
                  "local: run here, in sequence; slurm, tpu: print the commands that run the "
                  "jobs there (then --gather).")
flags.DEFINE_bool("print_only", False, "local: print each job's command instead of running it.")
flags.DEFINE_bool("gather", False, "Only gather the results table from the job workdirs.")
flags.DEFINE_integer("job", None, "Run only this job (0-based), in this process.")
flags.DEFINE_string("tpu_zone", None, "--scheduler tpu: the zone of the slices.")
flags.DEFINE_string("tpu_accelerator", None, "--scheduler tpu: e.g. v4-32.")
flags.DEFINE_string("tpu_prefix", "evclip-sweep", "--scheduler tpu: slice i is <prefix>-<i>.")


def grid_jobs(grid: list[str]) -> list[tuple[str, dict[str, str]]]:
    """[(name, {field: value})] of every point of the grid."""
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        if not values:
            raise app.UsageError(f"--grid {item!r}: expected key=v1,v2")
        axes.append([(key, v) for v in values.split(",")])
    points = [dict(p) for p in itertools.product(*axes)]
    return [("_".join(f"{k.split('.')[-1]}={v}" for k, v in p.items()) or "base", p)
            for p in points]


def config_module(path: str):
    """The config file as a module (``path`` without a ``:arg`` suffix)."""
    spec = importlib.util.spec_from_file_location("sweep_config", path.split(":", 1)[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jobs_of(module) -> list[tuple[str, dict]]:
    if FLAGS.grid:
        return grid_jobs(FLAGS.grid)
    if hasattr(module, "get_sweep"):
        return module.get_sweep()
    raise app.UsageError(f"{FLAGS.config} has no get_sweep(); pass --grid")


def main_args(config: str, workdir: str, overrides: dict) -> list[str]:
    """The flags of ``python -m evclip_jax.main`` for one job."""
    return [f"--config={config}", f"--workdir={workdir}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]


def sweep_args() -> list[str]:
    """This sweep's own flags, for the commands that run its jobs elsewhere."""
    return [f"--config={FLAGS.config}", f"--workdir_root={FLAGS.workdir_root}",
            *(f"--grid={g}" for g in FLAGS.grid)]


def slurm_command(num_jobs: int) -> list[str]:
    return ["sbatch", f"--array=0-{num_jobs - 1}", str(LAUNCH / "slurm_gpu.sbatch"), "--sweep",
            *sweep_args()]


def tpu_commands(jobs: list[tuple[str, dict]]) -> list[list[str]]:
    """One launch/tpu_vm.sh command per job; gs:// values become the workers' /gcs mounts."""
    if not (FLAGS.tpu_zone and FLAGS.tpu_accelerator):
        raise app.UsageError("--scheduler tpu needs --tpu_zone and --tpu_accelerator")
    if not FLAGS.workdir_root.startswith("gs://"):
        raise app.UsageError(f"--workdir_root={FLAGS.workdir_root}: expected gs://BUCKET/path "
                             "with --scheduler tpu (the slices are deleted at the end)")

    def on_workers(value):
        return f"/gcs/{value[len('gs://'):]}" if str(value).startswith("gs://") else value

    return [[str(LAUNCH / "tpu_vm.sh"), f"{FLAGS.tpu_prefix}-{i}", FLAGS.tpu_zone,
             FLAGS.tpu_accelerator, FLAGS.config, f"{FLAGS.workdir_root}/{name}",
             *(f"--config.{k}={on_workers(v)}" for k, v in overrides.items())]
            for i, (name, overrides) in enumerate(jobs)]


def summary_of(workdir: Path) -> dict | None:
    path = workdir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def metrics_of(summary: dict) -> dict[str, float]:
    """The numbers a job reports: a training run's eval metrics, or (closed world) the
    summary's own."""
    values = summary["eval"] if "eval" in summary else summary
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def results_table(jobs: list[tuple[str, dict]], root: Path, failed: set[str]) -> str:
    """Writes root/results.md and root/results.json; returns the markdown table."""
    rows, metrics = {}, set()
    for name, overrides in jobs:
        summary = summary_of(root / name)
        status = ("failed" if name in failed else "not run" if summary is None
                  else "finished" if summary.get("finished", True) else "stopped early")
        rows[name] = {"overrides": overrides, "status": status, "summary": summary}
        metrics |= set(metrics_of(summary or {}))
    metrics = sorted(metrics)
    lines = ["| job | status | steps | train loss | " + " | ".join(metrics) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for name, row in rows.items():
        s = row["summary"] or {}
        loss = (s.get("train") or {}).get("loss")
        values = metrics_of(s)
        cells = [f"{values[m]:.4f}" if m in values else "" for m in metrics]
        lines.append(f"| {name} | {row['status']} | {s.get('step', '')} | "
                     + (f"{loss:.4f}" if loss is not None else "") + " | "
                     + " | ".join(cells) + " |")
    table = "\n".join(lines)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(f"# Sweep of {FLAGS.config}\n\n{table}\n")
    (root / "results.json").write_text(json.dumps(rows, indent=2))
    return table


def run_local(jobs: list[tuple[str, dict]], root: str, shared: dict) -> set[str]:
    """Runs the jobs here one after the other; returns the names of those that failed."""
    failed = set()
    for name, overrides in jobs:
        workdir = f"{root}/{name}"
        cmd = [sys.executable, "-m", "evclip_jax.main",
               *main_args(FLAGS.config, workdir, {**shared, **overrides})]
        summary = summary_of(Path(workdir))
        if summary is not None and summary.get("finished", True):
            print(f"{name}: done already ({workdir}/summary.json)", flush=True)
            continue
        print(f"{name}: {shlex.join(cmd)}", flush=True)
        log = Path(workdir) / "sweep.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
                print(f"{name}: failed; see {log}", flush=True)
                failed.add(name)
    return failed


def main(argv):
    del argv
    module = config_module(FLAGS.config)
    jobs = jobs_of(module)
    root = FLAGS.workdir_root
    closed_world = module.get_config().world.enabled
    shared = ({"world.dir": f"{root}/world", "world.teacher_dir": f"{root}/teacher"}
              if closed_world else {})
    if FLAGS.job is not None:
        if not 0 <= FLAGS.job < len(jobs):
            raise app.UsageError(f"--job={FLAGS.job}: the sweep has jobs 0..{len(jobs) - 1}")
        name, overrides = jobs[FLAGS.job]
        args = main_args(FLAGS.config, f"{root}/{name}", {**shared, **overrides})
        os.execv(sys.executable, [sys.executable, "-m", "evclip_jax.main", *args])
    if FLAGS.scheduler == "slurm" and not FLAGS.gather:
        print(shlex.join(slurm_command(len(jobs))))
        return
    if FLAGS.scheduler == "tpu" and not FLAGS.gather:
        for cmd in tpu_commands([(n, {**shared, **o}) for n, o in jobs]):
            print(shlex.join(cmd))
        return
    if FLAGS.print_only:
        for name, overrides in jobs:
            print(shlex.join([sys.executable, "-m", "evclip_jax.main", *main_args(
                FLAGS.config, f"{root}/{name}", {**shared, **overrides})]))
        return
    failed = set() if FLAGS.gather else run_local(jobs, root, shared)
    print(results_table(jobs, Path(root), failed))
    print(f"results: {root}/results.md")
    summaries = {name: summary_of(Path(root) / name) for name, _ in jobs}
    if closed_world and all(summaries.values()):
        from evclip_jax.closed_world import sweep_report

        print(sweep_report(summaries, Path(root)))
    if failed:
        raise SystemExit(f"{len(failed)} of {len(jobs)} jobs failed: {', '.join(sorted(failed))}")


if __name__ == "__main__":
    app.run(main)
