"""The closed world (METHOD.md "Closed-world protocol"): the paper's protocol in miniature.

1. Build the world: synthetic classes, some of them unseen (data/synthetic.make_closed_world).
2. Train a tiny CLIP teacher on images and captions of every class: the trainer with the
   ``clip`` objective, saved as an HF CLIP dir (reused when it is already there).
3. Distil its image tower into the event tower on the seen classes' (event, image) pairs: the
   trainer with ``config``'s objective, initialised from the teacher, evaluated periodically
   on held-out seen-class events and on every unseen-class event.
4. Write ``summary.json`` and ``report.md`` (a table and the unseen-class zero-shot curve).

``config.world`` holds the world and the teacher's settings; the rest of ``config`` is the
distillation run. The world and the teacher may live outside the workdir (``world.dir``,
``world.teacher_dir``), so that the jobs of a sweep share them.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import jax
import numpy as np

from evclip_jax import trainer
from evclip_jax.api import EventCLIP
from evclip_jax.data import records
from evclip_jax.data.synthetic import make_closed_world
from evclip_jax.evaluate import report
from evclip_jax.evaluate.settings import parse_class_ids

TEACHER_HF = "hf"


def world_dir(config, workdir: Path) -> Path:
    return Path(config.world.dir or workdir / "world")


def teacher_dir(config, workdir: Path) -> Path:
    return Path(config.world.teacher_dir or workdir / "teacher")


def build_world(config, workdir: Path) -> Path:
    """The world's TFRecords, built on first use (by process 0)."""
    w, out = config.world, world_dir(config, workdir)
    if not Path(records.manifest_path(out, "unseen")).is_file() and jax.process_index() == 0:
        logging.info("building the closed world in %s", out)
        make_closed_world(out, num_classes=w.num_classes,
                          unseen_classes=tuple(unseen_ids(config)), per_class=w.per_class,
                          test_fraction=w.test_fraction,
                          image_size=config.model.vision.image_size, seed=w.seed,
                          representation=config.data.representation,
                          num_frames=config.data.num_frames)
    return out


def unseen_ids(config) -> list[int]:
    return [int(c) for c in parse_class_ids(config.world.unseen_classes,
                                            config.world.num_classes,
                                            "config.world.unseen_classes")]


def teacher_config(config, data_dir: Path):
    """The teacher's run: a random tiny CLIP, the clip objective on every class's images,
    image zero-shot on the held-out images."""
    t = config.world.teacher
    c = copy.deepcopy(config)
    c.seed = config.world.seed  # one teacher, whatever the seed of the distillation
    c.objective = "clip"
    c.model.checkpoint = ""
    c.num_train_steps, c.batch_size = t.steps, t.batch_size
    c.optim.base_lr, c.optim.warmup_steps = t.base_lr, t.warmup_steps
    c.data.dir, c.data.train_split, c.data.eval_split = str(data_dir), "train", "test"
    c.eval.query, c.eval.evals, c.eval.every_steps = "images", "zeroshot", 0
    c.eval.heldout_classes, c.eval.rank_against = "", "all"
    c.eval.views = {}
    return c


def distill_config(config, data_dir: Path, teacher_hf: Path):
    """The event tower's run: initialised from the teacher, trained on the seen classes."""
    c = copy.deepcopy(config)
    c.model.checkpoint = str(teacher_hf)
    c.data.dir, c.data.train_split = str(data_dir), "train_seen"
    return c


def train_teacher(config, workdir: Path, data_dir: Path) -> tuple[Path, dict]:
    """(HF CLIP dir of the teacher, its final metrics); trained only when not there yet."""
    tdir = teacher_dir(config, workdir)
    hf_dir = tdir / TEACHER_HF
    if not (hf_dir / "config.json").is_file():
        trainer.train_and_evaluate(teacher_config(config, data_dir), str(tdir))
        if jax.process_index() == 0:
            EventCLIP.from_pretrained(tdir).save_pretrained_hf(hf_dir, tower="clip",
                                                               overwrite=True)
    return hf_dir, json.loads((tdir / "summary.json").read_text())["eval"]


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / trainer.EVAL_HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train_and_evaluate(config, workdir: str) -> dict:
    """Builds the world, trains (or reuses) the teacher, distils; returns the summary."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = build_world(config, workdir)
    teacher_hf, teacher_metrics = train_teacher(config, workdir, data_dir)
    run_dir = workdir / "distill"
    distill = trainer.train_and_evaluate(distill_config(config, data_dir, teacher_hf),
                                         str(run_dir))
    history = read_history(run_dir)
    first, last = history[0], history[-1]
    unseen = unseen_ids(config)
    summary = {
        "objective": config.objective,
        "teacher_image_zeroshot_acc": teacher_metrics["zeroshot/top1"],
        "event_zeroshot_acc_at_init": first["seen/zeroshot/top1"],
        "event_zeroshot_acc": last["seen/zeroshot/top1"],
        "event_zeroshot_acc_heldout_classes_at_init": first["unseen/zeroshot/top1"],
        "event_zeroshot_acc_heldout_classes": last["unseen/zeroshot/top1"],
        "chance": 1.0 / config.world.num_classes,
        "chance_heldout_classes": 1.0 / len(unseen),
        "retrieval_event_to_image_R@1": last["seen/retrieval/event_to_image/R@1"],
        "retrieval_event_to_text_R@1": last["seen/retrieval/event_to_text/R@1"],
        "fewshot_1shot_heldout_classes": last["unseen/fewshot/1shot/top1"],
        "fewshot_5shot_heldout_classes": last["unseen/fewshot/5shot/top1"],
        "unseen_zeroshot_curve": {"steps": [h["step"] for h in history],
                                  "top1": [h["unseen/zeroshot/top1"] for h in history]},
        "distill": distill,
    }
    if jax.process_index() == 0:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        write_report(summary, workdir)
    return summary


ROWS = (
    ("teacher image zero-shot, held-out images (all classes)", "teacher_image_zeroshot_acc",
     "chance"),
    ("event zero-shot at initialisation, held-out seen-class events",
     "event_zeroshot_acc_at_init", "chance"),
    ("event zero-shot after distillation, held-out seen-class events", "event_zeroshot_acc",
     "chance"),
    ("event zero-shot at initialisation, unseen classes",
     "event_zeroshot_acc_heldout_classes_at_init", "chance_heldout_classes"),
    ("event zero-shot after distillation, unseen classes", "event_zeroshot_acc_heldout_classes",
     "chance_heldout_classes"),
    ("retrieval event -> image R@1 (seen classes)", "retrieval_event_to_image_R@1", None),
    ("retrieval event -> text R@1 (seen classes)", "retrieval_event_to_text_R@1", None),
    ("1-shot ridge probe, unseen classes", "fewshot_1shot_heldout_classes",
     "chance_heldout_classes"),
    ("5-shot ridge probe, unseen classes", "fewshot_5shot_heldout_classes",
     "chance_heldout_classes"),
)


def table(summary: dict) -> list[str]:
    lines = ["| | accuracy | chance |", "| --- | --- | --- |"]
    for label, key, chance in ROWS:
        chance_cell = f"{summary[chance]:.3f}" if chance else ""
        lines.append(f"| {label} | {summary[key]:.3f} | {chance_cell} |")
    return lines


def write_report(summary: dict, workdir: Path) -> None:
    curve = summary["unseen_zeroshot_curve"]
    plot = report.plot_curves(
        {f"{summary['objective']} (this run)": (curve["steps"], curve["top1"], None)},
        workdir / "unseen_zeroshot.png", ylabel="unseen-class zero-shot top-1",
        chance=summary["chance_heldout_classes"])
    lines = ["# Closed world: transfer to unseen classes", "", *table(summary), "",
             f"![unseen-class zero-shot against step]({plot.name})", "",
             "Per-split details of the distillation's last evaluation: "
             "[distill/report/report.md](distill/report/report.md)."]
    (workdir / "report.md").write_text("\n".join(lines) + "\n")


def format_summary(summary: dict) -> str:
    return "\n".join(table(summary))


def sweep_report(summaries: dict[str, dict], root: Path) -> str:
    """Gathers the jobs of a closed-world sweep ("<job>/seed<k>" -> summary) into
    root/report.md: final numbers as mean +- standard deviation over seeds, and the paper's
    Fig. 4 (unseen-class zero-shot against step, one line per job). Returns the table."""
    groups: dict[str, list[dict]] = {}
    for name, summary in summaries.items():
        groups.setdefault(name.split("/")[0], []).append(summary)
    keys = [key for _, key, _ in ROWS]
    lines = ["| job | seeds | " + " | ".join(label for label, _, _ in ROWS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in ROWS) + " |"]
    curves = {}
    for job, runs in groups.items():
        cells = []
        for key in keys:
            values = np.array([r[key] for r in runs], np.float64)
            cells.append(f"{values.mean():.3f} +- {values.std():.3f}")
        lines.append(f"| {job} | {len(runs)} | " + " | ".join(cells) + " |")
        steps = runs[0]["unseen_zeroshot_curve"]["steps"]
        top1 = np.array([r["unseen_zeroshot_curve"]["top1"] for r in runs], np.float64)
        curves[job] = (steps, top1.mean(axis=0), top1.std(axis=0))
    first = next(iter(summaries.values()))
    plot = report.plot_curves(curves, root / "fig4_unseen_zeroshot.png",
                              ylabel="unseen-class zero-shot top-1 (mean +- std over seeds)",
                              chance=first["chance_heldout_classes"],
                              title="closed world: zero-shot on unseen classes during training")
    text = ["# Closed-world ablation", "",
            f"Chance: {first['chance']:.3f} (all classes), "
            f"{first['chance_heldout_classes']:.3f} (unseen classes).", "", *lines, "",
            f"![unseen-class zero-shot against step]({plot.name})"]
    (root / "report.md").write_text("\n".join(text) + "\n")
    return "\n".join(lines)
