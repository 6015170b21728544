r"""Quick evaluation of an exported or converted checkpoint on a TFRecord dataset.

    python -m evclip_jax.eval --checkpoint /ckpt/evclip_vitb32 --dataset /data/ncaltech101 \
        --split test --train_split train --evals zeroshot,fewshot,retrieval \
        --prompt 'a point cloud image of a {label}' --out /tmp/eval_ncaltech

--checkpoint is an evclip checkpoint dir, an HF CLIP dir or a training workdir. Anomaly
detection on videos converted by tools/video_to_events.py (``<name>_frames.npz`` with
instance labels): ``--evals anomaly --videos a_frames.npz,b_frames.npz``; files are pooled
into one dataset unless named, as in ``--videos shanghai=a_frames.npz,shanghai=b_frames.npz,
ucf=c_frames.npz``. Prints a metrics table and writes metrics.json, report.md, PNG plots and
TensorBoard scalars under --out.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from absl import app, flags

from evclip_jax.evaluate import runner

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "evclip checkpoint dir, HF CLIP dir or training workdir.")
_DATASET = flags.DEFINE_string(
    "dataset", None, "Dir of TFRecord shards with <split>.manifest.json (zeroshot, retrieval, "
    "fewshot).")
_SPLIT = flags.DEFINE_string("split", "test", "Evaluation split.")
_TRAIN_SPLIT = flags.DEFINE_string(
    "train_split", "train", "Split the few-shot support samples come from (disjoint from "
    "--split).")
_EVALS = flags.DEFINE_list(
    "evals", ["zeroshot", "retrieval", "fewshot"],
    f"Comma list of evaluators: {', '.join(runner.EVAL_NAMES)}.")
_PROMPT = flags.DEFINE_string("prompt", "a photo of a {label}", "Class prompt template.")
_OUT = flags.DEFINE_string("out", None, "Output dir (default <checkpoint>/eval).")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 64, "Global eval batch size (a multiple of the device count).")
_RANK_AGAINST = flags.DEFINE_enum(
    "rank_against", "all", ["all", "heldout"],
    "Zero-shot: rank against all class prompts or only the evaluated classes'.")
_HELDOUT = flags.DEFINE_string(
    "heldout_classes", "", "Evaluated class ids, e.g. '80-99'; empty: every class of --split.")
_KNN_K = flags.DEFINE_integer(
    "knn_k", 0, "> 0: EZSR k-NN translation of event embeddings against the split's images.")
_SHOTS = flags.DEFINE_list("fewshot_shots", ["1", "2", "5"], "Few-shot shot counts.")
_SEEDS = flags.DEFINE_integer("fewshot_seeds", 3, "Few-shot seeds (0..n-1).")
_FINETUNE_STEPS = flags.DEFINE_integer(
    "finetune_steps", runner.FINETUNE_STEPS, "fewshot_finetune: steps per support set.")
_VIDEOS = flags.DEFINE_list(
    "videos", [], "anomaly: <name>_frames.npz files of tools/video_to_events.py, optionally "
    "as dataset=path.")
_NORMAL = flags.DEFINE_multi_string(
    "normal_prompts", list(runner.DEFAULT_NORMAL_PROMPTS),
    "anomaly: prompt(s) for normal events (repeat the flag for several).")
_ABNORMAL = flags.DEFINE_multi_string(
    "abnormal_prompts", list(runner.DEFAULT_ABNORMAL_PROMPTS),
    "anomaly: prompt(s) for anomalous events (repeat the flag for several).")


def eval_config(evals: Sequence[str]):
    """A base config with the data and eval fields of the flags."""
    from evclip_jax.config_base import base_config

    c = base_config()
    c.data.dir = _DATASET.value or ""
    c.data.eval_split = _SPLIT.value
    c.data.train_split = _TRAIN_SPLIT.value
    c.data.prompt = _PROMPT.value
    c.eval.checkpoint = _CHECKPOINT.value
    c.eval.evals = ",".join(evals)
    c.eval.batch_size = _BATCH_SIZE.value
    c.eval.rank_against = _RANK_AGAINST.value
    c.eval.heldout_classes = _HELDOUT.value
    c.eval.knn_k = _KNN_K.value
    try:
        c.eval.fewshot_shots = tuple(int(n) for n in _SHOTS.value)
    except ValueError:
        raise app.UsageError(f"--fewshot_shots={_SHOTS.value}: expected integers") from None
    c.eval.fewshot_seeds = _SEEDS.value
    return c


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not os.path.exists(_CHECKPOINT.value):
        raise app.UsageError(f"--checkpoint: {_CHECKPOINT.value} does not exist")
    evals = runner.parse_evals(",".join(_EVALS.value), field="--evals")
    if any(e != "anomaly" for e in evals) and not _DATASET.value:
        raise app.UsageError(f"--dataset is required for {[e for e in evals if e != 'anomaly']}")
    if "anomaly" in evals and not _VIDEOS.value:
        raise app.UsageError("--evals anomaly needs --videos (<name>_frames.npz files)")
    out = _OUT.value or os.path.join(_CHECKPOINT.value, "eval")
    metrics = runner.evaluate_checkpoint(
        eval_config(evals), out, out_dir=out, anomaly_videos=_VIDEOS.value,
        normal_prompts=_NORMAL.value, abnormal_prompts=_ABNORMAL.value,
        finetune_steps=_FINETUNE_STEPS.value)
    print(runner.format_metrics(metrics))
    print(f"report: {os.path.join(out, 'report.md')}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint"])
    app.run(main)
