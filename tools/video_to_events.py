r"""Convert videos into event files, stacked event frames and/or TFRecords (paper Sec. 4.1, VAD).

A pixel fires where the grayscale change between consecutive frames is strictly greater than
--threshold (of 255). Event files hold one event per fired pixel and frame (timestamp of the
later frame, polarity 1 = brighter), written with ``write_events``. Event frames sum --stack
consecutive frame differences into one frame per instance, exactly as
``evclip_jax.events.synthesis.video_to_event_frames`` (instance i owns frames
i*stack+1 .. (i+1)*stack; an incomplete tail is dropped; majority-vote labels, ties to the
larger label), and are saved as ``<name>_frames.npz`` with keys event_frames (float32
[N,H,W] counts), instance_labels (int64 [N], only with --labels), threshold, stack, fps.

With ``tfrecords`` (needs --labels), every instance becomes one event-only record of an
evaluation set, so a video anomaly dataset goes through the input pipeline and ``--mode eval``
like any other: each instance's events are written as ``<name>_instances/<name>_<i>.npz`` and
``evclip_jax.data.records.write_tfrecords`` turns them into ``<out>/<split>-*.tfrecord`` and
``<split>.manifest.json`` (Eq. 1 counts of the whole instance at --image_size, the video's
frame size as the sensor, labels indexing --class_names). All videos of one call form the
split (--video and --labels repeat), so they must share a frame size.

The video is read with OpenCV (``opencv-python-headless``) in chunks of --stack differences,
so memory stays bounded for long videos; image sequences such as ``frames/%05d.png`` work too.

  python tools/video_to_events.py --video clip.mp4 --out /tmp/ev --format npz,frames \
      --labels clip_labels.npy
  python tools/video_to_events.py --video a.mp4 --labels a.npy --video b.mp4 --labels b.npy \
      --out /data/vad_tfr --format tfrecords --split test --image_size 224
  python -m evclip_jax.main --mode eval --config configs/vitl14_nimagenet.py --workdir /runs/vad \
      --config.eval.checkpoint=/runs/vitl14 --config.data.dir=/data/vad_tfr \
      --config.eval.evals=anomaly --config.eval.anomaly_splits="('test',)"
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags

from evclip_jax.data import records
from evclip_jax.events.io import FORMATS, write_events
from evclip_jax.events.synthesis import majority_label, video_to_event_frames, video_to_events

FRAMES_FORMAT = "frames"
RECORDS_FORMAT = "tfrecords"
_EXTENSIONS = {"bin": ".bin", "nimagenet_npz": ".npz", "aedat2": ".aedat", "npz": ".npz",
               "h5": ".h5"}

_VIDEO = flags.DEFINE_multi_string(
    "video", None, "Input video (any file or pattern OpenCV reads); repeat for several.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_FORMAT = flags.DEFINE_list(
    "format", ["npz", FRAMES_FORMAT],
    f"Comma-separated outputs: event file formats {', '.join(FORMATS)}, '{FRAMES_FORMAT}' "
    f"(stacked event frames as <name>_frames.npz) and/or '{RECORDS_FORMAT}' (one event-only "
    "record per instance, all videos in one split).")
_THRESHOLD = flags.DEFINE_float("threshold", 25, "Fire where |f_j - f_{j-1}| > threshold (0-255).")
_STACK = flags.DEFINE_integer("stack", 16, "Frame differences summed into one event frame.")
_LABELS = flags.DEFINE_multi_string(
    "labels", None, "Per-frame integer labels of each --video, in the same order: .npy, or "
    f"text with one label per frame (whitespace or comma separated); needed by "
    f"'{RECORDS_FORMAT}'.")
_FPS = flags.DEFINE_float("fps", None, "Frame rate override (default: from the video, else 30).")
_SPLIT = flags.DEFINE_string("split", "test", f"'{RECORDS_FORMAT}': the split name.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224,
                                   f"'{RECORDS_FORMAT}': frame side (the tower's image size).")
_CLASS_NAMES = flags.DEFINE_list(
    "class_names", ["normal", "anomalous"],
    f"'{RECORDS_FORMAT}': the names the labels index (anomaly: 0 normal, 1 anomalous).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, f"'{RECORDS_FORMAT}': TFRecord shards.")


def read_frame_labels(path: str) -> np.ndarray:
    """Per-frame integer labels from a .npy file or a whitespace/comma separated text file."""
    try:
        if path.endswith(".npy"):
            labels = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                labels = np.array(f.read().replace(",", " ").split(), dtype=np.float64)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read per-frame labels ({e})") from e
    labels = np.asarray(labels).ravel()
    if labels.size and not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"{path}: expected integer per-frame labels")
    return labels.astype(np.int64)


def video_name(video: str) -> str:
    """What the outputs of a video are named after: its file's stem, or the folder of an
    image-sequence pattern (frames/%05d.png)."""
    source = os.path.dirname(os.path.abspath(video)) if "%" in video else video
    return os.path.splitext(os.path.basename(source))[0] or "video"


def _open_video(path: str):
    """An opened cv2.VideoCapture, or a ValueError naming the file."""
    import cv2  # opencv-python-headless; only this tool needs it

    if "%" not in path and not os.path.exists(path):
        raise ValueError(f"{path}: video file not found")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise ValueError(f"{path}: OpenCV cannot open this video (unsupported codec or not a "
                         "video)")
    return capture


def _gray_frames(capture) -> Iterator[np.ndarray]:
    """Yields uint8 grayscale (BT.601 luma) frames [H,W]."""
    import cv2

    while True:
        ok, frame = capture.read()
        if not ok:
            return
        if frame.ndim == 3:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        yield np.ascontiguousarray(frame, dtype=np.uint8)


def convert_video(
    video: str,
    out_dir: str,
    formats: Sequence[str] = ("npz", FRAMES_FORMAT),
    threshold: float = 25,
    stack: int = 16,
    labels_path: str | None = None,
    fps: float | None = None,
    progress: bool = True,
) -> dict:
    """Convert one video; returns a summary dict (frames, events, instances, written paths).

    With ``tfrecords`` in ``formats`` each instance's events go to
    ``<out_dir>/<name>_instances/<name>_<i>.npz`` and the summary lists them as
    ``instance_files`` with their ``instance_labels``; ``convert_videos`` writes the records.
    """
    from tqdm import tqdm

    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in (FRAMES_FORMAT, RECORDS_FORMAT, *FORMATS)]
    if not formats or unknown:
        raise ValueError(f"--format: unknown {unknown}; expected any of "
                         f"{', '.join(FORMATS)}, {FRAMES_FORMAT}, {RECORDS_FORMAT}")
    if stack < 1:
        raise ValueError(f"--stack: expected a positive integer, got {stack}")
    if RECORDS_FORMAT in formats and not labels_path:
        raise ValueError(f"{video}: --format {RECORDS_FORMAT} needs --labels (one per frame) "
                         "for the instance labels of the records")
    labels = read_frame_labels(labels_path) if labels_path else None

    import cv2

    capture = _open_video(video)
    try:
        if fps is None:
            fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
        event_chunks, frame_chunks = [], []
        chunk: list[np.ndarray] = []  # frames of the current block, starting at its reference
        start = 0  # video index of chunk[0]
        num_frames = 0
        for frame in tqdm(_gray_frames(capture), total=total, unit="frame",
                          desc=os.path.basename(video), disable=not progress):
            if chunk and frame.shape != chunk[0].shape:
                raise ValueError(f"{video}: frame {num_frames} has shape {frame.shape}, "
                                 f"expected {chunk[0].shape}")
            chunk.append(frame)
            num_frames += 1
            if len(chunk) == stack + 1:  # one complete block of `stack` differences
                block = np.stack(chunk)
                event_chunks.append(video_to_events(block, fps, threshold, start_index=start))
                frame_chunks.append(video_to_event_frames(block, None, threshold, stack)[0])
                chunk, start = chunk[-1:], start + stack
        if len(chunk) > 1:  # the tail: events yes, no event frame (incomplete block)
            event_chunks.append(video_to_events(np.stack(chunk), fps, threshold,
                                                start_index=start))
    finally:
        capture.release()
    if num_frames == 0:
        raise ValueError(f"{video}: OpenCV read no frames from this video")

    if labels is not None:
        if labels.size != num_frames:
            raise ValueError(f"{labels_path}: has {labels.size} labels, expected one per frame "
                             f"of {video} ({num_frames} frames)")
        num_instances = len(frame_chunks)
        owned = labels[1: num_instances * stack + 1].reshape(num_instances, stack)
        # Same rule as video_to_event_frames: most frequent label, ties to the larger one.
        instance_labels = np.array([majority_label(row) for row in owned], np.int64)

    os.makedirs(out_dir, exist_ok=True)
    name = video_name(video)
    height, width = chunk[0].shape
    events = np.concatenate(event_chunks) if event_chunks else video_to_events(
        np.stack(chunk), fps, threshold)
    written, summary = [], {}
    for fmt in formats:
        if fmt == RECORDS_FORMAT:
            summary = _write_instances(event_chunks[:len(frame_chunks)], instance_labels,
                                       os.path.join(out_dir, f"{name}_instances"), name, video)
            continue
        if fmt == FRAMES_FORMAT:
            path = os.path.join(out_dir, f"{name}_frames.npz")
            arrays = {
                "event_frames": (np.concatenate(frame_chunks) if frame_chunks
                                 else np.zeros((0, height, width), np.float32)),
                "threshold": np.float64(threshold), "stack": np.int64(stack),
                "fps": np.float64(fps)}
            if labels is not None:
                arrays["instance_labels"] = instance_labels
            with open(path, "wb") as f:
                np.savez_compressed(f, **arrays)
        else:
            suffix = "_nimagenet" if fmt == "nimagenet_npz" and "npz" in formats else ""
            path = os.path.join(out_dir, f"{name}{suffix}{_EXTENSIONS[fmt]}")
            write_events(path, events, format=fmt)
        written.append(path)
    return {"video": video, "frames": num_frames, "fps": float(fps), "height": height,
            "width": width, "events": int(events.size), "instances": len(frame_chunks),
            "written": written, **summary}


def _write_instances(instance_events: Sequence[np.ndarray], instance_labels: np.ndarray,
                     folder: str, name: str, video: str) -> dict:
    """One generic-npz event file per instance, the sources of its record."""
    empty = [i for i, ev in enumerate(instance_events) if ev.size == 0]
    if empty:
        # records.item_events reads event files strictly, refusing a file with no events.
        raise ValueError(f"{video}: instance(s) {empty[:10]} hold no events (no pixel changed "
                         "by more than --threshold); a record needs at least one event, lower "
                         "--threshold or cut the still stretch")
    os.makedirs(folder, exist_ok=True)
    files = []
    for index, ev in enumerate(instance_events):
        path = os.path.join(folder, f"{name}_{index:05d}.npz")
        write_events(path, ev, format="npz")
        files.append(path)
    return {"instance_files": files, "instance_labels": instance_labels}


def convert_videos(
    videos: Sequence[str],
    out_dir: str,
    formats: Sequence[str] = ("npz", FRAMES_FORMAT),
    labels_paths: Sequence[str] | None = None,
    *,
    split: str = "test",
    image_size: int = 224,
    class_names: Sequence[str] = ("normal", "anomalous"),
    num_shards: int = 1,
    **options,
) -> tuple[list[dict], dict | None]:
    """``convert_video`` of each video (``options``: threshold, stack, fps, progress), then,
    with ``tfrecords``, one event-only record split of all their instances; returns the
    summaries and the records' manifest (None without ``tfrecords``)."""
    if not videos:
        raise ValueError("--video: expected at least one video")
    if labels_paths and len(labels_paths) != len(videos):
        raise ValueError(f"--labels: {len(labels_paths)} files for {len(videos)} videos; "
                         "expected one per --video, in the same order")
    names: dict[str, str] = {}
    for video in videos:
        if video_name(video) in names:
            raise ValueError(f"{video}: named {video_name(video)!r} like {names[video_name(video)]}"
                             "; its outputs would overwrite those (rename one)")
        names[video_name(video)] = video
    summaries = [convert_video(video, out_dir, formats,
                               labels_path=labels_paths[i] if labels_paths else None, **options)
                 for i, video in enumerate(videos)]
    if RECORDS_FORMAT not in formats:
        return summaries, None
    first = summaries[0]
    items = []
    for s in summaries:
        if (s["height"], s["width"]) != (first["height"], first["width"]):
            raise ValueError(f"{s['video']}: frames are {s['width']}x{s['height']}, "
                             f"{first['video']} {first['width']}x{first['height']}; the videos "
                             "of one record split share one frame size (the sensor size)")
        bad = sorted(set(s["instance_labels"].tolist()) - set(range(len(class_names))))
        if bad:
            raise ValueError(f"{s['video']}: instance labels {bad} do not index --class_names "
                             f"{list(class_names)}")
        items += [records.PairedItem(path, None, int(label))
                  for path, label in zip(s["instance_files"], s["instance_labels"], strict=True)]
    manifest = records.write_tfrecords(
        items, out_dir, class_names=list(class_names), out_size=image_size,
        sensor_size=(first["height"], first["width"]), num_shards=num_shards, split=split,
        progress=options.get("progress", True))
    return summaries, manifest


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    summaries, manifest = convert_videos(
        _VIDEO.value, _OUT.value, _FORMAT.value, _LABELS.value, split=_SPLIT.value,
        image_size=_IMAGE_SIZE.value, class_names=_CLASS_NAMES.value,
        num_shards=_NUM_SHARDS.value, threshold=_THRESHOLD.value, stack=_STACK.value,
        fps=_FPS.value)
    for s in summaries:
        print(f"{s['video']}: {s['frames']} frames {s['width']}x{s['height']} at {s['fps']:g} "
              f"fps -> {s['events']} events, {s['instances']} event frames (stack "
              f"{_STACK.value}, threshold {_THRESHOLD.value:g}) -> {', '.join(s['written'])}")
    if manifest is not None:
        print(f"{manifest['num_examples']} records {manifest['class_counts']} of "
              f"{manifest['class_names']} -> "
              f"{records.manifest_path(_OUT.value, manifest['split'])}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["video", "out"])
    app.run(main)
