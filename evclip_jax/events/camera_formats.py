"""Readers for recordings written by event cameras' software: AEDAT4 (iniVation), Prophesee RAW
(EVT 2.0 / 3.0) and DAT, and HDF5 (DSEC, Prophesee and plain x/y/t/p layouts).

Each ``open_*`` reads only the header (sensor size, time unit) and returns a ``Recording`` whose
chunks are decoded lazily, packet by packet, so a recording larger than memory can be read in
time windows. Decoding uses maintained readers installed as extras: ``aedat`` (AEDAT4), ``faery``
(RAW and DAT) and ``hdf5plugin`` (HDF5 compression filters). faery rather than expelliarmus
decodes RAW: expelliarmus 1.1.12 adds 4096 us to EVT3 timestamps at every TIME_LOW wrap. faery's
decoders are called directly (``faery.extension``) because its stream wrapper refuses DAT files
of type Event2D, which its DAT decoder reads.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from evclip_jax.events.event_array import EventFileError, canonical_time_unit

FORMATS = ("aedat4", "evt", "dat")  # read only; "h5" is read here too but also written
EXTENSIONS = {".aedat4": "aedat4", ".raw": "evt", ".dat": "dat"}

Columns = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x, y, t, p as decoded

AEDAT4_MAGIC = b"#!AER-DAT4.0\r\n"
# EVT 2.1 is left out: faery 0.7 does not implement it.
_EVT_VERSIONS = {"2.0": "evt2", "3.0": "evt3"}
_EVT_FORMAT_NAMES = {"EVT2": "evt2", "EVT3": "evt3"}
_EVT_WORD_BYTES = {"evt2": 4, "evt3": 2}
_DAT_VERSIONS = {"1": "dat1", "2": "dat2"}
_DAT_EVENT_TYPES = {0: "Event2D", 12: "EventCD"}  # the DAT type byte; both are 8 bytes
_DAT_EVENT_BYTES = 8
# Passed to faery when the header gives no size, so no event is refused for lying outside it.
_NO_SENSOR_LIMIT = (65535, 65535)
_H5_UNIT_ATTRS = ("unit", "units", "time_unit")
_H5_CHUNK_EVENTS = 1 << 20  # events decoded per HDF5 read
_H5Z_FILTER_ECF = 0x8ECF  # Prophesee's ECF codec, not part of hdf5plugin


@dataclasses.dataclass(frozen=True)
class Recording:
    """An opened event file: what its header says, and its columns decoded chunk by chunk."""

    sensor_size: tuple[int, int] | None  # (H, W) from the header; None when it gives none
    time_unit: str | None  # the unit the file gives for t; None when it gives none
    chunks: Iterator[Columns]


def _require(module: str, extra: str, path: str, what: str) -> Any:
    """Imports an optional reader, or raises naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{path}: reading {what} needs the optional package '{module.split('.')[0]}'; "
            f"install it with: pip install 'evclip_jax[{extra}]'") from e


# --------------------------------------------------------------------------------------------
# AEDAT4 (iniVation DV): a flatbuffers container of packets; 'events' streams hold x, y, t, p.


def open_aedat4(path: str) -> Recording:
    """AEDAT4 through the ``aedat`` package: the first events stream, t in microseconds."""
    with open(path, "rb") as f:
        magic = f.read(len(AEDAT4_MAGIC))
    if magic != AEDAT4_MAGIC:
        raise EventFileError(f"{path}: expected an AEDAT4 file starting with "
                             f"{AEDAT4_MAGIC!r}; found {magic!r}")
    aedat = _require("aedat", "aedat4", path, "AEDAT4 files")
    try:
        streams = aedat.Decoder(path).id_to_stream()
    except RuntimeError as e:
        raise EventFileError(f"{path}: unreadable AEDAT4 header ({e})") from e
    event_ids = sorted(i for i, s in streams.items() if s.get("type") == "events")
    if not event_ids:
        found = {i: s.get("type") for i, s in streams.items()}
        raise EventFileError(f"{path}: no events stream; expected an AEDAT4 stream of type "
                             f"'events', found streams {found}")
    stream_id = event_ids[0]
    info = streams[stream_id]

    def chunks() -> Iterator[Columns]:
        try:
            for packet in aedat.Decoder(path):
                if packet["stream_id"] == stream_id and "events" in packet:
                    ev = packet["events"]
                    yield ev["x"], ev["y"], ev["t"], ev["on"]
        except RuntimeError as e:
            raise EventFileError(f"{path}: truncated or corrupt AEDAT4 packet ({e}); expected "
                                 "complete packets up to the end of the file") from e

    return Recording((int(info["height"]), int(info["width"])), "us", chunks())


# --------------------------------------------------------------------------------------------
# Prophesee RAW (EVT) and DAT: '% key value' header lines, then binary words or records.


def _percent_header(path: str) -> tuple[list[tuple[str, str]], int]:
    """The '% key value' header lines of a Prophesee file and the offset where data starts."""
    lines = []
    offset = 0
    with open(path, "rb") as f:
        while f.read(1) == b"%":
            line = f.readline()
            if not line.endswith(b"\n"):
                raise EventFileError(f"{path}: header line at byte {offset} has no line end; "
                                     "the file is truncated inside its header")
            offset += 1 + len(line)
            key, _, value = line.decode("latin-1").strip().partition(" ")
            lines.append((key, value.strip()))
            if key == "end":
                break
    return lines, offset


def _payload_bytes(path: str, offset: int) -> int:
    return os.path.getsize(path) - offset


def _evt_header(path: str) -> tuple[str, tuple[int, int] | None, int]:
    """EVT version, (H, W) if stated, and data offset, from a RAW file's header."""
    lines, offset = _percent_header(path)
    version = None
    width = height = None
    for key, value in lines:
        if key == "evt":
            if value not in _EVT_VERSIONS:
                raise EventFileError(f"{path}: header says 'evt {value}'; expected EVT version "
                                     f"{', '.join(_EVT_VERSIONS)}")
            version = _EVT_VERSIONS[value]
        elif key == "format":
            name, *options = value.split(";")
            if name not in _EVT_FORMAT_NAMES:
                raise EventFileError(f"{path}: header says 'format {name}'; expected one of "
                                     f"{', '.join(_EVT_FORMAT_NAMES)}")
            version = version or _EVT_FORMAT_NAMES[name]
            opts = dict(o.partition("=")[::2] for o in options)
            if "width" in opts and "height" in opts:
                width, height = opts["width"], opts["height"]
        elif key == "geometry" and width is None:
            width, _, height = value.partition("x")
    if version is None:
        raise EventFileError(
            f"{path}: the header gives no EVT version; expected a Prophesee RAW header with a "
            f"line '% evt 2.0' or '% evt 3.0' (or '% format EVT3;...')")
    return version, _header_size(path, width, height), offset


def _header_size(path: str, width: Any, height: Any) -> tuple[int, int] | None:
    if width is None or height is None:
        return None
    try:
        return int(height), int(width)
    except ValueError as e:
        raise EventFileError(f"{path}: header sensor size {width}x{height} is not two "
                             "integers") from e


def open_evt(path: str) -> Recording:
    """Prophesee RAW (EVT 2.0 or 3.0, from the header) through faery; t in microseconds."""
    version, sensor, offset = _evt_header(path)
    word = _EVT_WORD_BYTES[version]
    payload = _payload_bytes(path, offset)
    if payload % word:
        raise EventFileError(f"{path}: {version.upper()} data of {payload} bytes is not a "
                             f"multiple of its {word}-byte words; the file is truncated")
    dims = _NO_SENSOR_LIMIT if sensor is None else (sensor[1], sensor[0])

    def chunks() -> Iterator[Columns]:
        extension = _require("faery.extension", "prophesee", path, "Prophesee RAW files")
        try:
            with extension.evt.Decoder(path, dims, version) as decoder:
                for packet in decoder:
                    ev = packet.get("events")
                    if ev is not None and len(ev):
                        yield ev["x"], ev["y"], ev["t"], ev["on"]
        except RuntimeError as e:
            raise EventFileError(f"{path}: corrupt {version.upper()} data ({e})") from e

    return Recording(sensor, "us", chunks())


def open_dat(path: str) -> Recording:
    """Prophesee DAT (Event2D or EventCD records of 8 bytes) through faery; t in microseconds."""
    lines, offset = _percent_header(path)
    if not lines:
        raise EventFileError(f"{path}: expected a Prophesee DAT header ('% Version 2', "
                             "'% Width W', '% Height H' lines) at the start of the file")
    header = dict(lines)
    version = header.get("Version", "2")  # Prophesee's loader reads headerless-version files as 2
    if version not in _DAT_VERSIONS:
        raise EventFileError(f"{path}: header says 'Version {version}'; expected DAT version "
                             f"{' or '.join(_DAT_VERSIONS)}")
    sensor = _header_size(path, header.get("Width"), header.get("Height"))
    with open(path, "rb") as f:
        f.seek(offset)
        type_size = f.read(2)
    if len(type_size) < 2:
        raise EventFileError(f"{path}: the file ends after its header; expected the event type "
                             "and event size bytes")
    event_type, event_bytes = type_size
    if event_type not in _DAT_EVENT_TYPES or event_bytes != _DAT_EVENT_BYTES:
        raise EventFileError(
            f"{path}: DAT event type {event_type} of {event_bytes} bytes; expected "
            f"{' or '.join(f'{k} ({v})' for k, v in _DAT_EVENT_TYPES.items())} of "
            f"{_DAT_EVENT_BYTES} bytes")
    payload = _payload_bytes(path, offset + 2)
    if payload % _DAT_EVENT_BYTES:
        raise EventFileError(f"{path}: DAT data of {payload} bytes is not a multiple of "
                             f"{_DAT_EVENT_BYTES} bytes per event; the file is truncated")
    dims = _NO_SENSOR_LIMIT if sensor is None else (sensor[1], sensor[0])

    def chunks() -> Iterator[Columns]:
        extension = _require("faery.extension", "prophesee", path, "Prophesee DAT files")
        try:
            with extension.dat.Decoder(path, dims, _DAT_VERSIONS[version]) as decoder:
                for ev in decoder:
                    if len(ev):
                        # Polarity is bit 28 of the record, the lowest payload bit (Prophesee's
                        # reader masks 0x10000000).
                        yield ev["x"], ev["y"], ev["t"], ev["payload"] & 1
        except RuntimeError as e:
            raise EventFileError(f"{path}: corrupt DAT data ({e})") from e

    return Recording(sensor, "us", chunks())


# --------------------------------------------------------------------------------------------
# HDF5: Prophesee (compound CD/events), DSEC (events/x, y, t, p + t_offset) or plain columns.


def _h5py(path: str) -> Any:
    import h5py

    try:  # registers the compression filters (Blosc, Zstd, LZ4, ...) that datasets use
        importlib.import_module("hdf5plugin")
    except ImportError:
        pass
    return h5py


def _check_filters(path: str, h5py: Any, name: str, ds: Any) -> None:
    """Raises naming what to install when a dataset's compression filter is not available."""
    plist = ds.id.get_create_plist()
    for i in range(plist.get_nfilters()):
        code, _, _, filter_name = plist.get_filter(i)
        if h5py.h5z.filter_avail(code):
            continue
        label = f"{filter_name.decode(errors='replace') or 'unnamed'} (id {code})"
        if code == _H5Z_FILTER_ECF:
            fix = ("Prophesee's ECF codec is not in hdf5plugin: install Prophesee's hdf5_ecf "
                   "plugin and point HDF5_PLUGIN_PATH at it")
        else:
            try:
                importlib.import_module("hdf5plugin")
                fix = "no installed HDF5 plugin provides it"
            except ImportError:
                fix = "install the filters with: pip install 'evclip_jax[hdf5]'"
        raise EventFileError(f"{path}: dataset '{name}' is compressed with HDF5 filter {label}, "
                             f"which is not available; {fix}")


def _h5_unit(path: str, name: str, ds: Any) -> str | None:
    for attr in _H5_UNIT_ATTRS:
        if attr in ds.attrs:
            value = ds.attrs[attr]
            return canonical_time_unit(
                value.item() if isinstance(value, np.ndarray) else value,
                f"{path}: attribute '{attr}' of dataset '{name}'")
    return None


def open_hdf5(path: str) -> Recording:
    """HDF5 events in one of three layouts, told apart by their dataset names:

    - Prophesee (Metavision): compound dataset ``CD/events`` (x, y, p, t us), root attribute
      ``geometry`` = "WxH";
    - DSEC: ``events/x, y, t, p`` with t in microseconds from the root scalar ``t_offset``;
    - plain: datasets x, y, t, p at the root, t in the unit of its ``unit`` attribute.
    """
    h5py = _h5py(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise EventFileError(f"{path}: not a readable HDF5 file ({e})") from e
    with f:
        cd = f.get("CD")
        if isinstance(cd, h5py.Group) and isinstance(cd.get("events"), h5py.Dataset):
            return _open_prophesee_h5(path, h5py, f)
        group = f
        if not all(k in f for k in "xytp") and isinstance(f.get("events"), h5py.Group):
            group = f["events"]
        prefix = "" if group is f else "events/"
        missing = [k for k in "xytp" if not isinstance(group.get(k), h5py.Dataset)]
        if missing:
            found: list[str] = []
            f.visititems(lambda name, obj: found.append(name)
                         if isinstance(obj, h5py.Dataset) else None)
            raise EventFileError(
                f"{path}: missing datasets {[prefix + k for k in missing]}; expected datasets "
                f"x, y, t, p at the root or in a group 'events' (DSEC layout), or a compound "
                f"dataset 'CD/events' (Prophesee layout); found {found}")
        shapes = {prefix + k: group[k].shape for k in "xytp"}
        if any(len(s) != 1 for s in shapes.values()) or len(set(shapes.values())) != 1:
            raise EventFileError(f"{path}: datasets x, y, t, p have shapes {shapes}; expected "
                                 "1-D datasets of equal length")
        for k in "xytp":
            _check_filters(path, h5py, prefix + k, group[k])
        unit = _h5_unit(path, prefix + "t", group["t"])
        t_offset = None
        if isinstance(f.get("t_offset"), h5py.Dataset):
            t_offset = f["t_offset"][()]
            if np.ndim(t_offset) != 0 or np.asarray(t_offset).dtype.kind not in "iuf":
                raise EventFileError(f"{path}: dataset 't_offset' holds {t_offset!r}; "
                                     "expected one number (DSEC's time offset)")

    def chunks() -> Iterator[Columns]:
        with h5py.File(path, "r") as h:
            g = h[prefix] if prefix else h
            n = g["t"].shape[0]
            for start in range(0, n, _H5_CHUNK_EVENTS):
                x, y, t, p = (g[k][start:start + _H5_CHUNK_EVENTS] for k in "xytp")
                if t_offset is not None:
                    t = _offset_times(t, t_offset)
                yield x, y, t, p

    return Recording(None, unit, chunks())


def _offset_times(t: np.ndarray, t_offset: Any) -> np.ndarray:
    """DSEC's t + t_offset, in integers when both are integers (no float rounding)."""
    if t.dtype.kind in "iu" and np.asarray(t_offset).dtype.kind in "iu":
        return t.astype(np.int64) + np.int64(t_offset)
    return t.astype(np.float64) + float(t_offset)


def _open_prophesee_h5(path: str, h5py: Any, f: Any) -> Recording:
    ds = f["CD/events"]
    fields = ds.dtype.names or ()
    missing = [k for k in "xytp" if k not in fields]
    if missing or ds.ndim != 1:
        raise EventFileError(f"{path}: dataset 'CD/events' has fields {list(fields)} and shape "
                             f"{ds.shape}; expected a 1-D compound dataset with fields x, y, "
                             f"p, t (Prophesee layout)")
    _check_filters(path, h5py, "CD/events", ds)
    sensor = None
    if "geometry" in f.attrs:
        geometry = f.attrs["geometry"]
        geometry = geometry.decode() if isinstance(geometry, bytes) else str(geometry)
        width, sep, height = geometry.partition("x")
        if not sep:
            raise EventFileError(f"{path}: root attribute 'geometry' is {geometry!r}; expected "
                                 "'WxH'")
        sensor = _header_size(path, width, height)

    def chunks() -> Iterator[Columns]:
        with h5py.File(path, "r") as h:
            events = h["CD/events"]
            for start in range(0, events.shape[0], _H5_CHUNK_EVENTS):
                block = events[start:start + _H5_CHUNK_EVENTS]
                yield block["x"], block["y"], block["t"], block["p"]

    return Recording(sensor, "us", chunks())
