"""The research datasets' event files, read and written: N-MNIST / N-Caltech101 ``.bin``,
CIFAR10-DVS AEDAT 2.0, N-ImageNet and generic ``.npz``, and plain ``.h5`` (written here; HDF5 is
read by ``camera_formats.open_hdf5`` with the camera layouts).

Byte layouts follow METHOD.md "Data and splits". Decoding is vectorised: ``np.frombuffer`` on the
file bytes and bit operations on whole columns, never a Python loop per event. The readers
return raw (x, y, t, p) columns; ``event_array`` validates them.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

from evclip_jax.events.event_array import EVENT_DTYPE, EventFileError, PathLike

FORMATS = ("bin", "nimagenet_npz", "aedat2", "npz", "h5")  # read and written
EXTENSIONS = {".bin": "bin", ".aedat": "aedat2", ".aedat2": "aedat2", ".npz": "npz",
              ".h5": "h5", ".hdf5": "h5"}
NIMAGENET_LAYOUTS = ("event_data", "x_pos")

_EVENT_FIELDS = ("x", "y", "t", "p")
# N-ImageNet's second key layout, in (x, y, t, p) order.
_NIMAGENET_POS_KEYS = ("x_pos", "y_pos", "timestamp", "polarity")
_AEDAT2_HEADER = (
    b"#!AER-DAT2.0\r\n"
    b"# This is a raw AE data file created by evclip_jax\r\n"
    b"# Data format is int32 address, int32 timestamp (8 bytes total), big-endian\r\n"
    b"# Timestamps tick is 1 us\r\n"
)
_BIN_MAX_T = 1 << 23  # 23-bit timestamp field of the .bin format.
# ATIS timestamp overflow marker of the .bin format: an event with y == 240 is no event, and
# every later timestamp is 2**13 us later (gorchard/event-Python eventvision.read_dataset,
# tonic's read_mnist_file: ``all_ts[overflow_index:] += 2**13``, then markers dropped).
_BIN_OVERFLOW_Y = 240
_BIN_OVERFLOW_US = 1 << 13
_AEDAT_MAX_T = 1 << 32


# --------------------------------------------------------------------------------------------
# Reading: raw (x, y, t, p) columns, validated by ``event_array``.


def read_bin(path: str) -> tuple[np.ndarray, ...]:
    """N-MNIST / N-Caltech101: 5 bytes per event, big-endian bit fields (METHOD.md)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) % 5:
        raise EventFileError(
            f"{path}: .bin event file length {len(data)} bytes is not a multiple of 5 "
            f"(5 bytes per event); the file is truncated or not N-MNIST/N-Caltech101 format")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 5)
    x = raw[:, 0]
    y = raw[:, 1]
    p = raw[:, 2] >> 7
    t = ((raw[:, 2].astype(np.int64) & 0x7F) << 16) | (raw[:, 3].astype(np.int64) << 8) | raw[:, 4]
    marker = y == _BIN_OVERFLOW_Y
    if marker.any():
        t = t + _BIN_OVERFLOW_US * np.cumsum(marker, dtype=np.int64)
        keep = ~marker
        x, y, t, p = x[keep], y[keep], t[keep], p[keep]
    return x, y, t, p


def read_aedat2(path: str) -> tuple[np.ndarray, ...]:
    """CIFAR10-DVS AEDAT 2.0: '#' header lines, then big-endian uint32 (address, timestamp)."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    # Header lines are few; this loop runs per header line, never per event.
    while pos < len(data) and data[pos:pos + 1] == b"#":
        end = data.find(b"\n", pos)
        if end < 0:
            raise EventFileError(f"{path}: AEDAT header line at byte {pos} has no line end")
        line = data[pos:end].strip()
        if line.startswith(b"#!AER-DAT") and not line[len(b"#!AER-DAT"):].startswith(b"2"):
            raise EventFileError(
                f"{path}: AEDAT version {line[len(b'#!AER-DAT'):].decode(errors='replace')} is "
                f"not supported; expected AEDAT 2.0 ('#!AER-DAT2.0') or AEDAT4 ('#!AER-DAT4.0')")
        pos = end + 1
    payload = len(data) - pos
    if payload % 8:
        raise EventFileError(
            f"{path}: AEDAT 2.0 payload of {payload} bytes after the header is not a multiple of "
            f"8 (uint32 address + uint32 timestamp per event); the file is truncated")
    pairs = np.frombuffer(data, dtype=">u4", offset=pos).reshape(-1, 2)
    addr = pairs[:, 0]
    x = (addr & 0xFE) >> 1
    y = (addr & 0x7F00) >> 8
    p = addr & 1
    t = pairs[:, 1].astype(np.int64)
    return x, y, t, p


def _open_npz(path: str) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise EventFileError(f"{path}: not a readable .npz archive ({e})") from e


def npz_is_nimagenet(path: str) -> bool:
    with _open_npz(path) as z:
        keys = set(z.files)
    return "event_data" in keys or "x_pos" in keys


def read_npz(path: str, nimagenet: bool) -> tuple[np.ndarray, ...]:
    """Generic npz (keys x, y, t, p) or N-ImageNet (``event_data`` or x_pos/... keys)."""
    with _open_npz(path) as z:
        keys = list(z.files)
        try:
            if nimagenet and "event_data" in keys:
                data = z["event_data"]
                found = list(data.dtype.names or ())
                missing = [k for k in _EVENT_FIELDS if k not in found]
                if missing:
                    raise EventFileError(
                        f"{path}: N-ImageNet 'event_data' lacks fields {missing}; expected a "
                        f"structured array with fields x, y, t, p; found fields {found}")
                return tuple(np.asarray(data[k]) for k in _EVENT_FIELDS)
            names = _NIMAGENET_POS_KEYS if nimagenet else _EVENT_FIELDS
            missing = [k for k in names if k not in keys]
            if missing:
                what = ("N-ImageNet keys 'event_data' or x_pos, y_pos, timestamp, polarity"
                        if nimagenet else "keys x, y, t, p")
                raise EventFileError(
                    f"{path}: missing keys {missing}; expected {what}; found keys {keys}")
            return tuple(np.asarray(z[k]) for k in names)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise EventFileError(f"{path}: corrupt .npz member ({e})") from e
        except ValueError as e:
            if isinstance(e, EventFileError):
                raise
            raise EventFileError(f"{path}: corrupt or unsupported .npz member ({e})") from e


# --------------------------------------------------------------------------------------------
# Writing.


def write_events(
    path: PathLike,
    ev: np.ndarray,
    format: str | None = None,
    *,
    layout: str | None = None,
) -> None:
    """Writes events (a structured array with fields x, y, t, p) in one of ``FORMATS``.

    Args:
      path: the output file.
      ev: structured array with integer fields x, y, t (microseconds) and p in {0, 1}.
      format: one of ``FORMATS``; None picks it from the extension (``.npz`` -> generic npz).
      layout: only for ``nimagenet_npz``: ``"event_data"`` (default, one structured array) or
        ``"x_pos"`` (keys x_pos, y_pos, timestamp, polarity).

    Raises ValueError (naming the path and field) when a value does not fit the format,
    e.g. ``.bin`` needs x < 256, y < 240 (y = 240 is the format's overflow marker) and
    0 <= t < 2**23.
    """
    path = os.fspath(path)
    if format is None:
        format = EXTENSIONS.get(os.path.splitext(path)[1].lower())
        if format is None:
            raise ValueError(f"{path}: cannot tell the event format from the extension; pass "
                             f"format= one of {', '.join(FORMATS)}")
    fmt = format
    if fmt not in FORMATS:
        raise ValueError(f"{path}: cannot write event format {fmt!r}; write_events writes one "
                         f"of {', '.join(FORMATS)} (camera formats are read only)")
    if layout is not None and fmt != "nimagenet_npz":
        raise ValueError(f"{path}: layout= applies only to format 'nimagenet_npz', not {fmt!r}")
    ev = _coerce_events(path, ev)

    if fmt == "bin":
        _check_range(path, ev, "x", 0, 255, "bin")
        _check_range(path, ev, "y", 0, _BIN_OVERFLOW_Y - 1, "bin")
        _check_range(path, ev, "t", 0, _BIN_MAX_T - 1, "bin")
        t = ev["t"]
        raw = np.empty((len(ev), 5), dtype=np.uint8)
        raw[:, 0] = ev["x"]
        raw[:, 1] = ev["y"]
        raw[:, 2] = (ev["p"].astype(np.int64) << 7) | ((t >> 16) & 0x7F)
        raw[:, 3] = (t >> 8) & 0xFF
        raw[:, 4] = t & 0xFF
        with open(path, "wb") as f:
            f.write(raw.tobytes())
    elif fmt == "aedat2":
        _check_range(path, ev, "x", 0, 127, "aedat2")
        _check_range(path, ev, "y", 0, 127, "aedat2")
        _check_range(path, ev, "t", 0, _AEDAT_MAX_T - 1, "aedat2")
        pairs = np.empty((len(ev), 2), dtype=">u4")
        pairs[:, 0] = (ev["y"].astype(np.uint32) << 8) | (ev["x"].astype(np.uint32) << 1) \
            | ev["p"].astype(np.uint32)
        pairs[:, 1] = ev["t"]
        with open(path, "wb") as f:
            f.write(_AEDAT2_HEADER)
            f.write(pairs.tobytes())
    elif fmt == "nimagenet_npz":
        layout = "event_data" if layout is None else layout
        if layout not in NIMAGENET_LAYOUTS:
            raise ValueError(f"{path}: unknown N-ImageNet layout {layout!r}; expected one of "
                             f"{', '.join(NIMAGENET_LAYOUTS)}")
        with open(path, "wb") as f:  # a file object keeps np.savez from renaming the path
            if layout == "event_data":
                np.savez_compressed(f, event_data=ev)
            else:
                np.savez_compressed(f, x_pos=ev["x"], y_pos=ev["y"], timestamp=ev["t"],
                                    polarity=ev["p"])
    elif fmt == "npz":
        with open(path, "wb") as f:
            np.savez_compressed(f, **{k: ev[k] for k in _EVENT_FIELDS})
    else:
        import h5py

        with h5py.File(path, "w") as f:
            for k in _EVENT_FIELDS:
                f.create_dataset(k, data=ev[k])
            f["t"].attrs["unit"] = "us"


def _coerce_events(path: str, ev: np.ndarray) -> np.ndarray:
    """Checks a structured event array and converts it to ``EVENT_DTYPE``."""
    ev = np.asarray(ev)
    names = ev.dtype.names
    if names is None or any(k not in names for k in _EVENT_FIELDS):
        raise ValueError(f"{path}: events to write must be a structured array with fields "
                         f"x, y, t, p; got dtype {ev.dtype}")
    if ev.ndim != 1:
        raise ValueError(f"{path}: events to write must be 1-D; got shape {ev.shape}")
    for k in _EVENT_FIELDS:
        if ev.dtype[k].kind not in "iub":
            raise ValueError(f"{path}: field '{k}' has dtype {ev.dtype[k]}; expected integers")
    if len(ev):
        for k, hi in (("x", 65535), ("y", 65535), ("p", 1)):
            lo_v, hi_v = int(ev[k].min()), int(ev[k].max())
            if lo_v < 0 or hi_v > hi:
                raise ValueError(f"{path}: field '{k}' ranges over [{lo_v}, {hi_v}]; expected "
                                 f"values in [0, {hi}]")
    out = np.empty(len(ev), dtype=EVENT_DTYPE)
    for k in _EVENT_FIELDS:
        out[k] = ev[k]
    return out


def _check_range(path: str, ev: np.ndarray, name: str, lo: int, hi: int, fmt: str) -> None:
    if len(ev) == 0:
        return
    vmin, vmax = int(ev[name].min()), int(ev[name].max())
    if vmin < lo or vmax > hi:
        raise ValueError(f"{path}: field '{name}' ranges over [{vmin}, {vmax}]; format {fmt!r} "
                         f"needs values in [{lo}, {hi}]")
