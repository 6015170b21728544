"""A small synthetic paired event/image dataset, for demos and tests without real data.

Each class is a procedurally drawn object (a shape; beyond the eight shapes, a shape with a
striped or checkered fill). Every example draws its position, size, angle, brightness,
background gradient, a faint smooth texture and clutter (small discs) from a seeded
generator, is rendered as a
grayscale image (saved as PNG) and at the event sensor's resolution, and the sensor rendering
is moved by :func:`image_to_events` (EZSR-style random affine motion) into an event stream
written in a real event format. Each split is then packed with :func:`write_tfrecords`.

Everything derives from ``seed``: example ``i`` of class ``c`` in split ``s`` uses the
generator ``default_rng([seed, crc32(s), c, i])``, so the same seed gives byte-identical files
and a split's content does not depend on which other splits are built.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping

import numpy as np
from PIL import Image

from evclip_jax.data.records import PairedItem, event_shape, manifest_path, write_tfrecords
from evclip_jax.events.io import write_events
from evclip_jax.events.synthesis import AffineMotion, image_to_events

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "star", "crescent")
TEXTURES = ("plain", "striped", "checkered")
# Class c is SHAPES[c % 8] filled with TEXTURES[c // 8]; "plain" classes are just the shape name.
SYNTHETIC_CLASS_NAMES = tuple(
    shape if texture == "plain" else f"{texture} {shape}"
    for texture in TEXTURES for shape in SHAPES)
# Prompt suggestion, in the METHOD.md N-ImageNet style.
PROMPT_TEMPLATE = "a photo of a {label}"

# Extension written for each write_events format.
_EVENT_EXTENSIONS = {"npz": ".npz", "nimagenet_npz": ".npz", "bin": ".bin", "aedat2": ".aedat",
                     "h5": ".h5"}
_SUPERSAMPLE = 2  # anti-aliasing: render at 2x and average 2x2 blocks


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of local coordinates (u, v), in units of the object radius, in a shape."""
    r = np.hypot(u, v)
    if shape == "disc":
        return r < 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < 0.8
    if shape == "triangle":
        # Equilateral, circumradius 1, apex up: inside all three edges at distance 0.5.
        inside = np.ones(u.shape, bool)
        for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= (u * np.cos(angle) + v * np.sin(angle)) < 0.5
        return inside
    if shape == "cross":
        return (((np.abs(u) < 0.3) & (np.abs(v) < 1.0))
                | ((np.abs(v) < 0.3) & (np.abs(u) < 1.0)))
    if shape == "ring":
        return (r < 1.0) & (r > 0.55)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) < 1.0
    if shape == "star":
        phi = np.arctan2(v, u)
        return r < 0.45 + 0.55 * (0.5 + 0.5 * np.cos(5 * phi))
    if shape == "crescent":
        return (r < 1.0) & (np.hypot(u - 0.45, v) > 0.75)
    raise ValueError(f"shape: unknown shape {shape!r}, expected one of {SHAPES}")


def _texture_mask(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """Where the fill uses the second tone: stripes along u, or a checkerboard."""
    if texture == "plain":
        return np.zeros(u.shape, bool)
    if texture == "striped":
        return np.sin(2 * np.pi * u / period) > 0
    if texture == "checkered":
        return np.sin(2 * np.pi * u / period) * np.sin(2 * np.pi * v / period) > 0
    raise ValueError(f"texture: unknown texture {texture!r}, expected one of {TEXTURES}")


def _draw_scene(rng: np.random.Generator) -> dict:
    """Random scene parameters in resolution-free units (1 = the shorter image side)."""
    background = rng.uniform(0.05, 0.95)
    # Object tone at least 0.35 away from the background, so the object is always visible.
    low, high = max(background - 0.35, 0.0), min(background + 0.35, 1.0)
    room_below, room_above = low, 1.0 - high
    pick = rng.uniform(0.0, room_below + room_above)
    foreground = pick if pick < room_below else high + (pick - room_below)
    waves = rng.normal(size=(3, 2)) * 6.0  # spatial frequencies of the faint texture
    return {
        "centre": rng.uniform(-0.15, 0.15, size=2),
        "radius": rng.uniform(0.2, 0.32),
        "angle": rng.uniform(-np.pi / 12, np.pi / 12),
        "background": background,
        "foreground": foreground,
        "gradient": rng.uniform(-0.1, 0.1, size=2),
        "waves": waves,
        "wave_phase": rng.uniform(0, 2 * np.pi, size=3),
        "wave_amplitude": rng.uniform(0.0, 0.03),
        "period": rng.uniform(0.4, 0.6),
        "clutter": _draw_clutter(rng),
    }


def _draw_clutter(rng: np.random.Generator) -> np.ndarray:
    """2-4 small discs anywhere in the image: rows (x, y, radius, tone)."""
    n = int(rng.integers(2, 5))
    return np.column_stack([rng.uniform(-0.45, 0.45, size=(n, 2)),
                            rng.uniform(0.03, 0.06, size=n), rng.uniform(0.0, 1.0, size=n)])


def render_example(class_index: int, scene: dict, size: tuple[int, int]) -> np.ndarray:
    """Render a class's object with ``scene`` parameters as a float64 [H,W] image in [0,1]."""
    height, width = size
    shape = SHAPES[class_index % len(SHAPES)]
    texture = TEXTURES[class_index // len(SHAPES)]
    side = min(height, width)
    ss = _SUPERSAMPLE
    yy, xx = np.mgrid[0:height * ss, 0:width * ss].astype(np.float64)
    # Sub-pixel centres in units of the shorter side, origin at the image centre.
    x = ((xx + 0.5) / ss - width / 2) / side
    y = ((yy + 0.5) / ss - height / 2) / side
    dx = x - scene["centre"][0]
    dy = y - scene["centre"][1]
    cos, sin = np.cos(scene["angle"]), np.sin(scene["angle"])
    u = (cos * dx + sin * dy) / scene["radius"]
    v = (-sin * dx + cos * dy) / scene["radius"]

    background = (scene["background"] + scene["gradient"][0] * x + scene["gradient"][1] * y)
    foreground = np.full_like(x, scene["foreground"])
    second_tone = 0.5 * (scene["foreground"] + scene["background"])
    foreground = np.where(_texture_mask(texture, u, v, scene["period"]), second_tone, foreground)
    image = np.where(_shape_mask(shape, u, v), foreground, background)
    for cx, cy, radius, tone in scene["clutter"]:
        image = np.where(np.hypot(x - cx, y - cy) < radius, tone, image)
    for (fx, fy), phase in zip(scene["waves"], scene["wave_phase"], strict=True):
        image = image + scene["wave_amplitude"] / 3 * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    image = image.reshape(height, ss, width, ss).mean(axis=(1, 3))
    return np.clip(image, 0.0, 1.0)


def _draw_motion(rng: np.random.Generator, sensor_size: tuple[int, int]) -> AffineMotion:
    """Random affine motion with a guaranteed shift of 5-12% of the longer side (many events)."""
    side = max(sensor_size)
    direction = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.05, 0.12) * side
    return AffineMotion(tx=float(shift * np.cos(direction)), ty=float(shift * np.sin(direction)),
                        rotation_deg=float(rng.uniform(-10, 10)),
                        scale=float(rng.uniform(0.9, 1.1)))


def _split_counts(per_class: int, splits: Mapping[str, float]) -> dict[str, int]:
    """Per-class example counts of each split: largest-remainder rounding of the fractions."""
    if not splits:
        raise ValueError("splits: expected at least one split name -> fraction")
    fractions = np.array([float(f) for f in splits.values()])
    if (fractions <= 0).any() or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"splits: expected positive fractions summing to 1, got {dict(splits)}")
    exact = fractions * per_class
    counts = np.floor(exact).astype(int)
    # Stable order: ties in the remainder go to the earlier split.
    for index in np.argsort(-(exact - counts), kind="stable")[: per_class - counts.sum()]:
        counts[index] += 1
    result = dict(zip(splits, (int(c) for c in counts), strict=True))
    empty = [name for name, count in result.items() if count == 0]
    if empty:
        raise ValueError(f"splits: per_class={per_class} leaves no examples in {empty}")
    return result


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    *,
    num_classes: int = 4,
    per_class: int = 8,
    image_size: int = 32,
    sensor_size: tuple[int, int] | None = None,
    seed: int = 0,
    splits: Mapping[str, float] | None = None,
    event_format: str = "nimagenet_npz",
    num_shards: int = 1,
    num_steps: int = 10,
    duration_us: int = 100_000,
    representation: str = "evclip",
    num_frames: int = 3,
    progress: bool = False,
) -> dict[str, dict]:
    """Build the synthetic paired dataset in ``out_dir`` and return ``{split: manifest}``.

    Args:
      out_dir: output folder; gets ``events/<split>/<class>/NNNN.<ext>``,
        ``images/<split>/<class>/NNNN.png`` and, per split, the TFRecord shards and
        ``<split>.manifest.json`` from :func:`write_tfrecords`.
      num_classes: number of classes, the first entries of ``SYNTHETIC_CLASS_NAMES`` (max 24).
      per_class: examples per class over all splits.
      image_size: side of the square PNG images, also the TFRecords' ``out_size``.
      sensor_size: (H, W) of the event sensor; None means (image_size, image_size).
      seed: the only source of randomness (same seed -> byte-identical event and image files).
      splits: split name -> fraction of ``per_class``; default {"train": 0.75, "test": 0.25}.
      event_format: a ``write_events`` format: "nimagenet_npz" (default: N-ImageNet's
        ``event_data`` layout), "npz" (generic keys x, y, t, p), "bin" (N-MNIST/N-Caltech101,
        sensor up to 256x256), "aedat2" (up to 128x128) or "h5".
      num_shards: TFRecord shards per split.
      num_steps, duration_us: motion steps and length passed to :func:`image_to_events`.
      representation, num_frames: the event representation the records store ("evclip",
        "eventclip" or "eventbind" with ``num_frames`` frames), see :func:`write_tfrecords`.
      progress: show the TFRecord writer's progress bar.
    """
    if not 1 <= num_classes <= len(SYNTHETIC_CLASS_NAMES):
        raise ValueError(f"num_classes: expected 1..{len(SYNTHETIC_CLASS_NAMES)}, "
                         f"got {num_classes}")
    if per_class < 1:
        raise ValueError(f"per_class: expected a positive integer, got {per_class}")
    if image_size < 2:
        raise ValueError(f"image_size: expected at least 2, got {image_size}")
    event_shape(representation, image_size, num_frames)  # names an unknown representation
    if event_format not in _EVENT_EXTENSIONS:
        raise ValueError(f"event_format: expected one of {sorted(_EVENT_EXTENSIONS)}, "
                         f"got {event_format!r}")
    sensor = (image_size, image_size) if sensor_size is None else tuple(int(s) for s in sensor_size)
    if len(sensor) != 2 or min(sensor) < 2:
        raise ValueError(f"sensor_size: expected (H, W) with both >= 2, got {sensor_size}")
    counts = _split_counts(per_class, {"train": 0.75, "test": 0.25} if splits is None else splits)
    class_names = list(SYNTHETIC_CLASS_NAMES[:num_classes])
    extension = _EVENT_EXTENSIONS[event_format]
    out_dir = os.fspath(out_dir)

    manifests = {}
    for split, count in counts.items():
        split_key = zlib.crc32(split.encode("utf-8"))
        items = []
        # Example-major order, so every shard holds every class.
        for index in range(count):
            for class_index, name in enumerate(class_names):
                rng = np.random.default_rng([seed, split_key, class_index, index])
                scene = _draw_scene(rng)
                motion = _draw_motion(rng, sensor)
                image = render_example(class_index, scene, (image_size, image_size))
                sensor_image = render_example(class_index, scene, sensor)
                events = image_to_events(sensor_image, rng, num_steps=num_steps,
                                         duration_us=duration_us, motion=motion)

                class_dir = f"{class_index:02d}_{name.replace(' ', '_')}"
                event_path = os.path.join(out_dir, "events", split, class_dir,
                                          f"{index:04d}{extension}")
                image_path = os.path.join(out_dir, "images", split, class_dir, f"{index:04d}.png")
                os.makedirs(os.path.dirname(event_path), exist_ok=True)
                os.makedirs(os.path.dirname(image_path), exist_ok=True)
                write_events(event_path, events, format=event_format)
                Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(image_path)
                items.append(PairedItem(event_path=event_path, image_path=image_path,
                                        label=class_index))

        manifest = write_tfrecords(items, out_dir, class_names=class_names, out_size=image_size,
                                   sensor_size=sensor, num_shards=num_shards, split=split,
                                   seed=seed, representation=representation,
                                   num_frames=num_frames, progress=progress)
        manifest = dict(manifest)
        manifest["prompt_template"] = PROMPT_TEMPLATE
        manifest["synthetic"] = {
            "seed": seed, "per_class_in_split": count, "event_format": event_format,
            "num_steps": num_steps, "duration_us": duration_us,
            "event_files": [item.event_path for item in items],
            "image_files": [item.image_path for item in items],
            "labels": [item.label for item in items],
        }
        # Re-written with the extra keys, through a temporary name like the writer does.
        path = manifest_path(out_dir, split)
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(path + ".tmp", path)
        manifests[split] = manifest
    return manifests


def make_closed_world(
    out_dir: str | os.PathLike,
    *,
    num_classes: int = 12,
    unseen_classes: tuple[int, ...] = (2, 5, 8, 11),
    per_class: int = 40,
    test_fraction: float = 0.25,
    image_size: int = 32,
    seed: int = 0,
    representation: str = "evclip",
    num_frames: int = 3,
) -> dict[str, dict]:
    """The closed world of METHOD.md: the synthetic set with seen and unseen classes.

    Splits (instances split by ``test_fraction``, so no test image or its events is trained
    on): ``train`` (every class: the teacher's images), ``train_seen`` (the seen classes'
    ``train`` instances: the event tower's pairs), ``test`` (held-out instances of every
    class) and ``unseen`` (every instance of the unseen classes). Returns {split: manifest}.
    """
    unseen = sorted({int(c) for c in unseen_classes})
    if not unseen or unseen[0] < 0 or unseen[-1] >= num_classes or len(unseen) >= num_classes:
        raise ValueError(f"unseen_classes={tuple(unseen_classes)}: expected some, not all, of "
                         f"the class ids 0..{num_classes - 1}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction}: expected a fraction in (0, 1)")
    manifests = make_synthetic_dataset(
        out_dir, num_classes=num_classes, per_class=per_class, image_size=image_size,
        seed=seed, splits={"train": 1 - test_fraction, "test": test_fraction},
        representation=representation, num_frames=num_frames)
    class_names = manifests["train"]["class_names"]

    def items(split: str, keep) -> list[PairedItem]:
        syn = manifests[split]["synthetic"]
        return [PairedItem(event_path=e, image_path=i, label=label) for e, i, label in
                zip(syn["event_files"], syn["image_files"], syn["labels"], strict=True)
                if keep(label)]

    derived = {"train_seen": items("train", lambda c: c not in unseen),
               "unseen": items("train", lambda c: c in unseen)
               + items("test", lambda c: c in unseen)}
    for split, split_items in derived.items():
        manifests[split] = write_tfrecords(
            split_items, out_dir, class_names=class_names, out_size=image_size,
            sensor_size=(image_size, image_size), split=split, seed=seed,
            representation=representation, num_frames=num_frames, progress=False)
    return manifests
