"""Events from frames: video frame differencing (paper Sec. 4.1) and moved still images (EZSR).

Two synthesis routes, both NumPy-vectorised over pixels (the only Python loops run over the
few time steps):

- Video (paper Sec. 4.1, video anomaly detection): a pixel fires where the grayscale change
  between consecutive frames is strictly greater than ``threshold`` (of 255); ``stack``
  consecutive frame differences are summed into one event frame (one "instance"), whose label
  is the majority vote of its frames' labels.
- Still image (EZSR): a random affine motion (translation, rotation, scale) of the image is
  interpolated linearly over a few steps, and an event-camera model with per-pixel log-intensity
  reference memory turns the rendered frames into an event stream.

Instance cutting rule used by :func:`video_to_event_frames` (and by ``tools/video_to_events.py``):
frame ``j >= 1`` contributes the difference ``d_j = f_j - f_{j-1}``; frame 0 is only the first
reference. The ``T - 1`` differences ``d_1 .. d_{T-1}`` are grouped into consecutive,
non-overlapping blocks of ``stack``; instance ``i`` sums ``d_{i*stack+1} .. d_{(i+1)*stack}``,
i.e. it owns frames ``i*stack+1 .. (i+1)*stack`` (and reads frame ``i*stack`` as reference).
An incomplete tail block (fewer than ``stack`` differences) is dropped, so there are
``(T - 1) // stack`` instances. The instance label is the most frequent label among the
``stack`` frames it owns; ties go to the largest tied label (for 0/1 anomaly labels: anomalous).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from evclip_jax.events.io import EVENT_DTYPE

# ITU-R BT.601 luma weights, the same as PIL "L" and OpenCV RGB2GRAY.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
_MAX_COORD = np.iinfo(np.uint16).max


def _as_gray_video(frames: np.ndarray) -> np.ndarray:
    """Validate a uint8 video [T,H,W] or [T,H,W,3] (RGB) and return luma uint8 [T,H,W]."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames: expected dtype uint8 (0..255), got {frames.dtype}")
    if frames.ndim == 4 and frames.shape[-1] == 3:
        luma = frames.astype(np.float64) @ _LUMA_WEIGHTS
        frames = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    if frames.ndim != 3:
        raise ValueError(f"frames: expected shape [T,H,W] or [T,H,W,3], got {frames.shape}")
    if frames.shape[1] > _MAX_COORD + 1 or frames.shape[2] > _MAX_COORD + 1:
        raise ValueError(f"frames: height/width must fit uint16 coordinates, got {frames.shape}")
    return frames


def _fired(frames: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Frame differences d_j = f_j - f_{j-1} (int16 [T-1,H,W]) and where |d_j| > threshold."""
    diff = np.diff(frames.astype(np.int16), axis=0)
    return diff, np.abs(diff) > threshold


def majority_label(labels: np.ndarray) -> int:
    """Most frequent label; ties go to the largest tied label (0/1 anomaly labels: anomalous)."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    # np.unique sorts ascending, so the last maximum is the largest tied label.
    return int(values[np.flatnonzero(counts == counts.max())[-1]])


def video_to_event_frames(
    frames: np.ndarray,
    labels: np.ndarray | None = None,
    threshold: float = 25,
    stack: int = 16,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stacked frame-difference event frames and majority-vote labels (paper Sec. 4.1).

    Args:
      frames: uint8 video, grayscale [T,H,W] or RGB [T,H,W,3] (converted to BT.601 luma).
      labels: optional per-frame integer labels [T] (e.g. 0 normal, 1 anomalous).
      threshold: a pixel fires where |f_j - f_{j-1}| > threshold (strictly greater; of 255).
      stack: number of consecutive frame differences summed into one event frame.

    Returns:
      ``(event_frames, instance_labels)``: float32 counts [(T-1)//stack, H, W] (each pixel
      counts how many of the instance's ``stack`` differences fired, polarity ignored), and
      int64 labels [(T-1)//stack] or None when ``labels`` is None. See the module docstring
      for the exact cutting and tie rules; a video shorter than ``stack + 1`` frames gives
      zero instances.
    """
    frames = _as_gray_video(frames)
    if stack < 1:
        raise ValueError(f"stack: expected a positive integer, got {stack}")
    num_frames, height, width = frames.shape
    num_instances = max(num_frames - 1, 0) // stack
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (num_frames,):
            raise ValueError(f"labels: expected shape ({num_frames},) (one per frame), "
                             f"got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels: expected integer labels, got dtype {labels.dtype}")

    used = frames[: num_instances * stack + 1]
    if num_instances == 0:
        event_frames = np.zeros((0, height, width), np.float32)
    else:
        _, fired = _fired(used, threshold)
        event_frames = fired.reshape(num_instances, stack, height, width).sum(
            axis=1, dtype=np.int32).astype(np.float32)
    if labels is None:
        return event_frames, None
    owned = labels[1: num_instances * stack + 1].reshape(num_instances, stack)
    instance_labels = np.array([majority_label(row) for row in owned], np.int64)
    return event_frames, instance_labels


def video_to_events(
    frames: np.ndarray,
    fps: float,
    threshold: float = 25,
    start_index: int = 0,
) -> np.ndarray:
    """Per-pixel events from frame differencing, so a video can be written as an event file.

    The difference ``d_j = f_j - f_{j-1}`` fires one event per pixel where ``|d_j| > threshold``,
    stamped at frame ``j``'s time ``round((start_index + j) / fps * 1e6)`` microseconds, with
    polarity 1 where the pixel got brighter and 0 where it got darker. Events are sorted by
    time, then row (y), then column (x). ``start_index`` is the index of ``frames[0]`` in the
    whole video, so a long video can be processed in chunks that overlap by one frame.
    """
    frames = _as_gray_video(frames)
    if not fps > 0:
        raise ValueError(f"fps: expected a positive frame rate, got {fps}")
    if frames.shape[0] < 2:
        return np.zeros(0, EVENT_DTYPE)
    diff, fired = _fired(frames, threshold)
    k, y, x = np.nonzero(fired)  # C order: sorted by (k, y, x)
    ev = np.empty(k.size, EVENT_DTYPE)
    ev["x"] = x
    ev["y"] = y
    ev["t"] = np.rint((start_index + k + 1) * (1e6 / fps)).astype(np.int64)
    ev["p"] = diff[k, y, x] > 0
    return ev


@dataclasses.dataclass(frozen=True)
class AffineMotion:
    """Full affine motion reached at the last step, about the image centre.

    The content moves by (tx, ty) pixels (+x right, +y down), rotates by ``rotation_deg``
    (counter-clockwise as displayed, i.e. with y pointing down) and scales by ``scale``.
    """

    tx: float = 0.0
    ty: float = 0.0
    rotation_deg: float = 0.0
    scale: float = 1.0


def sample_affine_motion(
    rng: np.random.Generator,
    image_shape: tuple[int, int],
    max_translation: float = 0.1,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> AffineMotion:
    """Draw a uniform random motion; ``max_translation`` is a fraction of the longer image side."""
    max_shift = max_translation * max(image_shape)
    tx, ty = rng.uniform(-max_shift, max_shift, size=2)
    rotation = rng.uniform(-max_rotation_deg, max_rotation_deg)
    scale = rng.uniform(scale_range[0], scale_range[1])
    return AffineMotion(float(tx), float(ty), float(rotation), float(scale))


def warp_affine(image: np.ndarray, motion: AffineMotion, amount: float = 1.0) -> np.ndarray:
    """Bilinear warp of ``image`` [H,W] by ``amount`` (0..1) of ``motion``; edges replicate.

    The parameters are interpolated linearly (translation, angle and scale each times
    ``amount``), and every output pixel samples the input at the inverse-mapped position.
    """
    height, width = image.shape
    theta = np.deg2rad(amount * motion.rotation_deg)
    scale = 1.0 + amount * (motion.scale - 1.0)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    # Inverse map: undo translation, then rotation and scale about the centre.
    dx = xx - cx - amount * motion.tx
    dy = yy - cy - amount * motion.ty
    cos, sin = np.cos(theta), np.sin(theta)
    # Rotation by -theta in image coordinates (y down): counter-clockwise as displayed.
    src_x = cx + (cos * dx - sin * dy) / scale
    src_y = cy + (sin * dx + cos * dy) / scale
    src_x = np.clip(src_x, 0.0, width - 1.0)
    src_y = np.clip(src_y, 0.0, height - 1.0)
    # Lower corner kept one pixel inside so x1 = x0 + 1 exists (weight 1 at the last column).
    x0 = np.clip(np.floor(src_x).astype(np.int64), 0, max(width - 2, 0))
    y0 = np.clip(np.floor(src_y).astype(np.int64), 0, max(height - 2, 0))
    x1 = np.minimum(x0 + 1, width - 1)
    y1 = np.minimum(y0 + 1, height - 1)
    wx = src_x - x0
    wy = src_y - y0
    top = image[y0, x0] * (1.0 - wx) + image[y0, x1] * wx
    bottom = image[y1, x0] * (1.0 - wx) + image[y1, x1] * wx
    return top * (1.0 - wy) + bottom * wy


def image_to_events(
    image: np.ndarray,
    rng: np.random.Generator | int,
    num_steps: int = 10,
    max_translation: float = 0.1,
    max_rotation_deg: float = 10.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
    log_threshold: float = 0.2,
    duration_us: int = 100_000,
    log_eps: float = 1e-2,
    motion: AffineMotion | None = None,
) -> np.ndarray:
    """Events from a still image moved by a random affine motion (EZSR-style).

    ``num_steps + 1`` frames are rendered: frame 0 is the image itself and frame ``k`` applies
    ``k / num_steps`` of the motion (linear in translation, angle and scale). Each pixel keeps
    the log intensity ``log(log_eps + I)`` at its last event as a reference (initialised from
    frame 0). During step ``k`` (frame ``k-1`` to ``k``, time ``[(k-1), k) * duration_us /
    num_steps``) it fires ``floor(|L_k - ref| / log_threshold)`` events, polarity 1 if the
    intensity rose; each event sits where the log intensity, taken as linear within the step,
    crosses its level ``ref +- m * log_threshold``, and the reference moves to the last level.

    Args:
      image: grayscale [H,W] float in [0,1] (uint8 is divided by 255).
      rng: a ``np.random.Generator`` or an integer seed; the only source of randomness.
      num_steps: number of interpolation steps (frame differences).
      max_translation: maximum |shift| per axis, as a fraction of the longer image side.
      max_rotation_deg: maximum |rotation| in degrees.
      scale_range: (min, max) final scale factor.
      log_threshold: contrast threshold in log intensity.
      duration_us: length of the whole motion in microseconds.
      log_eps: offset inside the log, so black pixels have a finite log intensity.
      motion: a fixed motion instead of a random draw (then ``rng`` is not used).

    Returns:
      Events [N] of ``EVENT_DTYPE`` (x, y in image pixels, t in microseconds in
      ``[0, duration_us)``, p in {0,1}), sorted by time (ties: step, then raster pixel order).
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image / 255.0
    if image.ndim != 2:
        raise ValueError(f"image: expected a grayscale [H,W] array, got shape {image.shape}")
    image = image.astype(np.float64)
    if image.size and not (np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
        raise ValueError("image: expected finite values in [0, 1]")
    if image.shape[0] > _MAX_COORD + 1 or image.shape[1] > _MAX_COORD + 1:
        raise ValueError(f"image: height/width must fit uint16 coordinates, got {image.shape}")
    if num_steps < 1:
        raise ValueError(f"num_steps: expected a positive integer, got {num_steps}")
    if not log_threshold > 0:
        raise ValueError(f"log_threshold: expected > 0, got {log_threshold}")
    if motion is None:
        rng = np.random.default_rng(rng)
        motion = sample_affine_motion(rng, image.shape, max_translation, max_rotation_deg,
                                      scale_range)

    width = image.shape[1]
    step_us = duration_us / num_steps
    reference = np.log(log_eps + image).ravel()
    log_prev = reference.copy()
    xs, ys, ts, ps = [], [], [], []
    for step in range(1, num_steps + 1):
        frame = warp_affine(image, motion, step / num_steps)
        log_cur = np.log(log_eps + frame).ravel()
        delta = log_cur - reference
        # Tiny tolerance so an exact multiple of the threshold is not lost to rounding.
        num = np.floor(np.abs(delta) / log_threshold + 1e-9).astype(np.int64)
        pixels = np.flatnonzero(num)
        if pixels.size:
            counts = num[pixels]
            sign = np.sign(delta[pixels])
            pix = np.repeat(pixels, counts)
            # m = 1..count within each pixel's run of events.
            starts = np.cumsum(counts) - counts
            m = np.arange(pix.size) - np.repeat(starts, counts) + 1
            level = reference[pix] + np.repeat(sign, counts) * m * log_threshold
            change = log_cur[pix] - log_prev[pix]
            frac = np.clip((level - log_prev[pix]) / np.where(change == 0, 1.0, change), 0, 1)
            ts.append(np.floor((step - 1 + frac) * step_us).astype(np.int64))
            xs.append(pix % width)
            ys.append(pix // width)
            ps.append(np.repeat(sign > 0, counts))
            reference[pixels] += sign * counts * log_threshold
        log_prev = log_cur

    if not ts:
        return np.zeros(0, EVENT_DTYPE)
    t = np.concatenate(ts)
    order = np.argsort(t, kind="stable")
    ev = np.empty(t.size, EVENT_DTYPE)
    ev["t"] = np.minimum(t[order], duration_us - 1)
    ev["x"] = np.concatenate(xs)[order]
    ev["y"] = np.concatenate(ys)[order]
    ev["p"] = np.concatenate(ps)[order]
    return ev
