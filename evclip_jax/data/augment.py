"""The release's train-time augmentation as jnp ops for the device: shift, random resized crop,
flip.

METHOD.md "Event frame": a +-20 px shift (at 224 px; scaled with the frame size), a random
resized crop (scale 0.45-1, torchvision's box rule) and a horizontal flip. A transform is
drawn from a JAX key, so it depends on nothing but the key. ``Augment.resample`` applies one
transform to one example's stack [..., S, S, C] as two gathers (rows, then columns): the
shift, the crop box, the resize back to S x S and the flip all become source indices, so the
whole geometry costs what reading the output costs. Every frame and channel of a stack gets
the same geometry: an Eq. 1 count image ([S, S, 1]), an EventCLIP image ([S, S, 3]), the T
EventBind frames ([T, S, S, 3]) and the paired gray image alike. The release's time flip is
left out: Eq. 1 frames sum over t, so it changes nothing.

Resampling follows ``tf.image.resize`` (half-pixel centres): "nearest" takes source pixel
floor((i + 0.5) * h / S), "bilinear" interpolates at (i + 0.5) * h / S - 0.5, clamped to the
crop box. Content a shift moves in from outside the frame is ``fill``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

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
METHODS = ("nearest", "bilinear")


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
    if int(aug["shift_px"]) < 0:
        raise ValueError(f"augment.shift_px {aug['shift_px']}: expected a count >= 0")
    return aug


class Augment:
    """Draws geometric transforms of S x S stacks and applies them (one example at a time;
    ``jax.vmap`` makes it a batch op)."""

    def __init__(self, augment: Mapping[str, Any], size: int) -> None:
        self.settings = check_augment(augment) or dict(_OFF)
        self.size = int(size)
        self.margin = int(round(self.settings["shift_px"] * self.size / 224))

    def draw(self, key: jax.Array) -> dict[str, jax.Array]:
        """The parameters of one transform: shift [dy, dx], crop box [top, left, h, w], flip."""
        s, aug, m = self.size, self.settings, self.margin
        k_shift, k_box, k_flip = jax.random.split(key, 3)
        shift = jax.random.randint(k_shift, (2,), -m, m + 1, jnp.int32)
        if aug["crop_scale"] is None:
            box = jnp.array([0, 0, s, s], jnp.int32)
        else:
            box = self._crop_box(k_box)
        flip = jax.random.uniform(k_flip) < (0.5 if aug["hflip"] else 0.0)
        return {"shift": shift, "box": box, "flip": flip}

    def visible(self, transform: dict[str, jax.Array]) -> jax.Array:
        """bool [S, S]: the pixels of the frame that stay inside it after the shift."""
        ar = jnp.arange(self.size)
        dy, dx = transform["shift"][0], transform["shift"][1]
        rows = (ar + dy >= 0) & (ar + dy < self.size)
        cols = (ar + dx >= 0) & (ar + dx < self.size)
        return rows[:, None] & cols[None, :]

    def resample(self, x: jax.Array, transform: dict[str, jax.Array], method: str,
                 fill: float = 0.0) -> jax.Array:
        """x [..., S, S, C] shifted by (dy, dx) (``fill`` enters), cropped to the box, resized
        back to S x S by ``method`` ("nearest": events, "bilinear": images) and flipped
        horizontally if drawn. Nearest keeps the dtype; bilinear returns float32."""
        if method not in METHODS:
            raise ValueError(f"resample method {method!r}: expected one of {METHODS}")
        s, m = self.size, self.margin
        if x.shape[-3:-1] != (s, s):
            raise ValueError(f"resample: spatial shape {x.shape[-3:-1]}; expected ({s}, {s})")
        pad = [(0, 0)] * (x.ndim - 3) + [(m, m), (m, m), (0, 0)]
        # Source index = crop coordinate - shift, + m into the padded frame (always inside it).
        padded = jnp.pad(x, pad, constant_values=jnp.asarray(fill, x.dtype)) if m else x
        top, left, h, w = (transform["box"][i] for i in range(4))
        dy, dx = transform["shift"][0], transform["shift"][1]
        row_taps = _taps(top - dy + m, h, s, method)
        col_taps = _taps(left - dx + m, w, s, method)
        col_taps = tuple(jnp.where(transform["flip"], t[::-1], t) for t in col_taps)
        if method == "nearest":
            (rows,), (cols,) = row_taps, col_taps
            return jnp.take(jnp.take(padded, rows, axis=-3), cols, axis=-2)
        r0, r1, rw = row_taps
        c0, c1, cw = col_taps
        rw, cw = rw[:, None, None], cw[:, None]
        lo = jnp.take(padded, r0, axis=-3).astype(jnp.float32)
        hi = jnp.take(padded, r1, axis=-3).astype(jnp.float32)
        rows = lo + (hi - lo) * rw
        lo, hi = jnp.take(rows, c0, axis=-2), jnp.take(rows, c1, axis=-2)
        return lo + (hi - lo) * cw

    def _crop_box(self, key: jax.Array) -> jax.Array:
        """torchvision RandomResizedCrop box [top, left, h, w]: up to 10 tries of a random
        area fraction and log-uniform aspect ratio, else the whole (square) frame."""
        s, aug = self.size, self.settings
        lo, hi = (float(v) for v in aug["crop_scale"])
        rlo, rhi = (math.log(float(v)) for v in aug["crop_ratio"])
        u = jax.random.uniform(key, (_RRC_ATTEMPTS, 4), jnp.float32)
        area = s * s * (lo + (hi - lo) * u[:, 0])
        ratio = jnp.exp(rlo + (rhi - rlo) * u[:, 1])
        w = jnp.round(jnp.sqrt(area * ratio)).astype(jnp.int32)
        h = jnp.round(jnp.sqrt(area / ratio)).astype(jnp.int32)
        fits = (w > 0) & (h > 0) & (w <= s) & (h <= s)
        first = jnp.argmax(fits)
        h = jnp.where(fits[first], h[first], s)
        w = jnp.where(fits[first], w[first], s)
        top = jnp.floor(u[first, 2] * (s - h + 1).astype(jnp.float32)).astype(jnp.int32)
        left = jnp.floor(u[first, 3] * (s - w + 1).astype(jnp.float32)).astype(jnp.int32)
        return jnp.stack([jnp.minimum(top, s - h), jnp.minimum(left, s - w), h, w])


def _taps(start: jax.Array, length: jax.Array, size: int,
          method: str) -> tuple[jax.Array, ...]:
    """Source indices (and, bilinear, the weight of the second) of ``size`` outputs resampling
    ``length`` source pixels from ``start`` on (tf.image.resize's half-pixel rule)."""
    scale = length.astype(jnp.float32) / size
    centres = jnp.arange(size, dtype=jnp.float32) + 0.5
    if method == "nearest":
        offset = jnp.minimum(jnp.floor(centres * scale).astype(jnp.int32), length - 1)
        return (start + offset,)
    pos = centres * scale - 0.5
    base = jnp.floor(pos)
    weight = pos - base
    base = base.astype(jnp.int32)
    i0 = jnp.clip(base, 0, length - 1)
    i1 = jnp.clip(base + 1, 0, length - 1)
    return start + i0, start + i1, weight
