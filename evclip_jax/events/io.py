"""Event-camera file readers and writers (N-MNIST/N-Caltech101, N-ImageNet, CIFAR10-DVS, npz, h5).

Every reader returns one structured array of ``EVENT_DTYPE`` (x, y uint16; t int64 microseconds;
p int8 in {0, 1}) so the rest of the code never sees a format. Byte layouts follow
METHOD.md "Data and splits". Decoding is vectorised: ``np.frombuffer`` on the file bytes and
bit operations on whole columns, never a Python loop per event.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

import numpy as np

EVENT_DTYPE = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "i1")])

FORMATS = ("bin", "nimagenet_npz", "aedat2", "npz", "h5")
NIMAGENET_LAYOUTS = ("event_data", "x_pos")

_EVENT_FIELDS = ("x", "y", "t", "p")
# N-ImageNet's second key layout, in (x, y, t, p) order.
_NIMAGENET_POS_KEYS = ("x_pos", "y_pos", "timestamp", "polarity")
_EXTENSIONS = {".bin": "bin", ".aedat": "aedat2", ".aedat2": "aedat2", ".npz": "npz",
               ".h5": "h5", ".hdf5": "h5"}
_AEDAT2_HEADER = (
    b"#!AER-DAT2.0\r\n"
    b"# This is a raw AE data file created by evclip_jax\r\n"
    b"# Data format is int32 address, int32 timestamp (8 bytes total), big-endian\r\n"
    b"# Timestamps tick is 1 us\r\n"
)
_BIN_MAX_T = 1 << 23  # 23-bit timestamp field of the .bin format.
_AEDAT_MAX_T = 1 << 32


class EventFileError(ValueError):
    """A file that cannot be read as events; the message starts with the path."""


PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# Reading.


def read_events(
    path: PathLike,
    format: str | None = None,
    *,
    sensor_size: tuple[int, int] | None = None,
    check_sorted: bool = True,
    allow_empty: bool = False,
) -> np.ndarray:
    """Reads an event file into a 1-D array of ``EVENT_DTYPE``.

    Args:
      path: the file.
      format: one of ``FORMATS``; None picks it from the extension, or from the file's magic
        bytes when the extension is unknown. A ``.npz`` holding ``event_data`` or ``x_pos`` keys
        is read as N-ImageNet, any other ``.npz`` as generic (keys x, y, t, p).
      sensor_size: optional (H, W); raises if any x >= W or y >= H.
      check_sorted: raise if timestamps ever decrease (windows of K consecutive events assume
        time order; all supported datasets store events sorted).
      allow_empty: return a zero-length array for a file holding no events instead of raising.

    Returns:
      Structured array with fields x, y (uint16), t (int64 microseconds), p (int8, 1 = ON).
    """
    path = os.fspath(path)
    fmt = _check_format_name(format, path) if format is not None else detect_format(path)
    if fmt == "bin":
        columns = _read_bin(path)
    elif fmt == "aedat2":
        columns = _read_aedat2(path)
    elif fmt in ("npz", "nimagenet_npz"):
        columns = _read_npz(path, nimagenet=(fmt == "nimagenet_npz"))
    else:
        columns = _read_h5(path)
    return _assemble(path, *columns, sensor_size=sensor_size, check_sorted=check_sorted,
                     allow_empty=allow_empty)


def detect_format(path: PathLike) -> str:
    """Returns the format name of an event file from its extension, else its magic bytes."""
    path = os.fspath(path)
    fmt = _EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        with open(path, "rb") as f:
            head = f.read(16)
        if head.startswith(b"#!AER-DAT"):
            fmt = "aedat2"
        elif head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            fmt = "npz"
        elif head.startswith(b"\x89HDF\r\n\x1a\n"):
            fmt = "h5"
        else:
            raise EventFileError(
                f"{path}: cannot tell the event format from the extension or the first bytes "
                f"{head[:8]!r}; pass format= one of {', '.join(FORMATS)}")
    if fmt == "npz":
        fmt = "nimagenet_npz" if _npz_is_nimagenet(path) else "npz"
    return fmt


def _read_bin(path: str) -> tuple[np.ndarray, ...]:
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
    return x, y, t, p


def _read_aedat2(path: str) -> tuple[np.ndarray, ...]:
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
                f"not supported; expected AEDAT 2.0 ('#!AER-DAT2.0')")
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


def _npz_is_nimagenet(path: str) -> bool:
    with _open_npz(path) as z:
        keys = set(z.files)
    return "event_data" in keys or "x_pos" in keys


def _read_npz(path: str, nimagenet: bool) -> tuple[np.ndarray, ...]:
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


def _import_h5py() -> Any:
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a project dependency
        raise ImportError("reading/writing .h5 event files needs h5py (pip install h5py)") from e
    return h5py


def _read_h5(path: str) -> tuple[np.ndarray, ...]:
    """HDF5 with datasets x, y, t, p at the root or inside a group ``events``."""
    h5py = _import_h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EventFileError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        root_keys = list(f.keys())
        group = f
        if not all(k in f for k in _EVENT_FIELDS) and isinstance(f.get("events"), h5py.Group):
            group = f["events"]
        missing = [k for k in _EVENT_FIELDS
                   if k not in group or not isinstance(group[k], h5py.Dataset)]
        if missing:
            found = root_keys if group is f else root_keys + [f"events/{k}" for k in group]
            raise EventFileError(
                f"{path}: missing datasets {missing}; expected datasets x, y, t, p at the root "
                f"or in a group 'events'; found {found}")
        return tuple(np.asarray(group[k][()]) for k in _EVENT_FIELDS)


def _as_int_column(path: str, name: str, a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Checks one coordinate column is integral and within [lo, hi]; returns it as int64."""
    a = np.asarray(a)
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.dtype.kind not in "iuf":
        raise EventFileError(f"{path}: field '{name}' has dtype {a.dtype}; expected numbers")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise EventFileError(f"{path}: field '{name}' contains NaN or infinite values")
        if not np.array_equal(a, np.round(a)):
            raise EventFileError(f"{path}: field '{name}' holds non-integer values; expected "
                                 "integer pixel coordinates")
    if a.size:
        amin, amax = a.min(), a.max()
        if amin < lo or amax > hi:
            raise EventFileError(
                f"{path}: field '{name}' ranges over [{amin}, {amax}]; expected values in "
                f"[{lo}, {hi}]")
    return a.astype(np.int64, copy=False)


def _assemble(
    path: str,
    x: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    p: np.ndarray,
    *,
    sensor_size: tuple[int, int] | None,
    check_sorted: bool,
    allow_empty: bool,
) -> np.ndarray:
    """Validates decoded columns and packs them into an ``EVENT_DTYPE`` array."""
    cols = {"x": np.asarray(x), "y": np.asarray(y), "t": np.asarray(t), "p": np.asarray(p)}
    for name, col in cols.items():
        if col.ndim != 1:
            raise EventFileError(f"{path}: field '{name}' has shape {col.shape}; expected 1-D")
    lengths = {name: len(col) for name, col in cols.items()}
    if len(set(lengths.values())) != 1:
        raise EventFileError(f"{path}: fields have different lengths {lengths}; expected equal")
    n = lengths["x"]
    if n == 0 and not allow_empty:
        raise EventFileError(f"{path}: the file holds no events (pass allow_empty=True to "
                             "accept empty streams)")

    xs = _as_int_column(path, "x", cols["x"], 0, np.iinfo(np.uint16).max)
    ys = _as_int_column(path, "y", cols["y"], 0, np.iinfo(np.uint16).max)

    t = cols["t"]
    if t.dtype.kind == "f":
        # Float timestamps are taken as microseconds, like every supported format.
        if np.isnan(t).any():
            raise EventFileError(f"{path}: timestamps contain NaN at event "
                                 f"{int(np.flatnonzero(np.isnan(t))[0])}")
        if not np.all(np.isfinite(t)):
            raise EventFileError(f"{path}: timestamps contain infinite values")
        t = np.round(t).astype(np.int64)
    elif t.dtype.kind in "iu":
        if t.dtype == np.uint64 and t.size and t.max() > np.iinfo(np.int64).max:
            raise EventFileError(f"{path}: timestamps exceed the int64 range")
        t = t.astype(np.int64, copy=False)
    else:
        raise EventFileError(f"{path}: field 't' has dtype {t.dtype}; expected numbers")
    if check_sorted and n > 1:
        dec = np.flatnonzero(np.diff(t) < 0)
        if dec.size:
            i = int(dec[0])
            raise EventFileError(
                f"{path}: timestamps decrease at event {i + 1} ({t[i]} -> {t[i + 1]} us); "
                f"expected non-decreasing time order (pass check_sorted=False to accept)")

    p = cols["p"]
    if p.dtype.kind == "b":
        p = p.astype(np.int8)
    elif p.dtype.kind not in "iuf":
        raise EventFileError(f"{path}: field 'p' has dtype {p.dtype}; expected numbers")
    if n:
        pmin, pmax = p.min(), p.max()
        zero_one = pmin >= 0 and pmax <= 1
        signed = pmin >= -1 and pmax <= 1 and not np.any(p == 0)
        integral = p.dtype.kind != "f" or np.array_equal(p, np.round(p))
        if not integral or not (zero_one or signed):
            raise EventFileError(
                f"{path}: polarity ranges over [{pmin}, {pmax}]; expected values in {{0, 1}} or "
                f"{{-1, 1}}")
    p = (p > 0).astype(np.int8)

    if sensor_size is not None:
        _check_sensor(path, xs, ys, sensor_size)

    out = np.empty(n, dtype=EVENT_DTYPE)
    out["x"] = xs
    out["y"] = ys
    out["t"] = t
    out["p"] = p
    return out


def _check_sensor(path: str, x: np.ndarray, y: np.ndarray, sensor_size: tuple[int, int]) -> None:
    height, width = (int(s) for s in sensor_size)
    if x.size == 0:
        return
    xmax, ymax = int(x.max()), int(y.max())
    if xmax >= width or ymax >= height:
        raise EventFileError(
            f"{path}: coordinates outside the sensor: max x = {xmax}, max y = {ymax}; expected "
            f"x < {width} and y < {height} for sensor_size (H, W) = ({height}, {width})")


def _check_format_name(format: str, path: str) -> str:
    if format not in FORMATS:
        raise ValueError(f"{path}: unknown event format {format!r}; expected one of "
                         f"{', '.join(FORMATS)}")
    return format


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
    e.g. ``.bin`` needs x, y < 256 and 0 <= t < 2**23.
    """
    path = os.fspath(path)
    if format is None:
        format = _EXTENSIONS.get(os.path.splitext(path)[1].lower())
        if format is None:
            raise ValueError(f"{path}: cannot tell the event format from the extension; pass "
                             f"format= one of {', '.join(FORMATS)}")
    fmt = _check_format_name(format, path)
    if layout is not None and fmt != "nimagenet_npz":
        raise ValueError(f"{path}: layout= applies only to format 'nimagenet_npz', not {fmt!r}")
    ev = _coerce_events(path, ev)

    if fmt == "bin":
        _check_range(path, ev, "x", 0, 255, "bin")
        _check_range(path, ev, "y", 0, 255, "bin")
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
        h5py = _import_h5py()
        with h5py.File(path, "w") as f:
            for k in _EVENT_FIELDS:
                f.create_dataset(k, data=ev[k])


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
