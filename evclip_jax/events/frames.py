"""Event windows -> frames: the paper's Eq. 1 count frame, its tf version, and alternatives.

Eq. 1 (Jeong et al., METHOD.md "Event frame"): counts E(x, y) of the events in a window,
summed over t and p, with coordinates scaled from the sensor to the output size *before*
counting (xo = floor(x * out_w / W), yo = floor(y * out_h / H)), optionally clamped, then
E / (max E + 1), a float32 frame in [0, 1). Two alternative representations from related
work (EventCLIP, EventBind/E-CLIP) are selectable by name through ``REPRESENTATIONS``, whose
names are ``evclip_jax.embed.REPRESENTATIONS``; ``embed.events_to_tower_input`` maps each to
the event tower's input.

This module imports without TensorFlow; the ``*_tf`` functions import it when called.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

Size = int | tuple[int, int]
Window = tuple[int, int] | None

_UINT16_MAX = np.iinfo(np.uint16).max


# --------------------------------------------------------------------------------------------
# Argument checks and coordinate scaling.


def _pair(size: Size, name: str) -> tuple[int, int]:
    """(h, w) from an int or a pair; both positive."""
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be an int or an (H, W) pair; got {size!r}") from e
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive; got {size!r}")
    return h, w


def _slice_window(ev: np.ndarray, window: Window, needed: tuple[str, ...]) -> np.ndarray:
    """Checks ``ev`` and returns ``ev[start:stop]``; raises on bad bounds or an empty window."""
    names = getattr(getattr(ev, "dtype", None), "names", None)
    if names is None or any(k not in names for k in needed):
        raise ValueError(f"events must be a structured array with fields {', '.join(needed)}; "
                         f"got {getattr(ev, 'dtype', type(ev))}")
    if ev.ndim != 1:
        raise ValueError(f"events must be 1-D; got shape {ev.shape}")
    if window is not None:
        start, stop = (int(w) for w in window)
        if not 0 <= start <= stop <= len(ev):
            raise ValueError(f"window {tuple(window)} is outside the event array of length "
                             f"{len(ev)}; expected 0 <= start <= stop <= {len(ev)}")
        ev = ev[start:stop]
    if len(ev) == 0:
        raise ValueError(f"empty event window (window={window}, {len(ev)} events); expected at "
                         "least one event")
    return ev


@functools.lru_cache(maxsize=64)
def _scale_table(sensor_len: int, out_len: int, stride: int = 1) -> np.ndarray:
    """floor(c * out_len / sensor_len) * stride for every sensor coordinate c (integer maths).

    int32 keeps the gathers and the flat-index sum cheap; stride folds the row offset in.
    """
    table = (np.arange(sensor_len, dtype=np.int64) * out_len) // sensor_len * stride
    dtype = np.int32 if out_len * stride <= np.iinfo(np.int32).max else np.int64
    table = table.astype(dtype)
    table.flags.writeable = False
    return table


def _coordinate_error(x: np.ndarray, y: np.ndarray, height: int, width: int) -> ValueError:
    xmax, ymax, xmin, ymin = int(x.max()), int(y.max()), int(x.min()), int(y.min())
    return ValueError(
        f"event coordinates outside the sensor: max x = {xmax}, max y = {ymax} (min x = "
        f"{xmin}, min y = {ymin}); expected 0 <= x < {width} and 0 <= y < {height} for "
        f"sensor_size (H, W) = ({height}, {width})")


def _flat_pixels(
    x: np.ndarray, y: np.ndarray, sensor_size: Size, out_size: Size
) -> tuple[np.ndarray, int, int]:
    """Flat output-pixel index yo * out_w + xo of every event (Eq. 1 scaling).

    Raises ValueError naming the max coordinate when an event lies outside the sensor.
    """
    height, width = _pair(sensor_size, "sensor_size")
    out_h, out_w = _pair(out_size, "out_size")
    if x.dtype.kind not in "iu" or y.dtype.kind not in "iu":
        raise ValueError(f"event coordinates must be integers; got x {x.dtype}, y {y.dtype}")
    # take(mode="raise") rejects indices >= the table length, i.e. coordinates off the sensor;
    # negative ones it would wrap, so signed inputs get an explicit check.
    if (x.dtype.kind != "u" and x.min() < 0) or (y.dtype.kind != "u" and y.min() < 0):
        raise _coordinate_error(x, y, height, width)
    try:
        flat = _scale_table(height, out_h, out_w).take(y)
        flat += _scale_table(width, out_w).take(x)
    except IndexError:
        raise _coordinate_error(x, y, height, width) from None
    return flat, out_h, out_w


def _counts(ev: np.ndarray, sensor_size: Size, out_size: Size, clamp: int | None) -> np.ndarray:
    """Eq. 1 counts, int64 [out_h, out_w], optionally clamped."""
    if clamp is not None and clamp < 1:
        raise ValueError(f"clamp must be a positive count or None; got {clamp}")
    flat, out_h, out_w = _flat_pixels(ev["x"], ev["y"], sensor_size, out_size)
    counts = np.bincount(flat, minlength=out_h * out_w).reshape(out_h, out_w)
    if clamp is not None:
        np.minimum(counts, int(clamp), out=counts)
    return counts


# --------------------------------------------------------------------------------------------
# Eq. 1 (NumPy).


def event_counts(
    ev: np.ndarray,
    sensor_size: Size,
    out_size: Size = 224,
    clamp: int | None = None,
    window: Window = None,
) -> np.ndarray:
    """Eq. 1 per-pixel event counts (summed over t and p), clamped, as uint16 [out, out].

    This is what the paired TFRecords store; the frame is ``counts / (counts.max() + 1)``.
    Raises ValueError if a count exceeds the uint16 range (pass a ``clamp``).
    """
    ev = _slice_window(ev, window, ("x", "y"))
    counts = _counts(ev, sensor_size, out_size, clamp)
    cmax = int(counts.max())
    if cmax > _UINT16_MAX:
        raise ValueError(f"a pixel holds {cmax} events, more than uint16 can store; "
                         f"pass clamp <= {_UINT16_MAX}")
    return counts.astype(np.uint16)


def counts_to_frame(counts: np.ndarray) -> np.ndarray:
    """Eq. 1 normalisation: counts / (max + 1), float32 in [0, 1)."""
    counts = np.asarray(counts)
    frame = counts.astype(np.float32)
    frame /= np.float32(int(counts.max()) + 1)
    return frame


def event_frame(
    ev: np.ndarray,
    sensor_size: Size,
    out_size: Size = 224,
    clamp: int | None = None,
    window: Window = None,
) -> np.ndarray:
    """Paper Eq. 1 event frame: float32 [out, out] in [0, 1).

    Args:
      ev: structured event array (fields x, y; t and p are summed over).
      sensor_size: (H, W) of the sensor; coordinates must lie inside it.
      out_size: output side (or (h, w)); coordinates are scaled to it before counting.
      clamp: optional maximum count per pixel (N-Caltech101 20, N-MNIST 10, N-ImageNet None).
      window: optional (start, stop) slice of ``ev`` (K consecutive events).
    """
    ev = _slice_window(ev, window, ("x", "y"))
    return counts_to_frame(_counts(ev, sensor_size, out_size, clamp))


# --------------------------------------------------------------------------------------------
# Windows.


def random_window(num_events: int, k: int, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly placed window of ``k`` consecutive events (the whole stream if shorter)."""
    num_events, k = int(num_events), int(k)
    if num_events <= 0:
        raise ValueError(f"num_events must be positive; got {num_events}")
    if k <= 0:
        raise ValueError(f"window length k must be positive; got {k}")
    if num_events <= k:
        return 0, num_events
    start = int(rng.integers(0, num_events - k + 1))
    return start, start + k


def eval_window(num_events: int, k: int, seed: int) -> tuple[int, int]:
    """The fixed evaluation window: ``random_window`` drawn from ``default_rng(seed)``.

    Deterministic per (num_events, k, seed); pass a per-file seed for per-file windows.
    """
    return random_window(num_events, k, np.random.default_rng(seed))


# --------------------------------------------------------------------------------------------
# Eq. 1 (TensorFlow, for tf.data).


def _counts_tf(x: Any, y: Any, sensor_size: Size, out_size: Size, clamp: int | None) -> Any:
    import tensorflow as tf

    height, width = _pair(sensor_size, "sensor_size")
    out_h, out_w = _pair(out_size, "out_size")
    if clamp is not None and clamp < 1:
        raise ValueError(f"clamp must be a positive count or None; got {clamp}")
    x = tf.cast(tf.convert_to_tensor(x), tf.int64)
    y = tf.cast(tf.convert_to_tensor(y), tf.int64)
    checks = [
        tf.debugging.assert_positive(tf.size(x), message="empty event window"),
        tf.debugging.assert_equal(tf.size(x), tf.size(y), message="x and y lengths differ"),
        tf.debugging.assert_non_negative(x, message="negative x coordinate"),
        tf.debugging.assert_non_negative(y, message="negative y coordinate"),
        tf.debugging.assert_less(x, tf.constant(width, tf.int64),
                                 message=f"x coordinate outside sensor width {width}"),
        tf.debugging.assert_less(y, tf.constant(height, tf.int64),
                                 message=f"y coordinate outside sensor height {height}"),
    ]
    with tf.control_dependencies(checks):
        # Same integer floor as the NumPy tables: floor(c * out / sensor).
        xo = (x * out_w) // width
        yo = (y * out_h) // height
        flat = tf.cast(yo * out_w + xo, tf.int32)
    counts = tf.math.bincount(flat, minlength=out_h * out_w, maxlength=out_h * out_w,
                              dtype=tf.int32)
    counts = tf.reshape(counts, [out_h, out_w])
    if clamp is not None:
        counts = tf.minimum(counts, int(clamp))
    return counts


def event_counts_tf(
    x: Any, y: Any, sensor_size: Size, out_size: Size, clamp: int | None = None
) -> Any:
    """TensorFlow ``event_counts`` on coordinate tensors x, y (the window already sliced).

    Returns a uint16 tensor [out, out]; usable inside ``tf.data.Dataset.map``.
    """
    import tensorflow as tf

    counts = _counts_tf(x, y, sensor_size, out_size, clamp)
    check = tf.debugging.assert_less_equal(
        tf.reduce_max(counts), _UINT16_MAX,
        message="a pixel count exceeds the uint16 range; pass clamp")
    with tf.control_dependencies([check]):
        return tf.cast(counts, tf.uint16)


def event_frame_tf(
    x: Any, y: Any, sensor_size: Size, out_size: Size, clamp: int | None = None
) -> Any:
    """TensorFlow ``event_frame`` (Eq. 1) on coordinate tensors: float32 [out, out] in [0, 1)."""
    return counts_to_frame_tf(_counts_tf(x, y, sensor_size, out_size, clamp))


def counts_to_frame_tf(counts: Any) -> Any:
    """TensorFlow ``counts_to_frame``: counts (any numeric dtype) / (max + 1), float32."""
    import tensorflow as tf

    counts = tf.cast(counts, tf.float32)  # exact for counts below 2**24
    return counts / (tf.reduce_max(counts) + 1.0)


# --------------------------------------------------------------------------------------------
# Alternative representations.


def eventclip_frame(
    ev: np.ndarray,
    sensor_size: Size,
    out_size: Size = 224,
    window: Window = None,
    hot_pixel_k: float = 10.0,
    nonzero_stats: bool = False,
    style: str = "channels",
) -> np.ndarray:
    """EventCLIP (Wu et al.) polarity histogram: float32 [out, out, 3] in [0, 1].

    Per-polarity counts (channel 0 ON, channel 1 OFF) after the same coordinate scaling as
    Eq. 1. Hot pixels -- histogram entries above mean + ``hot_pixel_k`` * std (EventCLIP's
    rule and default k = 10; stats over all entries, or only non-zero ones with
    ``nonzero_stats``; k <= 0 disables) -- are zeroed, then the histogram is divided by its max.
    ``style="channels"`` (default) returns [ON, OFF, zeros]: the third channel is zero so the
    two count channels stay unmixed. ``style="rgb"`` follows the EventCLIP release instead:
    ON red, OFF blue, alpha-blended onto a white background by the normalised total count.
    """
    if style not in ("channels", "rgb"):
        raise ValueError(f"eventclip style must be 'channels' or 'rgb'; got {style!r}")
    ev = _slice_window(ev, window, ("x", "y", "p"))
    pix, out_h, out_w = _flat_pixels(ev["x"], ev["y"], sensor_size, out_size)
    npix = out_h * out_w
    # Channel-last flat index: (pixel, polarity) with polarity 0 = ON, 1 = OFF.
    flat = pix.astype(np.int64) * 2 + (ev["p"] <= 0)
    hist = np.bincount(flat, minlength=2 * npix).reshape(out_h, out_w, 2).astype(np.float64)
    if hot_pixel_k > 0:
        stats = hist[hist > 0] if nonzero_stats else hist
        hist[hist > stats.mean() + hot_pixel_k * stats.std()] = 0.0
    hmax = hist.max()
    if hmax > 0:
        hist /= hmax
    if style == "channels":
        out = np.concatenate([hist, np.zeros((out_h, out_w, 1))], axis=-1)
    else:
        red = np.array([1.0, 0.0, 0.0])
        blue = np.array([0.0, 0.0, 1.0])
        colour = hist[..., :1] * red + hist[..., 1:] * blue
        alpha = np.clip(hist.sum(-1, keepdims=True), 0.0, 1.0)
        out = colour * alpha + (1.0 - alpha)
    return out.astype(np.float32)


def eventbind_frames(
    ev: np.ndarray,
    sensor_size: Size,
    out_size: Size = 224,
    window: Window = None,
    num_bins: int = 3,
    background: float = 1.0,
    split: str = "time",
) -> np.ndarray:
    """EventBind / E-CLIP style: ``num_bins`` polarity-coloured frames, float32 [n, out, out, 3].

    The window is split into temporal bins (``split="time"``: equal durations between the
    first and last timestamp; ``"count"``: equal event counts). In each bin a pixel that saw
    events takes the colour of its latest event -- ON red (1, 0, 0), OFF blue (0, 0, 1) --
    and every other pixel the grey level ``background`` (1.0 white, 0.5 grey).
    Coordinates are scaled to ``out_size`` as in Eq. 1.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be >= 1; got {num_bins}")
    if split not in ("time", "count"):
        raise ValueError(f"split must be 'time' or 'count'; got {split!r}")
    ev = _slice_window(ev, window, ("x", "y", "t", "p"))
    pix, out_h, out_w = _flat_pixels(ev["x"], ev["y"], sensor_size, out_size)
    n = len(ev)
    if split == "time":
        t = ev["t"].astype(np.int64)
        t0 = t.min()
        span = int(t.max() - t0) + 1
        bins = ((t - t0) * num_bins) // span
    else:
        bins = (np.arange(n, dtype=np.int64) * num_bins) // n
    npix = out_h * out_w
    key = bins * npix + pix
    # Index of the latest event per (bin, pixel); -1 where none fired.
    latest = np.full(num_bins * npix, -1, dtype=np.int64)
    np.maximum.at(latest, key, np.arange(n, dtype=np.int64))
    out = np.full((num_bins * npix, 3), background, dtype=np.float32)
    fired = latest >= 0
    on = np.zeros_like(fired)
    on[fired] = ev["p"][latest[fired]] > 0
    out[on] = (1.0, 0.0, 0.0)
    out[fired & ~on] = (0.0, 0.0, 1.0)
    return out.reshape(num_bins, out_h, out_w, 3)


class _Registry(dict):
    """A name -> function dict whose unknown names raise ValueError listing the valid ones."""

    def __missing__(self, name: str) -> Callable[..., np.ndarray]:
        raise ValueError(f"unknown event representation {name!r}; expected one of "
                         f"{', '.join(sorted(self))}")


REPRESENTATIONS: dict[str, Callable[..., np.ndarray]] = _Registry(
    evclip=event_frame,  # paper Eq. 1, [out, out]
    eventclip=eventclip_frame,  # EventCLIP polarity histogram, [out, out, 3]
    eventbind=eventbind_frames,  # EventBind / E-CLIP temporal colour frames, [n, out, out, 3]
)


def get_representation(name: str) -> Callable[..., np.ndarray]:
    """The representation function registered as ``name`` (ValueError listing names if unknown).

    Every function takes ``(ev, sensor_size, out_size=224, window=None, **options)``.
    """
    return REPRESENTATIONS[name]
