"""The release's train-time augmentation as stateless tf ops: shift, random resized crop, flip.

METHOD.md "Event frame": a +-20 px shift (at 224 px; scaled with the frame size), a random
resized crop (scale 0.45-1, torchvision's box rule) and a horizontal flip. A transform is
drawn from a stateless seed, so it depends on nothing but the seed. It moves stacks
[N, S, S, C] and applies the same geometry to every frame and channel: an Eq. 1 frame
([1, S, S, 1]), an EventCLIP image ([1, S, S, 3]), the T EventBind frames ([T, S, S, 3]) and
the paired gray image alike. The release's time flip is left out: Eq. 1 frames sum over t,
so it changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import tensorflow as tf

RELEASE_AUGMENT = {
    "shift_px": 20,  # at 224 px
    "crop_scale": (0.45, 1.0),
    "crop_ratio": (3.0 / 4.0, 4.0 / 3.0),  # torchvision RandomResizedCrop default
    "hflip": True,
}
# What a key left out of an augment dict means: no shift, no crop, no flip.
_OFF = {"shift_px": 0, "crop_scale": None, "crop_ratio": RELEASE_AUGMENT["crop_ratio"],
        "hflip": False}
_RRC_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 boxes, then falls back


def check_augment(augment: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """None for no augmentation (None or empty), else the settings with the keys left out
    switched off. Unknown keys raise ValueError listing the keys of RELEASE_AUGMENT."""
    if augment is None or len(augment) == 0:
        return None
    unknown = sorted(set(augment.keys()) - set(RELEASE_AUGMENT))
    if unknown:
        raise ValueError(f"augment: unknown keys {unknown}; expected a subset of "
                         f"{sorted(RELEASE_AUGMENT)}")
    aug = {**_OFF, **{k: augment[k] for k in augment.keys()}}
    if aug["crop_scale"] is not None:
        lo, hi = (float(s) for s in aug["crop_scale"])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale {aug['crop_scale']}: expected 0 < lo <= hi <= 1")
    return aug


class Augment:
    """Draws and applies geometric transforms of S x S stacks [N, S, S, C]."""

    def __init__(self, augment: Mapping[str, Any], size: int) -> None:
        self.settings = check_augment(augment) or dict(_OFF)
        self.size = size
        self.margin = int(round(self.settings["shift_px"] * size / 224))

    def draw(self, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        """The parameters of one transform: shift [dy, dx], crop box, flip."""
        s, aug = self.size, self.settings
        seeds = tf.random.experimental.stateless_split(seed, 3)
        shift = tf.random.stateless_uniform([2], seeds[0], minval=-self.margin,
                                            maxval=self.margin + 1, dtype=tf.int32)
        if aug["crop_scale"] is None:
            box = tf.constant([0, 0, s, s], tf.int32)
        else:
            box = self._crop_box(seeds[1])
        flip = tf.random.stateless_uniform([], seeds[2]) < (0.5 if aug["hflip"] else 0.0)
        return {"shift": shift, "box": box, "flip": flip}

    def shift(self, x: tf.Tensor, transform: dict[str, tf.Tensor],
              fill: float = 0.0) -> tf.Tensor:
        """Translates [N, S, S, C] by (dy, dx) pixels; content leaving is lost, ``fill``
        enters (0 for counts and images, the background of EventBind frames)."""
        m = self.margin
        if m == 0:
            return x
        padded = tf.pad(x, [[0, 0], [m, m], [m, m], [0, 0]], constant_values=fill)
        shift = transform["shift"]
        return tf.slice(padded, tf.stack([0, m - shift[0], m - shift[1], 0]),
                        [-1, self.size, self.size, -1])

    def crop_flip(self, x: tf.Tensor, transform: dict[str, tf.Tensor],
                  method: str) -> tf.Tensor:
        """Crops the box out of [N, S, S, C], resizes it back to S x S (``method``: "nearest"
        for events, "bilinear" for images) and flips horizontally if drawn."""
        box = transform["box"]
        crop = tf.slice(x, tf.stack([0, box[0], box[1], 0]), tf.stack([-1, box[2], box[3], -1]))
        x = tf.image.resize(crop, [self.size, self.size], method=method)
        return tf.cond(transform["flip"], lambda: tf.reverse(x, [2]), lambda: x)

    def _crop_box(self, seed: tf.Tensor) -> tf.Tensor:
        """torchvision RandomResizedCrop box [top, left, h, w]: up to 10 tries of a random
        area fraction and log-uniform aspect ratio, else the whole (square) frame."""
        s, aug = self.size, self.settings
        lo, hi = (float(v) for v in aug["crop_scale"])
        rlo, rhi = (math.log(float(v)) for v in aug["crop_ratio"])
        u = tf.random.stateless_uniform([_RRC_ATTEMPTS, 4], seed, dtype=tf.float32)
        area = s * s * (lo + (hi - lo) * u[:, 0])
        ratio = tf.exp(rlo + (rhi - rlo) * u[:, 1])
        w = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
        h = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
        fits = (w > 0) & (h > 0) & (w <= s) & (h <= s)
        first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
        h = tf.where(fits[first], h[first], s)
        w = tf.where(fits[first], w[first], s)
        top = tf.cast(tf.floor(u[first, 2] * tf.cast(s - h + 1, tf.float32)), tf.int32)
        left = tf.cast(tf.floor(u[first, 3] * tf.cast(s - w + 1, tf.float32)), tf.int32)
        return tf.stack([tf.minimum(top, s - h), tf.minimum(left, s - w), h, w])
