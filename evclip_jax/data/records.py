"""Paired event/image TFRecords: the record format, its writer and parser, and the manifest.

One record holds one (event window, image) pair already reduced to what training reads, so
the input pipeline decodes a few small buffers per example instead of a whole event file.
Record features, their encodings (png, or raw: no codec to read) and parser: ``record_codec``
(re-exported here). Event windows: the whole file if ``window_k`` is None; on training splits
(``train*``, ``pretrain*``) ``num_windows`` ``random_window`` s of ``window_k`` events drawn
one after the other from ``default_rng([seed, item index])`` (the pipeline draws one per
epoch, as the paper takes a random window each time an example is seen), else one
``eval_window(n, window_k, seed)``. Shards may be GZIP/ZLIB-compressed (``compression``).

Shards ``<out_dir>/<split>-0000k-of-0000N.tfrecord`` hold contiguous blocks of the items
(shuffled by ``default_rng([seed, 1])`` on training splits). They are written under
temporary names (``<shard>.partial``); only once every one is complete does the old manifest
go, the shards take their names and ``<split>.manifest.json`` is written, last and atomically.
So a manifest always means complete shards, and a failed (re)build leaves the previous
records and manifest as they were. Manifest keys:

* ``format_version`` 2, ``split``, ``num_examples``, ``shards`` [names relative to the
  manifest's folder; absolute paths, URLs and ``..`` are refused], ``shard_num_examples``
  [int], ``shuffled`` bool;
* ``class_names`` [str], ``num_classes``, ``class_counts`` [records per class];
* ``image_size`` S, ``image_shape`` [S, S], ``has_images``, ``has_captions``,
  ``teacher_emb_dim`` (int or null);
* ``representation``: one of ``evclip_jax.embed.REPRESENTATIONS``; ``event_shape``: one
  example's representation, evclip [S, S], eventclip [S, S, 3], eventbind [T, S, S, 3];
  ``event_feature`` ("event_counts" / "event_frames"); ``representation_options`` (the
  ``frames`` function's keyword options); evclip also ``event_counts_shape`` [S, S];
* ``window`` (the rule in words), ``window_k``, ``num_windows``, ``sensor_size`` [H, W]
  (null: each file's max coordinate + 1), ``clamp``, ``seed``;
* ``encoding`` ("png" | "raw"), ``event_dtype`` (the counts' dtype), ``compression`` (null,
  "GZIP" or "ZLIB": how the shards are compressed). Manifests without these keys are read as
  png, uint16, one window, uncompressed.

``read_manifest`` reads format-1 manifests (Eq. 1 counts only) as ``evclip``. This module
imports without TensorFlow; the writer and ``parse_example`` import it when called.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evclip_jax.data.record_codec import (
    ENCODINGS,
    EVENT_DTYPES,
    bytes_feature,
    encode_events,
    encode_image,
    event_shape,
    teacher_emb_feature,
)
from evclip_jax.data.record_codec import encode_png as encode_png  # the record format's
from evclip_jax.data.record_codec import parse_example as parse_example  # codec, here too
from evclip_jax.events import frames
from evclip_jax.events.io import read_events

FORMAT_VERSION = 2
PARTIAL_SUFFIX = ".partial"  # a shard being written
TRAIN_SPLIT_PREFIXES = ("train", "pretrain")
# Options given to the representation functions of evclip_jax.events.frames. EventBind uses
# fixed-count windows (METHOD.md "Related systems"); 1.0 is its white background.
REPRESENTATION_OPTIONS = {"evclip": {}, "eventclip": {},
                          "eventbind": {"split": "count", "background": 1.0}}
COMPRESSIONS = (None, "GZIP", "ZLIB")
# What a manifest without the newer keys means (records written before they existed).
_FORMAT_DEFAULTS = {"encoding": "png", "event_dtype": "uint16", "num_windows": 1,
                    "compression": None}

_REQUIRED_MANIFEST_KEYS = ("num_examples", "shards", "shard_num_examples", "class_names",
                           "image_size", "split")


@dataclass
class PairedItem:
    """One event file and its paired image (None for event-only evaluation sets)."""

    event_path: str  # any format read_events reads
    image_path: str | None  # any image PIL reads (RGB or gray); None -> no image
    label: int
    caption: str | None = None


# --------------------------------------------------------------------------------------------
# Paths (local or any filesystem tf.io.gfile knows, e.g. gs://).


def _is_url(path: str) -> bool:
    return "://" in path


def _open(path: str, mode: str) -> Any:
    if not _is_url(path):
        return open(path, mode)
    import tensorflow as tf

    return tf.io.gfile.GFile(path, mode)


def _exists(path: str) -> bool:
    if not _is_url(path):
        return os.path.exists(path)
    import tensorflow as tf

    return tf.io.gfile.exists(path)


def _glob(pattern: str) -> list[str]:
    if not _is_url(pattern):
        return glob.glob(pattern)
    import tensorflow as tf

    return tf.io.gfile.glob(pattern)


def _remove(path: str) -> None:
    """Removes a file if it is there."""
    if not _is_url(path):
        if os.path.exists(path):
            os.remove(path)
        return
    import tensorflow as tf

    if tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def _rename(src: str, dst: str) -> None:
    if not _is_url(src):
        os.replace(src, dst)
        return
    import tensorflow as tf

    tf.io.gfile.rename(src, dst, overwrite=True)


def manifest_path(data_dir: str | os.PathLike, split: str) -> str:
    """``<data_dir>/<split>.manifest.json``."""
    return os.path.join(os.fspath(data_dir), f"{split}.manifest.json")


def shard_name(split: str, index: int, num_shards: int) -> str:
    """``<split>-0000k-of-0000N.tfrecord``."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def window_rule(split: str) -> str:
    """The manifest's ``window``: how the split's records chose their event windows."""
    if is_train_split(split):
        return ("num_windows random windows of window_k events, seeded per item; the pipeline "
                "draws one per epoch")
    return "eval_window(num_events, window_k, seed)"


def is_train_split(split: str) -> bool:
    """Training splits (``train*``, ``pretrain*``) store seeded random windows per item and
    are shuffled at write time; other splits store ``eval_window`` and keep item order."""
    return split.startswith(TRAIN_SPLIT_PREFIXES)


# --------------------------------------------------------------------------------------------
# Per-item conversion.


def load_gray_image(path: str, out_size: int) -> np.ndarray:
    """CLIP preprocessing of a paired image in grayscale: uint8 [out_size, out_size].

    PIL "L" luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B), bicubic resize of the shorter side to
    ``out_size`` (longer side int(out_size * long / short), as torchvision's Resize), then a
    centre crop with torchvision's rounding. Raises ValueError naming the path if PIL fails.
    """
    from PIL import Image

    try:
        with _open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        img = img.convert("L")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e
    w, h = img.size
    if w <= h:
        new_w, new_h = out_size, int(out_size * h / w)
    else:
        new_w, new_h = int(out_size * w / h), out_size
    img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - out_size) / 2.0))
    left = int(round((new_w - out_size) / 2.0))
    img = img.crop((left, top, left + out_size, top + out_size))
    return np.asarray(img, dtype=np.uint8)


def item_events(item: PairedItem, index: int, *, split: str, out_size: int,
                sensor_size: tuple[int, int] | None, clamp: int | None = None,
                window_k: int | None, seed: int, representation: str = "evclip",
                num_frames: int = 3) -> np.ndarray:
    """What the record of ``items[index]`` stores for its first window (module docstring):
    ``evclip`` the clamped Eq. 1 counts (uint16 [S, S]), ``eventclip`` / ``eventbind`` the
    float32 frames. ``sensor_size`` None means max coord + 1 of the file (N-Caltech101's
    rule)."""
    return item_windows(item, index, split=split, out_size=out_size, sensor_size=sensor_size,
                        clamp=clamp, window_k=window_k, seed=seed,
                        representation=representation, num_frames=num_frames)[0]


def item_windows(item: PairedItem, index: int, *, split: str, out_size: int,
                 sensor_size: tuple[int, int] | None, clamp: int | None = None,
                 window_k: int | None, seed: int, representation: str = "evclip",
                 num_frames: int = 3, num_windows: int = 1) -> list[np.ndarray]:
    """``item_events`` of each of the record's windows: ``num_windows`` on training splits
    (the first is ``item_events``'), one on others."""
    ev = read_events(item.event_path)
    sensor = sensor_size
    if sensor is None:
        sensor = (int(ev["y"].max()) + 1, int(ev["x"].max()) + 1)
    windows = [None]
    if window_k is not None:
        if is_train_split(split):
            rng = np.random.default_rng([seed, index])
            windows = [frames.random_window(len(ev), window_k, rng) for _ in range(num_windows)]
        else:
            windows = [frames.eval_window(len(ev), window_k, seed)]
    if representation == "evclip":
        return [frames.event_counts(ev, sensor, out_size, clamp=clamp, window=w)
                for w in windows]
    make = frames.get_representation(representation)
    options = representation_options(representation, num_frames)
    return [make(ev, sensor, out_size, window=w, **options) for w in windows]


def representation_options(representation: str, num_frames: int = 3) -> dict[str, Any]:
    """Keyword options the records give the representation's ``frames`` function."""
    options = dict(REPRESENTATION_OPTIONS[representation])
    if representation == "eventbind":
        options["num_bins"] = int(num_frames)
    return options


# --------------------------------------------------------------------------------------------
# Writer.


def _check_items(items: Sequence[PairedItem], class_names: Sequence[str],
                 teacher_emb: np.ndarray | None) -> bool:
    """Validates labels, image presence and teacher embeddings; returns has_images."""
    if not items:
        raise ValueError("write_tfrecords: items is empty; expected at least one PairedItem")
    for item in items:
        if not 0 <= int(item.label) < len(class_names):
            raise ValueError(f"{item.event_path}: label {item.label} outside "
                             f"[0, {len(class_names)}) (len(class_names))")
    with_image = [item.image_path is not None for item in items]
    if any(with_image) and not all(with_image):
        missing = items[with_image.index(False)].event_path
        raise ValueError(f"{missing}: image_path is None while other items have images; "
                         "expected all items with images or none")
    if teacher_emb is not None:
        teacher_emb = np.asarray(teacher_emb)
        if teacher_emb.ndim != 2 or teacher_emb.shape[0] != len(items):
            raise ValueError(f"teacher_emb has shape {teacher_emb.shape}; expected "
                             f"[{len(items)}, D] (one row per item)")
    return all(with_image)


def write_tfrecords(
    items: list[PairedItem],
    out_dir: str | os.PathLike,
    *,
    class_names: list[str],
    out_size: int,
    sensor_size: tuple[int, int] | None = None,
    clamp: int | None = None,
    window_k: int | None = None,
    num_shards: int = 1,
    split: str = "train",
    seed: int = 0,
    teacher_emb: np.ndarray | None = None,
    representation: str = "evclip",
    num_frames: int = 3,
    encoding: str = "png",
    num_windows: int = 1,
    compression: str | None = None,
    progress: bool = True,
) -> dict:
    """Writes paired TFRecord shards and ``<out_dir>/<split>.manifest.json``; returns the manifest.

    Per item (module docstring): the event window as ``representation`` at ``out_size``
    (``item_events``; ``num_frames`` frames for eventbind; ``clamp`` is Eq. 1's, so None for
    the others) and the grayscale CLIP-preprocessed image (``load_gray_image``). Training
    splits are shuffled (seeded) before sharding so that every shard, and every host's block
    of records, mixes classes. ``teacher_emb`` rows follow ``items``; ``num_shards`` is capped
    at ``len(items)``. ``encoding`` "png" or "raw" (no image codec to read), ``num_windows``
    event windows per record of a training split (others store one), ``compression`` None,
    "GZIP" or "ZLIB" for the shards. Errors name the offending file.
    """
    import tensorflow as tf
    from tqdm import tqdm

    out_dir = os.fspath(out_dir)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}")
    if out_size < 1:
        raise ValueError(f"out_size must be positive; got {out_size}")
    shape = event_shape(representation, out_size, num_frames)
    if representation != "evclip" and clamp is not None:
        raise ValueError(f"clamp={clamp}: the count clamp is Eq. 1's (representation "
                         f"'evclip'); expected None for representation {representation!r}")
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}: expected one of {ENCODINGS}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: expected one of {COMPRESSIONS}")
    num_windows = int(num_windows) if is_train_split(split) else 1
    if num_windows < 1 or (num_windows > 1 and window_k is None):
        raise ValueError(f"num_windows={num_windows}: expected >= 1, and window_k set for more "
                         "than one (whole-file windows are all alike)")
    has_images = _check_items(items, class_names, teacher_emb)
    num_shards = min(num_shards, len(items))
    order = np.arange(len(items))
    if is_train_split(split):
        order = np.random.default_rng([seed, 1]).permutation(len(items))
    bounds = [(k * len(items)) // num_shards for k in range(num_shards + 1)]
    settings = {"split": split, "out_size": out_size, "sensor_size": sensor_size,
                "clamp": clamp, "window_k": window_k, "seed": seed,
                "representation": representation, "num_frames": num_frames,
                "num_windows": num_windows}
    event_dtype = "uint8" if encoding == "raw" and clamp is not None and clamp <= 255 \
        else "uint16"
    encode = {"encoding": encoding, "event_dtype": event_dtype}

    if not _is_url(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    for stale in _glob(os.path.join(out_dir, f"{split}-*-of-*.tfrecord{PARTIAL_SUFFIX}")):
        _remove(stale)  # left by a build that was killed
    shards, shard_counts, partial = [], [], []
    class_counts = [0] * len(class_names)
    try:
        with tqdm(total=len(items), desc=f"{split} records", disable=not progress) as bar:
            for k in range(num_shards):
                name = shard_name(split, k, num_shards)
                partial.append(os.path.join(out_dir, name + PARTIAL_SUFFIX))
                with tf.io.TFRecordWriter(partial[-1], options=compression) as writer:
                    for index in order[bounds[k]:bounds[k + 1]]:
                        item = items[index]
                        writer.write(_example(
                            tf, item, int(index), settings, encode,
                            teacher_row=None if teacher_emb is None else teacher_emb[index]))
                        class_counts[int(item.label)] += 1
                        bar.update(1)
                shards.append(name)
                shard_counts.append(bounds[k + 1] - bounds[k])
    except BaseException:  # a bad item, Ctrl-C: the previous records stay as they were
        for path in partial:
            _remove(path)
        raise

    manifest = {
        "format_version": FORMAT_VERSION, "split": split, "num_examples": len(items),
        "shards": shards, "shard_num_examples": shard_counts,
        "class_names": list(class_names), "num_classes": len(class_names),
        "class_counts": class_counts,
        "image_size": out_size, "image_shape": [out_size, out_size], "has_images": has_images,
        "has_captions": any(item.caption is not None for item in items),
        "teacher_emb_dim": None if teacher_emb is None else int(np.shape(teacher_emb)[1]),
        "representation": representation, "event_shape": shape,
        "event_feature": "event_counts" if representation == "evclip" else "event_frames",
        "representation_options": representation_options(representation, num_frames),
        "window": window_rule(split),
        "sensor_size": None if sensor_size is None else list(sensor_size), "clamp": clamp,
        "window_k": window_k, "num_windows": num_windows, "seed": seed,
        "shuffled": is_train_split(split), **encode, "compression": compression,
    }
    if representation == "evclip":
        manifest["event_counts_shape"] = [out_size, out_size]
    publish_split(out_dir, split, partial, manifest)
    return manifest


def publish_split(out_dir: str, split: str, partial: Sequence[str], manifest: dict) -> None:
    """Puts a split's complete shards, written under temporary names ``partial`` (one per
    ``manifest["shards"]`` entry, in order), in place and writes its manifest. The old
    manifest goes first, so no manifest ever sits beside shards it does not describe; the new
    one comes last, atomically."""
    _remove(manifest_path(out_dir, split))
    for path, name in zip(partial, manifest["shards"], strict=True):
        _rename(path, os.path.join(out_dir, name))
    _write_json(manifest_path(out_dir, split), manifest)


def _write_json(path: str, obj: dict) -> None:
    """Writes JSON through a temporary name so a reader never sees a partial manifest."""
    tmp = path + ".tmp"
    with _open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    if _is_url(path):
        import tensorflow as tf

        tf.io.gfile.rename(tmp, path, overwrite=True)
    else:
        os.replace(tmp, path)


def _example(tf: Any, item: PairedItem, index: int, settings: dict[str, Any],
             encode: dict[str, str], teacher_row: np.ndarray | None) -> bytes:
    """One serialized tf.train.Example; errors are re-raised naming the item's files."""
    try:
        windows = item_windows(item, index, **settings)
    except ValueError as e:  # EventFileError is a ValueError
        msg = str(e)
        if not msg.startswith(item.event_path):
            msg = f"{item.event_path}: {msg}"
        raise ValueError(msg) from e
    counts = settings["representation"] == "evclip"
    values = encode_events(windows, settings["representation"], **encode)
    feature = {
        "event_counts" if counts else "event_frames":
            tf.train.Feature(bytes_list=tf.train.BytesList(value=values)),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(item.label)])),
        "key": bytes_feature(tf, item.event_path.encode("utf-8")),
    }
    if item.image_path is not None:
        image = load_gray_image(item.image_path, settings["out_size"])
        feature["image"] = bytes_feature(tf, encode_image(image, encode["encoding"]))
    if teacher_row is not None:
        feature["teacher_emb"] = teacher_emb_feature(tf, teacher_row)
    if item.caption is not None:
        # Raw text: tokenising needs the CLIP tokenizer, which lives with the model code.
        feature["caption"] = bytes_feature(tf, item.caption.encode("utf-8"))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


# --------------------------------------------------------------------------------------------
# Reading.


def read_manifest(data_dir: str | os.PathLike, split: str) -> dict:
    """Loads ``<data_dir>/<split>.manifest.json`` and checks it and its shards exist.

    Raises ValueError naming the path when the directory, the manifest or a shard is missing,
    a shard entry leads outside the directory (absolute, URL, ``..``), or the manifest is not
    valid JSON / lacks required keys (an interrupted write) / has a representation or
    event_shape that does not fit. Format 1 is read as ``evclip``.
    """
    data_dir = os.fspath(data_dir)
    path = manifest_path(data_dir, split)
    if not _exists(data_dir):
        raise ValueError(f"{data_dir}: data directory does not exist (expected "
                         f"{split}.manifest.json and TFRecord shards in it)")
    if not _exists(path):
        raise ValueError(f"{path}: manifest not found; build the split with "
                         "tools/build_tfrecords.py (the manifest is written last, so a missing "
                         "one also means an incomplete build)")
    try:
        with _open(path, "r") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: manifest is not valid JSON ({e})") from e
    missing = [k for k in _REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: manifest lacks keys {missing}; expected the keys written by "
                         "write_tfrecords")
    if len(manifest["shards"]) != len(manifest["shard_num_examples"]) or \
            sum(manifest["shard_num_examples"]) != manifest["num_examples"]:
        raise ValueError(f"{path}: shards / shard_num_examples / num_examples disagree")
    size, name = int(manifest["image_size"]), manifest.get("representation")
    if not isinstance(name, str):  # format 1: Eq. 1 counts, "representation" a dict
        name = manifest["representation"] = "evclip"
        manifest.update(event_shape=[size, size], event_feature="event_counts")
    shape = manifest.get("event_shape") or [1]
    num_frames = max(shape[0], 1)
    if name not in frames.REPRESENTATIONS or shape != event_shape(name, size, num_frames):
        raise ValueError(f"{path}: representation {name!r} with event_shape {shape}; expected "
                         f"one of {', '.join(frames.REPRESENTATIONS)} with [S, S], [S, S, 3], "
                         f"[T, S, S, 3] respectively (S = image_size {size})")
    for key, default in _FORMAT_DEFAULTS.items():
        manifest.setdefault(key, default)
    if manifest["encoding"] not in ENCODINGS or manifest["compression"] not in COMPRESSIONS \
            or manifest["event_dtype"] not in EVENT_DTYPES \
            or not isinstance(manifest["num_windows"], int) or manifest["num_windows"] < 1:
        raise ValueError(f"{path}: encoding {manifest['encoding']!r}, compression "
                         f"{manifest['compression']!r}, event_dtype {manifest['event_dtype']!r}, "
                         f"num_windows {manifest['num_windows']!r}; expected one of {ENCODINGS}, "
                         f"one of {COMPRESSIONS}, uint8 or uint16, an int >= 1")
    for shard in manifest["shards"]:
        parts = str(shard).replace("\\", "/").split("/")
        if not isinstance(shard, str) or not shard or os.path.isabs(shard) or _is_url(shard) \
                or ".." in parts:
            raise ValueError(f"{path}: shard {shard!r} is not a file name inside {data_dir}; "
                             "expected a path relative to the manifest's folder, without '..'")
        shard = os.path.join(data_dir, shard)
        if not _exists(shard):
            raise ValueError(f"{shard}: shard listed in {path} is missing")
    return manifest
