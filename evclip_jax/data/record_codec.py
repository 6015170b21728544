"""The record features' encodings and their parser: what ``records`` writes and the pipeline
reads.

Features (one ``tf.train.Example``; S = ``image_size``, T = ``num_frames``):

* ``event_counts`` (``evclip`` records): the Eq. 1 counts of the event window [S, S],
  clamped by ``clamp``; the frame is ``frames.counts_to_frame(counts)``. ``png`` encoding:
  16-bit gray PNG; ``raw``: the bytes of ``event_dtype`` (uint8 when the clamp is <= 255,
  else uint16), little-endian, C order.
* ``event_frames`` (``eventclip``, ``eventbind`` records): the representation itself,
  little-endian float32 in C order (``png`` encoding: zlib-compressed; ``raw``: as is):
  ``frames.eventclip_frame`` [S, S, 3] or ``frames.eventbind_frames`` [T, S, S, 3] (T
  fixed-count windows), in [0, 1]. float32, as float16 would round the EventCLIP ratios
  k / max (1/3, ...).
  Either event feature holds ``num_windows`` values, one per event window.
* ``image`` (when the items have images): uint8 [S, S], the paired image in CLIP
  preprocessing (``load_gray_image``); ``png``: 8-bit gray PNG, ``raw``: its bytes.
* ``label`` int64: index into ``class_names``; ``key`` bytes: the event file's path (UTF-8);
  optional ``teacher_emb`` float32 [D] and ``caption`` bytes (raw UTF-8 text).

Encodings: ``png`` (16-bit gray PNG counts, zlib-compressed float32 frames, 8-bit gray PNG
image) and ``raw`` (the arrays' little-endian bytes in C order: no image codec to read, the
host only copies). Every event feature holds one value per stored event window, and
``parse_example`` decodes only the window asked for. Imports without TensorFlow;
``parse_example`` imports it when called.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

import numpy as np

from evclip_jax.events import frames

ENCODINGS = ("png", "raw")
EVENT_DTYPES = ("uint8", "uint16")  # Eq. 1 counts (raw); PNG counts are always uint16


def event_shape(representation: str, out_size: int, num_frames: int = 3) -> list[int]:
    """One example's event representation: evclip [S, S], eventclip [S, S, 3], eventbind
    [T, S, S, 3] (T = ``num_frames`` >= 1). ValueError on an unknown name."""
    frames.get_representation(representation)  # ValueError listing the names if unknown
    if representation == "eventbind" and int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1 for eventbind; got {num_frames}")
    return {"evclip": [out_size] * 2, "eventclip": [out_size, out_size, 3],
            "eventbind": [int(num_frames), out_size, out_size, 3]}[representation]


def encode_events(windows: list[np.ndarray], representation: str, *, encoding: str,
                  event_dtype: str) -> list[bytes]:
    """One value per window of the event feature: Eq. 1 counts (``evclip``) as PNG or raw
    ``event_dtype``, other representations' float32 frames zlib-compressed (png) or raw."""
    raw = encoding == "raw"
    if representation == "evclip":
        return [_raw_bytes(w, event_dtype) if raw else encode_png(w) for w in windows]
    return [_raw_bytes(w, "float32") if raw else encode_frames(w) for w in windows]


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    """The ``image`` feature of a uint8 [S, S] gray image."""
    return _raw_bytes(image, "uint8") if encoding == "raw" else encode_png(image)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a 2-D uint8 (8-bit gray) or uint16 (16-bit gray) array."""
    from PIL import Image

    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png expects a 2-D uint8/uint16 array; got {array.dtype} "
                         f"{array.shape}")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_frames(array: np.ndarray) -> bytes:
    """The ``event_frames`` encoding: zlib-compressed little-endian float32, C order."""
    return zlib.compress(np.ascontiguousarray(array, dtype="<f4").tobytes())


def _raw_bytes(array: np.ndarray, dtype: str) -> bytes:
    """The ``raw`` encoding: little-endian ``dtype`` bytes in C order (counts checked to fit)."""
    if np.dtype(dtype).kind == "u" and array.size and int(array.max()) > np.iinfo(dtype).max:
        raise ValueError(f"a count of {int(array.max())} does not fit the records' {dtype}")
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def bytes_feature(tf: Any, value: bytes) -> Any:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def teacher_emb_feature(tf: Any, teacher_row: np.ndarray) -> Any:
    return tf.train.Feature(
        float_list=tf.train.FloatList(value=np.asarray(teacher_row, np.float32).tolist()))


def with_teacher_emb(serialized: bytes, teacher_row: np.ndarray) -> bytes:
    """The serialized record with its ``teacher_emb`` feature set to ``teacher_row`` (float32
    [D]); every other feature stays as it was."""
    import tensorflow as tf

    example = tf.train.Example.FromString(serialized)
    example.features.feature["teacher_emb"].CopyFrom(teacher_emb_feature(tf, teacher_row))
    return example.SerializeToString()


def record_format(manifest: dict) -> dict[str, Any]:
    """``parse_example``'s keyword arguments for the records a (read) manifest describes."""
    return {"has_images": manifest.get("has_images", True),
            "representation": manifest["representation"],
            "num_frames": manifest["event_shape"][0], "encoding": manifest["encoding"],
            "event_dtype": manifest["event_dtype"], "num_windows": manifest["num_windows"]}


def parse_example(serialized: Any, out_size: int, with_teacher_emb_dim: int | None = None, *,
                  has_images: bool = True, representation: str = "evclip",
                  num_frames: int = 3, encoding: str = "png", event_dtype: str = "uint16",
                  num_windows: int = 1, window: Any = 0) -> dict[str, Any]:
    """Parses one serialized record into tensors (for ``tf.data.Dataset.map``); only the event
    window ``window`` (an int or int tensor in [0, num_windows)) is decoded.

    Returns "event_counts" [S, S] (evclip; ``event_dtype``, uint16 from PNG) or
    "event_frames" float32 ``event_shape`` (eventclip, eventbind), "image" uint8 [S, S]
    (zeros without images), "label" int32, "key" string and, with ``with_teacher_emb_dim`` D,
    "teacher_emb" float32 [D]. A missing feature, a PNG of the wrong bit depth or shape or
    frames or raw bytes of the wrong size raise InvalidArgumentError when the op runs. The
    label is not range-checked here (the pipeline does, naming the shard and record); values
    beyond int32 saturate, so they stay out of range.
    """
    import tensorflow as tf

    shape = event_shape(representation, out_size, num_frames)
    feature = "event_counts" if representation == "evclip" else "event_frames"
    raw = encoding == "raw"
    spec = {
        feature: tf.io.FixedLenFeature([num_windows], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "key": tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    if has_images:
        spec["image"] = tf.io.FixedLenFeature([], tf.string)
    if with_teacher_emb_dim is not None:
        spec["teacher_emb"] = tf.io.FixedLenFeature([with_teacher_emb_dim], tf.float32)
    feats = tf.io.parse_single_example(serialized, spec)

    data = feats[feature][window]
    if representation == "evclip" and raw:
        events = _decode_raw(tf, data, tf.as_dtype(event_dtype), shape)
    elif representation == "evclip":
        events = _decode_gray_png(tf, data, tf.uint16, out_size, feature)
    else:
        events = _decode_raw(tf, data if raw else tf.io.decode_compressed(data, "ZLIB"),
                             tf.float32, shape)
    if has_images and raw:
        image = _decode_raw(tf, feats["image"], tf.uint8, [out_size, out_size])
    elif has_images:
        image = _decode_gray_png(tf, feats["image"], tf.uint8, out_size, "image")
    else:
        image = tf.zeros([out_size, out_size], tf.uint8)
    label = tf.cast(tf.clip_by_value(feats["label"], -1, 2**31 - 1), tf.int32)
    out = {feature: events, "image": image, "label": label, "key": feats["key"]}
    if with_teacher_emb_dim is not None:
        out["teacher_emb"] = feats["teacher_emb"]
    return out


def _decode_raw(tf: Any, data: Any, dtype: Any, shape: list[int]) -> Any:
    """Little-endian bytes -> ``shape``; InvalidArgumentError on a wrong byte count."""
    return tf.reshape(tf.io.decode_raw(data, dtype, little_endian=True), shape)


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
