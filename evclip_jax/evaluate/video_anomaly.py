"""Video anomaly detection on event-frame files (paper Sec. 4.1): one ROC AUC per dataset.

The files are ``<name>_frames.npz`` of tools/video_to_events.py (``event_frames`` counts of
16 stacked frame differences, ``instance_labels`` 0 normal / 1 anomalous). Scoring is
``anomaly.evaluate_anomaly``; this module reads the files and feeds the event tower.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from evclip_jax import embed
from evclip_jax.evaluate.anomaly import evaluate_anomaly
from evclip_jax.evaluate.common import batch_axes_of, pad_batch

PlotsData = dict[str, dict[str, dict]]


def group_video_files(paths: Sequence[str] | Mapping[str, Sequence[str]]
                      ) -> dict[str, list[str]]:
    """{dataset: [files]}: a mapping as given; a list of "name=path" or plain paths (plain
    paths form the dataset "videos")."""
    if isinstance(paths, Mapping):
        return {str(k): [os.fspath(p) for p in v] for k, v in paths.items()}
    groups: dict[str, list[str]] = {}
    for entry in paths:
        entry = os.fspath(entry)
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = "videos", entry
        groups.setdefault(name, []).append(path)
    return groups


def load_video_frames(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(Eq. 1 frames float32 [N, H, W] = counts / (max + 1) per frame, labels int64 [N]) of a
    ``<name>_frames.npz`` written by tools/video_to_events.py (with --labels)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: event-frame file not found (expected a <name>_frames.npz of "
                         "tools/video_to_events.py)")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "event_frames" not in data or "instance_labels" not in data:
                raise ValueError(f"{path}: expected keys event_frames and instance_labels "
                                 f"(convert the video with --labels), got {sorted(data)}")
            counts = np.asarray(data["event_frames"], np.float32)
            labels = np.asarray(data["instance_labels"])
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    if counts.ndim != 3 or labels.shape != (counts.shape[0],):
        raise ValueError(f"{path}: event_frames {counts.shape} and instance_labels "
                         f"{labels.shape}; expected [N, H, W] and [N]")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError(f"{path}: instance_labels must be 0 (normal) or 1 (anomalous), got "
                         f"{np.unique(labels)[:10]}")
    # Paper Eq. 1 normalisation, per event frame.
    frames = counts / (counts.max(axis=(1, 2), keepdims=True) + 1.0)
    return frames, labels.astype(np.int64)


def _video_batches(paths: Sequence[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Full-size (padded, masked) batches of each file's frames; files may differ in size."""
    for path in paths:
        frames, labels = load_video_frames(path)
        for start in range(0, frames.shape[0], batch_size):
            yield pad_batch({"events": frames[start:start + batch_size],
                             "labels": labels[start:start + batch_size],
                             "mask": np.ones(min(batch_size, frames.shape[0] - start), bool)},
                            batch_size)


def evaluate_video_anomaly(
    towers,
    event_params,
    normal_text_emb: np.ndarray,
    abnormal_text_emb: np.ndarray,
    logit_scale: float,
    frames_npz_paths: Sequence[str] | Mapping[str, Sequence[str]],
    *,
    batch_size: int = 64,
    mesh: Mesh | None = None,
) -> tuple[dict[str, float], PlotsData]:
    """ROC AUC per dataset of event-frame files, and the "roc" plot data.

    Each file's Eq. 1 frames are resized to the tower's image size (bilinear, antialiased, on
    device; a non-square video is stretched, not cropped), encoded by the event tower and
    scored by ``anomaly.anomaly_scores`` (softmax of s * e t^T over the normal and abnormal
    prompts). A dataset is a list of files pooled into one AUC (``group_video_files``).
    Keys "anomaly/<dataset>/auc|num_instances|num_anomalous".
    """
    groups = group_video_files(frames_npz_paths)
    if not groups or not all(groups.values()):
        raise ValueError("config.eval.anomaly_videos: expected at least one event-frame file")
    size = towers.config.vision.image_size
    vision = towers.vision

    def embed_frames(params, frames):
        frames = jax.image.resize(frames, (frames.shape[0], size, size), "linear",
                                  antialias=True)
        return embed.embed_vision(vision, params, embed.events_to_tower_input(frames))

    shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in batch_axes_of(mesh)]))
    batch_size = -(-int(batch_size) // shards) * shards
    metrics: dict[str, float] = {}
    roc: dict[str, dict] = {}
    for name, paths in groups.items():
        values, details = evaluate_anomaly(embed_frames, _video_batches(paths, batch_size),
                                           normal_text_emb, abnormal_text_emb, logit_scale,
                                           mesh, return_details=True, params=event_params)
        metrics.update({f"anomaly/{name}/{k}": float(v) for k, v in values.items()})
        roc[f"anomaly {name}"] = details
    return metrics, {"roc": roc}
