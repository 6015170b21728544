"""Event files: the single entry point for reading, whole or in time windows, and writing.

``read_events`` and ``iter_event_windows`` read every format: the research datasets' files
(``dataset_formats``: N-MNIST/N-Caltech101 ``.bin``, CIFAR10-DVS AEDAT 2.0, N-ImageNet and generic
npz) and camera recordings (``camera_formats``: AEDAT4, Prophesee RAW and DAT, HDF5 in the plain,
DSEC or Prophesee layouts). Both return ``EVENT_DTYPE`` arrays built by ``event_array``.
``write_events`` writes the research formats.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from evclip_jax.events import camera_formats, dataset_formats
from evclip_jax.events.camera_formats import Recording
from evclip_jax.events.dataset_formats import FORMATS, write_events
from evclip_jax.events.event_array import (
    EVENT_DTYPE,
    EventFileError,
    PathLike,
    canonical_time_unit,
    check_sensor,
    event_array,
    timestamps_us,
)

__all__ = [
    "CAMERA_FORMATS",
    "EVENT_DTYPE",
    "FORMATS",
    "EventFileError",
    "detect_format",
    "iter_event_windows",
    "read_events",
    "read_sensor_size",
    "write_events",
]

CAMERA_FORMATS = camera_formats.FORMATS
_EXTENSIONS = {**dataset_formats.EXTENSIONS, **camera_formats.EXTENSIONS}


# --------------------------------------------------------------------------------------------
# Reading.


def read_events(
    path: PathLike,
    format: str | None = None,
    *,
    sensor_size: tuple[int, int] | None = None,
    time_unit: str | None = None,
    check_sorted: bool = True,
    allow_empty: bool = False,
) -> np.ndarray:
    """Reads a whole event file into a 1-D array of ``EVENT_DTYPE``.

    Args:
      path: the file.
      format: one of ``FORMATS + CAMERA_FORMATS``; None picks it from the extension, or from the
        file's magic bytes when the extension is unknown. A ``.npz`` holding ``event_data`` or
        ``x_pos`` keys is read as N-ImageNet, any other ``.npz`` as generic (keys x, y, t, p).
      sensor_size: optional (H, W); raises if any x >= W or y >= H, or if the file's header gives
        another size. None checks against the header's size where there is one.
      time_unit: unit of the stored timestamps ("s", "ms", "us", "ns") for files that do not
        give one; integers default to microseconds, floats without a unit are refused.
      check_sorted: raise if timestamps ever decrease (windows of K consecutive events assume
        time order; all supported datasets store events sorted).
      allow_empty: return a zero-length array for a file holding no events instead of raising.

    Returns:
      Structured array with fields x, y (uint16), t (int64 microseconds), p (int8, 1 = ON).
    """
    path = os.fspath(path)
    parts = list(_event_chunks(path, format, sensor_size, time_unit, check_sorted))
    ev = np.concatenate(parts) if parts else np.zeros(0, EVENT_DTYPE)
    if len(ev) == 0 and not allow_empty:
        raise EventFileError(f"{path}: the file holds no events (pass allow_empty=True to "
                             "accept empty streams)")
    return ev


def iter_event_windows(
    path: PathLike,
    window_us: int,
    format: str | None = None,
    *,
    sensor_size: tuple[int, int] | None = None,
    time_unit: str | None = None,
) -> Iterator[np.ndarray]:
    """Reads an event file in consecutive time windows, without loading it whole.

    The k-th array holds the events with ``t0 + k * window_us <= t < t0 + (k + 1) * window_us``,
    where t0 is the first event's timestamp; windows without events are yielded empty, so k
    always maps to the same time span. Camera recordings and HDF5 files are decoded packet by
    packet, so memory holds one packet plus one window; the small research formats are read
    whole first. Arguments as in ``read_events``; timestamps must not decrease.
    """
    if isinstance(window_us, bool) or not isinstance(window_us, (int, np.integer)) \
            or window_us <= 0:
        raise ValueError(f"{os.fspath(path)}: window_us must be a positive integer number of "
                         f"microseconds; got {window_us!r}")
    w = int(window_us)
    start = None
    k = 0  # index of the window the pending parts belong to
    pending: list[np.ndarray] = []
    for ev in _event_chunks(os.fspath(path), format, sensor_size, time_unit, True):
        if len(ev) == 0:
            continue
        t = ev["t"]
        if start is None:
            start = int(t[0])
        last_k = (int(t[-1]) - start) // w
        if last_k > k:
            cuts = np.searchsorted(t, start + np.arange(k + 1, last_k + 1) * w, side="left")
            prev = 0
            for cut in cuts:
                pending.append(ev[prev:cut])
                yield np.concatenate(pending)
                pending, prev = [], int(cut)
            ev = ev[prev:]
            k = last_k
        pending.append(ev)
    if start is not None:
        yield np.concatenate(pending)


def read_sensor_size(path: PathLike, format: str | None = None) -> tuple[int, int] | None:
    """The (H, W) sensor size the file's header gives (AEDAT4, RAW, DAT, Prophesee HDF5), else
    None (the research formats and DSEC store none); reads the header only."""
    path = os.fspath(path)
    fmt = _check_format_name(format, path) if format is not None else detect_format(path)
    return _open(path, fmt).sensor_size


def detect_format(path: PathLike) -> str:
    """Returns the format name of an event file from its extension, else its magic bytes."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    fmt = _EXTENSIONS.get(ext)
    # .aedat is CIFAR10-DVS's AEDAT 2.0 unless the file starts as AEDAT4.
    if fmt is None or (ext == ".aedat" and _head(path).startswith(camera_formats.AEDAT4_MAGIC)):
        fmt = _format_from_magic(path)
    if fmt == "npz":
        fmt = "nimagenet_npz" if dataset_formats.npz_is_nimagenet(path) else "npz"
    return fmt


def _head(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(512)


def _format_from_magic(path: str) -> str:
    head = _head(path)
    if head.startswith(camera_formats.AEDAT4_MAGIC):
        return "aedat4"
    if head.startswith(b"#!AER-DAT"):
        return "aedat2"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "npz"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "h5"
    if head.startswith(b"% "):  # Prophesee: RAW headers state the EVT version, DAT ones do not
        evt = (b"% evt ", b"% format EVT")
        return "evt" if head.startswith(evt) or any(b"\n" + m in head for m in evt) else "dat"
    raise EventFileError(
        f"{path}: cannot tell the event format from the extension or the first bytes "
        f"{head[:8]!r}; pass format= one of {', '.join(FORMATS + CAMERA_FORMATS)}")


def _event_chunks(path: str, format: str | None, sensor_size: tuple[int, int] | None,
                  time_unit: str | None, check_sorted: bool) -> Iterator[np.ndarray]:
    """The file's events as validated ``EVENT_DTYPE`` chunks, in file order."""
    fmt = _check_format_name(format, path) if format is not None else detect_format(path)
    recording = _open(path, fmt)
    unit = recording.time_unit
    if time_unit is not None:
        wanted = canonical_time_unit(time_unit, f"{path}: time_unit")
        if unit is not None and unit != wanted:
            raise EventFileError(f"{path}: the file gives timestamps in {unit}, but "
                                 f"time_unit={time_unit!r} was passed")
        unit = wanted
    sensor = recording.sensor_size
    if sensor_size is not None:
        wanted_size = tuple(int(s) for s in sensor_size)
        if sensor is not None and sensor != wanted_size:
            raise EventFileError(f"{path}: the header gives sensor (H, W) = {sensor}, but "
                                 f"sensor_size={tuple(sensor_size)} was passed")
        sensor = wanted_size
    seen, last_t = 0, None
    for x, y, t, p in recording.chunks:
        ev = event_array(path, x, y, timestamps_us(path, t, unit), p)
        if check_sorted and len(ev):
            t_us = ev["t"] if last_t is None else np.concatenate([[last_t], ev["t"]])
            dec = np.flatnonzero(np.diff(t_us) < 0)
            if dec.size:
                i = int(dec[0])
                raise EventFileError(
                    f"{path}: timestamps decrease at event {seen + i + (last_t is None)} "
                    f"({t_us[i]} -> {t_us[i + 1]} us); expected non-decreasing time order "
                    f"(pass check_sorted=False to accept)")
        if sensor is not None:
            check_sensor(path, ev, sensor)
        seen += len(ev)
        if len(ev):
            last_t = int(ev["t"][-1])
        yield ev


def _open(path: str, fmt: str) -> Recording:
    """What the file's header says, and its columns; camera formats decode them lazily."""
    if fmt == "bin":
        return Recording(None, "us", iter([dataset_formats.read_bin(path)]))
    if fmt == "aedat2":
        return Recording(None, "us", iter([dataset_formats.read_aedat2(path)]))
    if fmt in ("npz", "nimagenet_npz"):
        columns = dataset_formats.read_npz(path, nimagenet=(fmt == "nimagenet_npz"))
        return Recording(None, None, iter([columns]))
    opener = {"h5": camera_formats.open_hdf5, "aedat4": camera_formats.open_aedat4,
              "evt": camera_formats.open_evt, "dat": camera_formats.open_dat}[fmt]
    return opener(path)


def _check_format_name(format: str, path: str) -> str:
    if format not in FORMATS + CAMERA_FORMATS:
        raise ValueError(f"{path}: unknown event format {format!r}; expected one of "
                         f"{', '.join(FORMATS + CAMERA_FORMATS)}")
    return format
