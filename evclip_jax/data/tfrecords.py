"""Paired event/image TFRecords: the writer, the record parser, the manifest, and item builders.

One record holds one (event window, image) pair already reduced to what training reads
(contracts.md "Paired TFRecords"): the Eq. 1 clamped counts of ONE event window at
``out_size`` (uint16 PNG) and the CLIP-preprocessed grayscale image (uint8 PNG), so the
input pipeline decodes two small PNGs per example instead of reading a whole event file.

Shards are ``<out_dir>/<split>-0000k-of-0000N.tfrecord``, each a contiguous block of the
(possibly shuffled) item list; ``<out_dir>/<split>.manifest.json`` is written last, so its
presence means the shards are complete. Builders turn real dataset layouts (N-ImageNet,
N-Caltech101, N-MNIST, a CSV list) into ``PairedItem`` lists.

This module imports without TensorFlow; the writer and ``parse_example`` import it when
called (TFRecord writing needs ``tf.io.TFRecordWriter``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evclip_jax.events.frames import eval_window, event_counts, random_window
from evclip_jax.events.io import read_events

FORMAT_VERSION = 1
TRAIN_SPLIT_PREFIXES = ("train", "pretrain")
IMAGE_EXTENSIONS = (".JPEG", ".jpeg", ".jpg", ".JPG", ".png", ".PNG")

# N-ImageNet "mini" (METHOD.md "Data and splits"): the first 100 sorted WNIDs; classes 0-79
# are pre-trained on, 80-99 are the held-out zero-/few-shot evaluation classes.
NIMAGENET_MINI_CLASSES = 100
NIMAGENET_PRETRAIN_CLASSES = 80
NIMAGENET_SENSOR_SIZE = (480, 640)  # (H, W) of the 640x480 sensor
NMNIST_SENSOR_SIZE = (34, 34)

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
    if _is_url(path):
        import tensorflow as tf

        return tf.io.gfile.GFile(path, mode)
    return open(path, mode)


def _exists(path: str) -> bool:
    if _is_url(path):
        import tensorflow as tf

        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def manifest_path(data_dir: str | os.PathLike, split: str) -> str:
    """``<data_dir>/<split>.manifest.json``."""
    return os.path.join(os.fspath(data_dir), f"{split}.manifest.json")


def shard_name(split: str, index: int, num_shards: int) -> str:
    """``<split>-0000k-of-0000N.tfrecord``."""
    return f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"


def is_train_split(split: str) -> bool:
    """Training splits (``train*``, ``pretrain*``) store a seeded random window per item and
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


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a 2-D uint8 (8-bit gray) or uint16 (16-bit gray) array."""
    from PIL import Image

    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png expects a 2-D uint8/uint16 array; got {array.dtype} "
                         f"{array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def item_counts(
    item: PairedItem,
    index: int,
    *,
    split: str,
    out_size: int,
    sensor_size: tuple[int, int] | None,
    clamp: int | None,
    window_k: int | None,
    seed: int,
) -> np.ndarray:
    """The Eq. 1 counts a record stores for ``items[index]`` (uint16 [out_size, out_size]).

    Window: none if ``window_k`` is None; training splits a ``random_window`` drawn from
    ``default_rng([seed, index])`` (fixed at write time, so one record = one window); other
    splits ``eval_window(n, window_k, seed)``. ``sensor_size`` None means max coord + 1 of the
    file (N-Caltech101's rule).
    """
    ev = read_events(item.event_path)
    sensor = sensor_size
    if sensor is None:
        sensor = (int(ev["y"].max()) + 1, int(ev["x"].max()) + 1)
    window = None
    if window_k is not None:
        if is_train_split(split):
            window = random_window(len(ev), window_k, np.random.default_rng([seed, index]))
        else:
            window = eval_window(len(ev), window_k, seed)
    return event_counts(ev, sensor, out_size, clamp=clamp, window=window)


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
    progress: bool = True,
) -> dict:
    """Writes paired TFRecord shards and ``<out_dir>/<split>.manifest.json``; returns the manifest.

    Per item: the event window's Eq. 1 clamped counts at ``out_size`` (see ``item_counts``)
    and the grayscale CLIP-preprocessed image (see ``load_gray_image``), both as PNG.
    Training splits are shuffled (seeded) before sharding so that every shard, and every
    host's contiguous block of records, mixes classes; the ``key`` feature keeps the source.
    ``teacher_emb`` rows follow ``items``; ``num_shards`` is capped at ``len(items)``. Errors
    name the offending file.
    """
    import tensorflow as tf
    from tqdm import tqdm

    out_dir = os.fspath(out_dir)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1; got {num_shards}")
    if out_size < 1:
        raise ValueError(f"out_size must be positive; got {out_size}")
    has_images = _check_items(items, class_names, teacher_emb)
    num_shards = min(num_shards, len(items))
    order = np.arange(len(items))
    if is_train_split(split):
        order = np.random.default_rng([seed, 1]).permutation(len(items))
    bounds = [(k * len(items)) // num_shards for k in range(num_shards + 1)]

    if not _is_url(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    shards, shard_counts = [], []
    class_counts = [0] * len(class_names)
    with tqdm(total=len(items), desc=f"{split} records", disable=not progress) as bar:
        for k in range(num_shards):
            name = shard_name(split, k, num_shards)
            with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as writer:
                for index in order[bounds[k]:bounds[k + 1]]:
                    item = items[index]
                    writer.write(_example(tf, item, int(index), split=split, out_size=out_size,
                                          sensor_size=sensor_size, clamp=clamp,
                                          window_k=window_k, seed=seed,
                                          teacher_row=None if teacher_emb is None
                                          else teacher_emb[index]))
                    class_counts[int(item.label)] += 1
                    bar.update(1)
            shards.append(name)
            shard_counts.append(bounds[k + 1] - bounds[k])

    manifest = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "num_examples": len(items),
        "shards": shards,
        "shard_num_examples": shard_counts,
        "class_names": list(class_names),
        "num_classes": len(class_names),
        "class_counts": class_counts,
        "image_size": out_size,
        "event_counts_shape": [out_size, out_size],
        "image_shape": [out_size, out_size],
        "has_images": has_images,
        "has_captions": any(item.caption is not None for item in items),
        "teacher_emb_dim": None if teacher_emb is None else int(np.shape(teacher_emb)[1]),
        "representation": {
            "name": "eq1_counts",
            "stored": "clamped per-pixel event counts, uint16 PNG",
            "frame": "counts / (max + 1)",
            "window": ("random window of window_k events, seeded per item, fixed at write time"
                       if is_train_split(split) else "eval_window(num_events, window_k, seed)"),
        },
        "sensor_size": None if sensor_size is None else list(sensor_size),
        "clamp": clamp,
        "window_k": window_k,
        "seed": seed,
        "shuffled": is_train_split(split),
    }
    _write_json(manifest_path(out_dir, split), manifest)
    return manifest


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


def _example(tf: Any, item: PairedItem, index: int, *, split: str, out_size: int,
             sensor_size: tuple[int, int] | None, clamp: int | None, window_k: int | None,
             seed: int, teacher_row: np.ndarray | None) -> bytes:
    """One serialized tf.train.Example; errors are re-raised naming the item's files."""
    try:
        counts = item_counts(item, index, split=split, out_size=out_size,
                             sensor_size=sensor_size, clamp=clamp, window_k=window_k, seed=seed)
    except ValueError as e:  # EventFileError is a ValueError
        msg = str(e)
        if not msg.startswith(item.event_path):
            msg = f"{item.event_path}: {msg}"
        raise ValueError(msg) from e
    feature = {
        "event_counts": _bytes_feature(tf, encode_png(counts)),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(item.label)])),
        "key": _bytes_feature(tf, item.event_path.encode("utf-8")),
    }
    if item.image_path is not None:
        feature["image"] = _bytes_feature(tf, encode_png(load_gray_image(item.image_path,
                                                                         out_size)))
    if teacher_row is not None:
        feature["teacher_emb"] = tf.train.Feature(
            float_list=tf.train.FloatList(value=np.asarray(teacher_row, np.float32).tolist()))
    if item.caption is not None:
        # Raw text: tokenising needs the CLIP tokenizer, which lives with the model code.
        feature["caption"] = _bytes_feature(tf, item.caption.encode("utf-8"))
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString()


def _bytes_feature(tf: Any, value: bytes) -> Any:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


# --------------------------------------------------------------------------------------------
# Reading.


def read_manifest(data_dir: str | os.PathLike, split: str) -> dict:
    """Loads ``<data_dir>/<split>.manifest.json`` and checks it and its shards exist.

    Raises ValueError naming the path when the directory, the manifest or a shard is missing,
    or the manifest is not valid JSON / lacks required keys (an interrupted write).
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
    for name in manifest["shards"]:
        shard = os.path.join(data_dir, name)
        if not _exists(shard):
            raise ValueError(f"{shard}: shard listed in {path} is missing")
    return manifest


def parse_example(
    serialized: Any,
    out_size: int,
    with_teacher_emb_dim: int | None = None,
    *,
    has_images: bool = True,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Parses one serialized record into tensors (for ``tf.data.Dataset.map``).

    Returns "event_counts" uint16 [S, S], "image" uint8 [S, S] (zeros when ``has_images`` is
    False), "label" int32, "key" string and, with ``with_teacher_emb_dim`` D, "teacher_emb"
    float32 [D]. A record with a missing feature, PNGs of the wrong bit depth or shape, or a
    label outside [0, num_classes) raises InvalidArgumentError when the op runs.
    """
    import tensorflow as tf

    spec = {
        "event_counts": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "key": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    if has_images:
        spec["image"] = tf.io.FixedLenFeature([], tf.string)
    if with_teacher_emb_dim is not None:
        spec["teacher_emb"] = tf.io.FixedLenFeature([with_teacher_emb_dim], tf.float32)
    feats = tf.io.parse_single_example(serialized, spec)

    counts = _decode_gray_png(tf, feats["event_counts"], tf.uint16, out_size, "event_counts")
    if has_images:
        image = _decode_gray_png(tf, feats["image"], tf.uint8, out_size, "image")
    else:
        image = tf.zeros([out_size, out_size], tf.uint8)
    label = feats["label"]
    checks = [tf.debugging.assert_non_negative(label, message="label is negative")]
    if num_classes is not None:
        checks.append(tf.debugging.assert_less(
            label, tf.constant(num_classes, tf.int64), message=f"label >= {num_classes}"))
    with tf.control_dependencies(checks):
        label = tf.cast(label, tf.int32)
    out = {"event_counts": counts, "image": image, "label": label, "key": feats["key"]}
    if with_teacher_emb_dim is not None:
        out["teacher_emb"] = feats["teacher_emb"]
    return out


# PNG: 8-byte signature, then the IHDR chunk; bit depth at byte 24, colour type at byte 25.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _decode_gray_png(tf: Any, data: Any, dtype: Any, out_size: int, name: str) -> Any:
    """Decodes a 1-channel PNG of the expected bit depth, shape-checked to [S, S]."""
    depth = b"\x10" if dtype == tf.uint16 else b"\x08"
    # decode_png silently rescales 8-bit data to uint16 (and the reverse): check the header.
    checks = [
        tf.debugging.assert_equal(tf.strings.substr(data, 0, 8), _PNG_SIGNATURE,
                                  message=f"{name}: not PNG data"),
        tf.debugging.assert_equal(tf.strings.substr(data, 24, 2), depth + b"\x00",
                                  message=f"{name}: expected a {8 * dtype.size}-bit gray PNG"),
    ]
    with tf.control_dependencies(checks):
        decoded = tf.io.decode_png(data, channels=1, dtype=dtype)
    decoded = tf.ensure_shape(decoded, [out_size, out_size, 1])
    return decoded[..., 0]


# --------------------------------------------------------------------------------------------
# Builders for real dataset layouts.


def _sorted_dirs(path: str) -> list[str]:
    if not os.path.isdir(path):
        raise ValueError(f"{path}: directory not found")
    return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))


def _sorted_files(path: str, suffixes: tuple[str, ...]) -> list[str]:
    return sorted(f for f in os.listdir(path) if f.lower().endswith(suffixes)
                  and os.path.isfile(os.path.join(path, f)))


class _ImageIndex:
    """Finds ``<folder>/<stem>.<ext>`` images by listing each folder once (no stat per file)."""

    def __init__(self) -> None:
        self._folders: dict[str, dict[str, str]] = {}

    def find(self, folder: str, stem: str) -> str | None:
        if folder not in self._folders:
            found: dict[str, str] = {}
            if os.path.isdir(folder):
                # Sorted, so the first extension in IMAGE_EXTENSIONS order wins deterministically.
                for name in sorted(os.listdir(folder), key=_extension_rank):
                    base, ext = os.path.splitext(name)
                    if ext in IMAGE_EXTENSIONS:
                        found.setdefault(base, os.path.join(folder, name))
            self._folders[folder] = found
        return self._folders[folder].get(stem)


def _extension_rank(name: str) -> tuple[int, str]:
    ext = os.path.splitext(name)[1]
    return (IMAGE_EXTENSIONS.index(ext) if ext in IMAGE_EXTENSIONS else len(IMAGE_EXTENSIONS),
            name)


def _raise_missing_images(missing: list[str], image_dir: str) -> None:
    if missing:
        raise ValueError(
            f"{image_dir}: no paired image for {len(missing)} event file(s), e.g. "
            f"{missing[0]}; expected an image with the same stem (extensions "
            f"{', '.join(IMAGE_EXTENSIONS)})")


def read_synset_mapping(path: str) -> dict[str, str]:
    """WNID -> class name from a LOC_synset_mapping.txt file ("n01440764 tench, Tinca tinca")."""
    mapping = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            wnid, _, name = line.partition(" ")
            if not wnid.startswith("n") or not name:
                raise ValueError(f"{path}:{lineno}: expected '<wnid> <names>', got {line!r}")
            mapping[wnid] = name.strip()
    return mapping


def nimagenet_items(
    event_root: str,
    split: str = "train",
    image_root: str | None = None,
    *,
    subset: str = "mini",
    classes: str = "pretrain",
    synset_mapping: str | None = None,
    image_split: str | None = None,
) -> tuple[list[PairedItem], list[str]]:
    """N-ImageNet items from ``<event_root>/<split>/<wnid>/*.npz``.

    Classes: all WNIDs, sorted (from ``synset_mapping`` when given, else the class folders);
    ``subset="mini"`` keeps the first 100. ``classes`` picks "pretrain" (labels 0-79),
    "heldout" (80-99) or "all"; labels always index the returned class names (the whole subset),
    so held-out labels are 80-99. Names come from the synset mapping file, else the WNID.

    Pairing rule: ``<wnid>/<stem>.npz`` pairs with ``<image_root>/<isplit>/<wnid>/<stem>.<ext>``,
    or ``<image_root>/<isplit>/<stem>.<ext>`` (ImageNet's flat val folder), ext in
    IMAGE_EXTENSIONS; ``isplit`` is ``image_split`` (default ``split``; e.g. N-ImageNet's
    "extracted_train" events pair with ImageNet's "train"). ``image_root`` None gives
    event-only items.
    """
    split_dir = os.path.join(event_root, split)
    present = _sorted_dirs(split_dir)
    names = read_synset_mapping(synset_mapping) if synset_mapping else {}
    wnids = sorted(names) if names else present
    if subset == "mini":
        wnids = wnids[:NIMAGENET_MINI_CLASSES]
    elif subset != "full":
        raise ValueError(f"subset must be 'mini' or 'full'; got {subset!r}")
    if classes == "pretrain":
        chosen = range(min(NIMAGENET_PRETRAIN_CLASSES, len(wnids)))
    elif classes == "heldout":
        chosen = range(NIMAGENET_PRETRAIN_CLASSES, len(wnids))
    elif classes == "all":
        chosen = range(len(wnids))
    else:
        raise ValueError(f"classes must be 'pretrain', 'heldout' or 'all'; got {classes!r}")

    items, missing = [], []
    image_dir = None if image_root is None else os.path.join(image_root, image_split or split)
    images = _ImageIndex()
    for label in chosen:
        wnid = wnids[label]
        class_dir = os.path.join(split_dir, wnid)
        if not os.path.isdir(class_dir):
            raise ValueError(f"{class_dir}: class folder not found (class {label} of the "
                             f"{subset} subset)")
        for name in _sorted_files(class_dir, (".npz",)):
            event_path = os.path.join(class_dir, name)
            stem = os.path.splitext(name)[0]
            image_path = None
            if image_dir is not None:
                image_path = (images.find(os.path.join(image_dir, wnid), stem)
                              or images.find(image_dir, stem))
                if image_path is None:
                    missing.append(event_path)
            items.append(PairedItem(event_path, image_path, label))
    if image_dir is not None:
        _raise_missing_images(missing, image_dir)
    return items, [names.get(w, w) for w in wnids]


def ncaltech101_items(
    event_root: str,
    image_root: str | None = None,
    *,
    exclude_classes: Sequence[str] = (),
) -> tuple[list[PairedItem], list[str]]:
    """N-Caltech101 items from ``<event_root>/<class>/image_XXXX.bin`` (classes sorted).

    Pairing rule: ``<class>/image_XXXX.bin`` pairs with ``<image_root>/<class>/image_XXXX.jpg``
    (Caltech101's 101_ObjectCategories, same index). ``exclude_classes`` drops folders such as
    "BACKGROUND_Google".
    """
    class_names = [c for c in _sorted_dirs(event_root) if c not in set(exclude_classes)]
    items, missing = [], []
    images = _ImageIndex()
    for label, name in enumerate(class_names):
        class_dir = os.path.join(event_root, name)
        for fname in _sorted_files(class_dir, (".bin",)):
            event_path = os.path.join(class_dir, fname)
            image_path = None
            if image_root is not None:
                image_path = images.find(os.path.join(image_root, name),
                                         os.path.splitext(fname)[0])
                if image_path is None:
                    missing.append(event_path)
            items.append(PairedItem(event_path, image_path, label))
    if image_root is not None:
        _raise_missing_images(missing, image_root)
    return items, class_names


def nmnist_items(
    event_root: str,
    split: str = "Test",
    image_root: str | None = None,
) -> tuple[list[PairedItem], list[str]]:
    """N-MNIST items from ``<event_root>/<split>/<digit>/*.bin``; labels are the digits.

    Optional images pair by stem: ``<image_root>/<split>/<digit>/<stem>.<ext>``.
    """
    split_dir = os.path.join(event_root, split)
    digits = _sorted_dirs(split_dir)
    if not digits or any(not d.isdigit() for d in digits):
        raise ValueError(f"{split_dir}: expected digit folders 0-9; found {digits}")
    class_names = [str(d) for d in range(max(int(d) for d in digits) + 1)]
    items, missing = [], []
    images = _ImageIndex()
    for digit in digits:
        class_dir = os.path.join(split_dir, digit)
        for fname in _sorted_files(class_dir, (".bin",)):
            event_path = os.path.join(class_dir, fname)
            image_path = None
            if image_root is not None:
                image_path = images.find(os.path.join(image_root, split, digit),
                                         os.path.splitext(fname)[0])
                if image_path is None:
                    missing.append(event_path)
            items.append(PairedItem(event_path, image_path, int(digit)))
    if image_root is not None:
        _raise_missing_images(missing, os.path.join(image_root, split))
    return items, class_names


def list_items(
    list_file: str, class_names: Sequence[str] | None = None
) -> tuple[list[PairedItem], list[str]]:
    """Items from a CSV ``event_path,image_path,label`` (optional header; empty image -> None).

    Relative paths are taken relative to the CSV's folder. Class names default to the label
    numbers ("0", "1", ...).
    """
    base = os.path.dirname(os.path.abspath(list_file))
    items = []
    with open(list_file, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if lineno == 1 and row[-1].strip() == "label":
                continue
            if len(row) != 3:
                raise ValueError(f"{list_file}:{lineno}: expected 3 columns "
                                 f"event_path,image_path,label; got {row}")
            event_path, image_path, label = (c.strip() for c in row)
            try:
                label = int(label)
            except ValueError as e:
                raise ValueError(f"{list_file}:{lineno}: label {label!r} is not an integer") \
                    from e
            items.append(PairedItem(os.path.join(base, event_path),
                                    os.path.join(base, image_path) if image_path else None,
                                    label))
    if not items:
        raise ValueError(f"{list_file}: no rows")
    if class_names is None:
        class_names = [str(i) for i in range(max(item.label for item in items) + 1)]
    return items, list(class_names)
