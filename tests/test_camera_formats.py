"""Camera recordings: files written by faery (an independent writer) and by h5py in the DSEC and
Prophesee layouts read back exactly; byte streams built by hand from Prophesee's EVT 2.0, EVT 3.0
and DAT specifications; time windows; missing readers; every bad file named with what was
expected."""

import struct
import subprocess
import sys
import tracemalloc

import faery
import h5py
import hdf5plugin
import numpy as np
import pytest

from evclip_jax.events import (
    EVENT_DTYPE,
    EventFileError,
    camera_formats,
    iter_event_windows,
    read_events,
    read_sensor_size,
)
from evclip_jax.events.io import detect_format

SENSOR = (260, 346)  # (H, W) of a DAVIS346


def _camera_events(n: int, seed: int = 0, t0: int = 1_000_000, span: int = 40_000_000):
    """Sorted events over ``span`` us from ``t0``: longer than EVT3's 24-bit time (16.7 s), with
    a burst of same-time events along one row and both sensor corners."""
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, EVENT_DTYPE)
    ev["x"] = rng.integers(0, SENSOR[1], n)
    ev["y"] = rng.integers(0, SENSOR[0], n)
    ev["t"] = np.sort(rng.integers(t0, t0 + span, n))
    ev["p"] = rng.integers(0, 2, n)
    if n >= 48:
        burst = slice(n // 2, n // 2 + 24)
        ev["t"][burst] = ev["t"][n // 2]
        ev["y"][burst] = 7
        ev["x"][burst] = np.arange(100, 124)
    ev["x"][0], ev["y"][0] = SENSOR[1] - 1, SENSOR[0] - 1
    ev["x"][-1], ev["y"][-1] = 0, 0
    return ev


def _faery_write(path, ev, **kwargs):
    arr = np.zeros(len(ev), faery.EVENTS_DTYPE)
    arr["t"], arr["x"], arr["y"] = ev["t"], ev["x"], ev["y"]
    arr["on"] = ev["p"].astype(bool)
    stream = faery.events_stream_from_array(arr, dimensions=(SENSOR[1], SENSOR[0]))
    stream.to_file(str(path), **kwargs)
    return path


def _assert_events_equal(got, want):
    assert got.dtype == EVENT_DTYPE and len(got) == len(want)
    for name in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _raises(path, match, *args, **kwargs):
    with pytest.raises(EventFileError) as info:
        read_events(path, *args, **kwargs)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    for m in match:
        assert m in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# Files written by faery.

FAERY_FILES = [
    # (file name, faery writer kwargs, format)
    ("rec.aedat4", {}, "aedat4"),
    ("rec.raw", {"version": "evt3"}, "evt"),
    ("rec_evt2.raw", {"version": "evt2"}, "evt"),
    ("rec.dat", {}, "dat"),
]


@pytest.mark.parametrize("name,kwargs,fmt", FAERY_FILES)
def test_faery_recordings_read_back(tmp_path, name, kwargs, fmt):
    ev = _camera_events(30_000)
    path = _faery_write(tmp_path / name, ev, **kwargs)
    assert detect_format(path) == fmt
    assert read_sensor_size(path) == SENSOR
    _assert_events_equal(read_events(path), ev)
    _assert_events_equal(read_events(path, format=fmt, sensor_size=SENSOR, time_unit="us"), ev)
    # A renamed file is recognised by its first bytes.
    renamed = tmp_path / "recording.bytes"
    renamed.write_bytes(path.read_bytes())
    assert detect_format(renamed) == fmt
    # A sensor size that contradicts the header is refused.
    _raises(path, ["header gives sensor (H, W) = (260, 346)", "(480, 640)"],
            sensor_size=(480, 640))


def test_aedat_extension_holding_aedat4(tmp_path):
    ev = _camera_events(500, span=100_000)
    path = _faery_write(tmp_path / "a.aedat4", ev)
    legacy = tmp_path / "b.aedat"
    legacy.write_bytes(path.read_bytes())
    assert detect_format(legacy) == "aedat4"
    _assert_events_equal(read_events(legacy), ev)


# ---------------------------------------------------------------------------------------------
# Byte streams built by hand from Prophesee's format specifications.


def _evt3(*words):
    return struct.pack(f"<{len(words)}H", *words)


def test_evt3_hand_built(tmp_path):
    # Word type in bits 15-12: 0x8 TIME_HIGH (t[23:12]), 0x6 TIME_LOW (t[11:0]), 0x0 ADDR_Y,
    # 0x2 ADDR_X (bit 11 = polarity), 0x3 VECT_BASE_X (bit 11 = polarity), 0x4 VECT_12 (bit k
    # = an event at base x + k).
    data = _evt3(0x8000 | 1, 0x6000 | 5,          # t = 1 * 4096 + 5 = 4101
                 0x0000 | 3, 0x2000 | 1 << 11 | 2,  # (x 2, y 3, ON)
                 0x6000 | 10,                      # t = 4106
                 0x3000 | 4, 0x4000 | 0b101,       # OFF events at x = 4 and x = 6, y 3
                 0x8000 | 2, 0x6000 | 1,           # t = 2 * 4096 + 1 = 8193
                 0x0000 | 1, 0x2000 | 7)           # (x 7, y 1, OFF)
    path = tmp_path / "hand.raw"
    path.write_bytes(b"% evt 3.0\n% format EVT3;height=4;width=8\n% end\n" + data)
    assert read_events(path).tolist() == [(2, 3, 4101, 1), (4, 3, 4106, 0), (6, 3, 4106, 0),
                                          (7, 1, 8193, 0)]
    assert read_sensor_size(path) == (4, 8)


def test_evt2_hand_built(tmp_path):
    # 32-bit words: type in bits 31-28 (0 CD_OFF, 1 CD_ON, 8 TIME_HIGH = t[33:6]); a CD word holds
    # t[5:0] in bits 27-22, x in bits 21-11, y in bits 10-0.
    def cd(on, t_low, x, y):
        return on << 28 | t_low << 22 | x << 11 | y

    words = [8 << 28 | 100, cd(1, 5, 2, 3), cd(0, 63, 7, 0), 8 << 28 | 101, cd(1, 0, 1, 1)]
    path = tmp_path / "hand2.raw"
    path.write_bytes(b"% evt 2.0\n% geometry 8x4\n% end\n" + struct.pack("<5I", *words))
    # t = 100 * 64 + 5, 100 * 64 + 63, 101 * 64.
    assert read_events(path).tolist() == [(2, 3, 6405, 1), (7, 0, 6463, 0), (1, 1, 6464, 1)]
    assert read_sensor_size(path) == (4, 8)


def test_dat_hand_built(tmp_path):
    # After the header: event type (12 = CD) and size (8) bytes, then little-endian uint32 t and
    # uint32 x | y << 14 | p << 28 per event.
    records = [(10, 2 | 3 << 14 | 1 << 28), (20, 7), (2**32 - 1, 1 | 1 << 14 | 1 << 28)]
    path = tmp_path / "hand.dat"
    path.write_bytes(b"% Version 2\n% Width 8\n% Height 4\n" + bytes([12, 8])
                     + b"".join(struct.pack("<II", t, d) for t, d in records))
    assert read_events(path).tolist() == [(2, 3, 10, 1), (7, 0, 20, 0), (1, 1, 2**32 - 1, 1)]
    assert read_sensor_size(path) == (4, 8)
    # Type 0 (Event2D, ATIS-era files) has the same record layout.
    event_2d = tmp_path / "hand_2d.dat"
    data = path.read_bytes()
    offset = data.index(bytes([12, 8]))
    event_2d.write_bytes(data[:offset] + bytes([0, 8]) + data[offset + 2:])
    assert read_events(event_2d).tolist() == read_events(path).tolist()


# ---------------------------------------------------------------------------------------------
# HDF5 written with h5py directly: DSEC and Prophesee layouts.


def _write_dsec(path, ev, t_offset, compression=None):
    """DSEC's events.h5: events/{x, y, t, p} with t in us from the root scalar t_offset, and
    ms_to_idx[k] = index of the first event at or after k ms."""
    t_rel = (ev["t"] - t_offset).astype(np.uint32)
    with h5py.File(path, "w") as f:
        kw = {} if compression is None else dict(compression)
        g = f.create_group("events")
        g.create_dataset("x", data=ev["x"], **kw)
        g.create_dataset("y", data=ev["y"], **kw)
        g.create_dataset("t", data=t_rel, **kw)
        g.create_dataset("p", data=ev["p"].astype(np.uint8), **kw)
        f["t_offset"] = np.int64(t_offset)
        f["ms_to_idx"] = np.searchsorted(t_rel, np.arange(0, int(t_rel[-1]) // 1000 + 1) * 1000)
    return path


def test_dsec_layout(tmp_path):
    ev = _camera_events(20_000, span=3_000_000, t0=52_431_112_000)
    path = _write_dsec(tmp_path / "events.h5", ev, t_offset=52_431_111_000,
                       compression=hdf5plugin.Blosc(cname="zstd", clevel=5))
    with h5py.File(path) as f:  # the file really is Blosc-compressed
        assert f["events/t"].id.get_create_plist().get_filter(0)[0] == hdf5plugin.BLOSC_ID
    assert read_sensor_size(path) is None  # DSEC stores none
    _assert_events_equal(read_events(path), ev)


def test_prophesee_h5_layout(tmp_path):
    ev = _camera_events(5_000)
    cd = np.zeros(len(ev), dtype={"names": ["x", "y", "p", "t"],
                                  "formats": ["<u2", "<u2", "<i2", "<i8"],
                                  "offsets": [0, 2, 4, 8], "itemsize": 16})
    for k in "xytp":
        cd[k] = ev[k]
    path = tmp_path / "rec.hdf5"
    with h5py.File(path, "w") as f:
        f.attrs["version"] = "1.0"
        f.attrs["geometry"] = f"{SENSOR[1]}x{SENSOR[0]}"
        f.create_group("CD").create_dataset("events", data=cd, compression="gzip")
    assert read_sensor_size(path) == SENSOR
    _assert_events_equal(read_events(path), ev)


# ---------------------------------------------------------------------------------------------
# Time windows.


def _check_windows(windows, ev, window_us):
    t0 = int(ev["t"][0])
    assert len(windows) == (int(ev["t"][-1]) - t0) // window_us + 1
    for k, w in enumerate(windows):
        assert w.dtype == EVENT_DTYPE
        if len(w):
            assert t0 + k * window_us <= w["t"].min() and w["t"].max() < t0 + (k + 1) * window_us
    _assert_events_equal(np.concatenate(windows), ev)


def test_windows_of_a_raw_file(tmp_path):
    ev = _camera_events(20_000, span=2_000_000)
    path = _faery_write(tmp_path / "w.raw", ev, version="evt3")
    windows = list(iter_event_windows(path, 1_000))  # 1 ms windows over many faery packets
    _check_windows(windows, ev, 1_000)
    assert sum(1 for w in windows if len(w) == 0) > 0  # empty windows keep their place
    with pytest.raises(ValueError, match=r"w\.raw.*window_us"):
        next(iter_event_windows(path, 0))


def test_windows_stitch_hdf5_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(camera_formats, "_H5_CHUNK_EVENTS", 777)
    ev = _camera_events(20_000, span=3_000_000)
    path = _write_dsec(tmp_path / "events.h5", ev, t_offset=500_000)
    for window_us in (7_000, 1_000_000, 10**9):  # windows within one chunk, across many, all
        _check_windows(list(iter_event_windows(path, window_us)), ev, window_us)


def test_windows_do_not_load_the_file_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(camera_formats, "_H5_CHUNK_EVENTS", 20_000)
    n = 1_000_000
    ev = _camera_events(n, span=10_000_000)
    path = _write_dsec(tmp_path / "big.h5", ev, t_offset=0)
    whole_bytes = n * EVENT_DTYPE.itemsize  # 13 MB
    assert read_sensor_size(path) is None  # imports done before memory is traced
    tracemalloc.start()
    try:
        count = 0
        for window in iter_event_windows(path, 10_000):
            count += len(window)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < whole_bytes / 4, (peak, whole_bytes)


# ---------------------------------------------------------------------------------------------
# Missing optional readers name the extra to install.


def test_missing_readers_name_their_extra(tmp_path, monkeypatch):
    ev = _camera_events(100, span=10_000)
    aedat4 = _faery_write(tmp_path / "m.aedat4", ev)
    raw = _faery_write(tmp_path / "m.raw", ev, version="evt3")
    dat = _faery_write(tmp_path / "m.dat", ev)
    monkeypatch.setitem(sys.modules, "aedat", None)
    monkeypatch.setitem(sys.modules, "faery.extension", None)
    for path, extra in ((aedat4, "aedat4"), (raw, "prophesee"), (dat, "prophesee")):
        with pytest.raises(ImportError) as info:
            read_events(path)
        msg = str(info.value)
        assert msg.startswith(str(path)) and f"pip install 'evclip_jax[{extra}]'" in msg, msg
    # The header alone needs no decoder.
    assert read_sensor_size(raw) == SENSOR


def test_missing_hdf5_filters_name_their_extra(tmp_path):
    ev = _camera_events(100, span=10_000)
    path = _write_dsec(tmp_path / "blosc.h5", ev, t_offset=0,
                       compression=hdf5plugin.Blosc(cname="lz4"))
    # A fresh interpreter where hdf5plugin cannot be imported, so its filters are not loaded.
    code = ("import sys; sys.modules['hdf5plugin'] = None\n"
            "from evclip_jax.events import read_events, EventFileError\n"
            f"try:\n    read_events({str(path)!r})\n"
            "except EventFileError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.startswith(str(path)), out
    assert "dataset 'events/x'" in out and "blosc" in out.lower(), out
    assert "pip install 'evclip_jax[hdf5]'" in out, out


# ---------------------------------------------------------------------------------------------
# Bad files: truncated, wrong header, wrong dataset names, unknown unit.


def test_truncated_recordings(tmp_path):
    ev = _camera_events(20_000, span=2_000_000)
    cases = {
        "t.aedat4": (-3000, ["truncated or corrupt AEDAT4", "complete packets"]),
        "t.raw": (-1, ["EVT3 data of", "multiple of its 2-byte words", "truncated"]),
        "t.dat": (-5, ["DAT data of", "multiple of 8 bytes", "truncated"]),
    }
    for name, (cut, match) in cases.items():
        full = _faery_write(tmp_path / f"full_{name}", ev)
        path = tmp_path / name
        path.write_bytes(full.read_bytes()[:cut])
        _raises(path, match)
    evt2 = _faery_write(tmp_path / "full2.raw", ev, version="evt2")
    path = tmp_path / "t2.raw"
    path.write_bytes(evt2.read_bytes()[:-2])
    _raises(path, ["EVT2 data of", "4-byte words"])
    path = tmp_path / "header_only.raw"
    path.write_bytes(b"% evt 3.0\n% geometry 8x4")  # cut inside the header
    _raises(path, ["no line end", "truncated inside its header"])
    path = tmp_path / "t.h5"
    full = _write_dsec(tmp_path / "full.h5", ev, t_offset=0)
    path.write_bytes(full.read_bytes()[:4000])
    _raises(path, ["not a readable HDF5 file"])


def test_wrong_headers(tmp_path):
    ev = _camera_events(1_000, span=100_000)
    aedat4 = _faery_write(tmp_path / "ok.aedat4", ev).read_bytes()
    path = tmp_path / "v3.aedat4"
    path.write_bytes(b"#!AER-DAT3.1\r\n" + aedat4[14:])
    _raises(path, ["expected an AEDAT4 file starting with", "#!AER-DAT4.0", "AER-DAT3.1"])

    payload = _evt3(0x8000 | 1, 0x6000 | 5, 0x0000 | 3, 0x2000 | 2)
    path = tmp_path / "v4.raw"
    path.write_bytes(b"% evt 4.0\n% end\n" + payload)
    _raises(path, ["'evt 4.0'", "expected EVT version 2.0, 3.0"])
    path = tmp_path / "v21.raw"
    path.write_bytes(b"% format EVT21;height=4;width=8\n% end\n" + payload)
    _raises(path, ["'format EVT21'", "expected one of EVT2, EVT3"])
    path = tmp_path / "noversion.raw"
    path.write_bytes(b"% geometry 346x260\n% end\n" + payload)
    _raises(path, ["no EVT version", "'% evt 3.0'"])
    path = tmp_path / "badgeom.raw"
    path.write_bytes(b"% evt 3.0\n% geometry widexhigh\n% end\n" + payload)
    _raises(path, ["sensor size widexhigh", "two integers"])

    path = tmp_path / "nohead.dat"
    path.write_bytes(bytes(16))
    _raises(path, ["expected a Prophesee DAT header"])
    path = tmp_path / "v9.dat"
    path.write_bytes(b"% Version 9\n" + bytes([12, 8]) + bytes(8))
    _raises(path, ["'Version 9'", "expected DAT version 1 or 2"])
    path = tmp_path / "size.dat"
    path.write_bytes(b"% Version 2\n" + bytes([12, 16]) + bytes(16))
    _raises(path, ["DAT event type 12 of 16 bytes", "of 8 bytes"])

    path = tmp_path / "geom.hdf5"
    with h5py.File(path, "w") as f:
        f.attrs["geometry"] = "640-480"
        f.create_group("CD").create_dataset("events", data=np.zeros(3, [("x", "<u2"),
                                                                         ("y", "<u2")]))
    _raises(path, ["'CD/events' has fields ['x', 'y']", "fields x, y, p, t"])
    with h5py.File(path, "a") as f:
        del f["CD/events"]
        f["CD"].create_dataset("events", data=np.zeros(3, [("x", "<u2"), ("y", "<u2"),
                                                            ("p", "<i2"), ("t", "<i8")]))
    _raises(path, ["attribute 'geometry' is '640-480'", "'WxH'"])


def test_wrong_dataset_names_and_units(tmp_path):
    path = tmp_path / "names.h5"
    with h5py.File(path, "w") as f:  # an ESIM / E2VID style file: xs, ys, ts, ps
        g = f.create_group("events")
        for k in ("xs", "ys", "ts", "ps"):
            g[k] = np.zeros(3)
    _raises(path, ["missing datasets ['events/x', 'events/y', 'events/t', 'events/p']",
                   "expected datasets x, y, t, p", "'CD/events'", "events/xs"])
    path = tmp_path / "unit.h5"
    ev = _camera_events(10, span=1_000)
    _write_dsec(path, ev, t_offset=0)
    with h5py.File(path, "a") as f:
        f["events/t"].attrs["units"] = "jiffies"
    _raises(path, ["attribute 'units' of dataset 'events/t'", "'jiffies'", "s, ms, us, ns"])
    path = tmp_path / "lengths.h5"
    with h5py.File(path, "w") as f:
        f["x"], f["y"], f["t"], f["p"] = np.zeros(3), np.zeros(3), np.zeros(2), np.zeros(3)
    _raises(path, ["shapes", "1-D datasets of equal length"])
    path = tmp_path / "offset.h5"
    _write_dsec(path, ev, t_offset=0)
    with h5py.File(path, "a") as f:
        del f["t_offset"]
        f["t_offset"] = np.arange(2)
    _raises(path, ["'t_offset'", "expected one number"])
