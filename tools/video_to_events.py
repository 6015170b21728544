r"""Convert a video into event files and/or stacked event frames (paper Sec. 4.1, VAD).

A pixel fires where the grayscale change between consecutive frames is strictly greater than
--threshold (of 255). Event files hold one event per fired pixel and frame (timestamp of the
later frame, polarity 1 = brighter), written with ``write_events``. Event frames sum --stack
consecutive frame differences into one frame per instance, exactly as
``evclip_jax.events.synthesis.video_to_event_frames`` (instance i owns frames
i*stack+1 .. (i+1)*stack; an incomplete tail is dropped; majority-vote labels, ties to the
larger label), and are saved as ``<name>_frames.npz`` with keys event_frames (float32
[N,H,W] counts), instance_labels (int64 [N], only with --labels), threshold, stack, fps.

The video is read with OpenCV (``opencv-python-headless``) in chunks of --stack differences,
so memory stays bounded for long videos; image sequences such as ``frames/%05d.png`` work too.

  python tools/video_to_events.py --video clip.mp4 --out /tmp/ev --format npz,frames \
      --labels clip_labels.npy
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags

from evclip_jax.events.io import FORMATS, write_events
from evclip_jax.events.synthesis import majority_label, video_to_event_frames, video_to_events

FRAMES_FORMAT = "frames"
_EXTENSIONS = {"bin": ".bin", "nimagenet_npz": ".npz", "aedat2": ".aedat", "npz": ".npz",
               "h5": ".h5"}

_VIDEO = flags.DEFINE_string("video", None, "Input video (any file or pattern OpenCV reads).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_FORMAT = flags.DEFINE_list(
    "format", ["npz", FRAMES_FORMAT],
    f"Comma-separated outputs: event file formats {', '.join(FORMATS)} and/or "
    f"'{FRAMES_FORMAT}' (stacked event frames as <name>_frames.npz).")
_THRESHOLD = flags.DEFINE_float("threshold", 25, "Fire where |f_j - f_{j-1}| > threshold (0-255).")
_STACK = flags.DEFINE_integer("stack", 16, "Frame differences summed into one event frame.")
_LABELS = flags.DEFINE_string(
    "labels", None, "Optional per-frame integer labels: .npy, or text with one label per "
    "frame (whitespace or comma separated).")
_FPS = flags.DEFINE_float("fps", None, "Frame rate override (default: from the video, else 30).")


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
    """Convert one video; returns a summary dict (frames, events, instances, written paths)."""
    from tqdm import tqdm

    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f != FRAMES_FORMAT and f not in FORMATS]
    if not formats or unknown:
        raise ValueError(f"--format: unknown {unknown}; expected any of "
                         f"{', '.join(FORMATS)}, {FRAMES_FORMAT}")
    if stack < 1:
        raise ValueError(f"--stack: expected a positive integer, got {stack}")
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
    # An image-sequence pattern (frames/%05d.png) is named after its folder.
    source = os.path.dirname(os.path.abspath(video)) if "%" in video else video
    name = os.path.splitext(os.path.basename(source))[0] or "video"
    height, width = chunk[0].shape
    events = np.concatenate(event_chunks) if event_chunks else video_to_events(
        np.stack(chunk), fps, threshold)
    written = []
    for fmt in formats:
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
            "written": written}


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    s = convert_video(_VIDEO.value, _OUT.value, _FORMAT.value, _THRESHOLD.value, _STACK.value,
                      _LABELS.value, _FPS.value)
    print(f"{s['video']}: {s['frames']} frames {s['width']}x{s['height']} at {s['fps']:g} fps "
          f"-> {s['events']} events, {s['instances']} event frames (stack {_STACK.value}, "
          f"threshold {_THRESHOLD.value:g}) -> {', '.join(s['written'])}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["video", "out"])
    app.run(main)
