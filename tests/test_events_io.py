"""Event file readers/writers: round trips, hand-built bytes, and every bad-input error."""

import struct

import h5py
import numpy as np
import pytest

from evclip_jax.events import EVENT_DTYPE, EventFileError, read_events, write_events
from evclip_jax.events.io import detect_format


def _random_events(n, width, height, max_t, seed=0):
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    ev["x"] = rng.integers(0, width, n)
    ev["y"] = rng.integers(0, height, n)
    ev["t"] = np.sort(rng.integers(0, max_t, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


def _assert_events_equal(got, want):
    assert got.dtype == EVENT_DTYPE
    assert len(got) == len(want)
    for name in ("x", "y", "t", "p"):
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# Round trips: reader(writer(ev)) == ev for every format.

ROUND_TRIPS = [
    # (file name, format or None, writer kwargs, width, height, max_t)
    ("a.bin", None, {}, 256, 240, 1 << 23),  # y = 240 is the .bin overflow marker
    ("a.aedat", None, {}, 128, 128, 1 << 32),
    ("a.npz", None, {}, 640, 480, 1 << 40),
    ("a.npz", "nimagenet_npz", {"layout": "event_data"}, 640, 480, 1 << 40),
    ("a.npz", "nimagenet_npz", {"layout": "x_pos"}, 640, 480, 1 << 40),
    ("a.h5", None, {}, 1280, 720, 1 << 40),
    ("a.hdf5", "h5", {}, 1280, 720, 1 << 40),
]


@pytest.mark.parametrize("name,fmt,kwargs,width,height,max_t", ROUND_TRIPS)
def test_round_trip(tmp_path, name, fmt, kwargs, width, height, max_t):
    ev = _random_events(200, width, height, max_t)
    # Make the extreme values of each field appear.
    ev["x"][0], ev["y"][0], ev["t"][-1] = width - 1, height - 1, max_t - 1
    path = tmp_path / name
    write_events(path, ev, format=fmt, **kwargs)
    _assert_events_equal(read_events(path), ev)
    _assert_events_equal(read_events(str(path), format=fmt or detect_format(path)), ev)


def test_detected_formats(tmp_path):
    ev = _random_events(10, 100, 100, 1000)
    write_events(tmp_path / "g.npz", ev)
    write_events(tmp_path / "n.npz", ev, format="nimagenet_npz")
    write_events(tmp_path / "p.npz", ev, format="nimagenet_npz", layout="x_pos")
    assert detect_format(tmp_path / "g.npz") == "npz"
    assert detect_format(tmp_path / "n.npz") == "nimagenet_npz"
    assert detect_format(tmp_path / "p.npz") == "nimagenet_npz"
    # Unknown extensions fall back to the magic bytes.
    for src, fmt, want in (("a.aedat", None, "aedat2"), ("a.h5", None, "h5"),
                           ("a.npz", "nimagenet_npz", "nimagenet_npz")):
        write_events(tmp_path / src, ev, format=fmt)
        renamed = tmp_path / f"{src}.events"
        renamed.write_bytes((tmp_path / src).read_bytes())
        assert detect_format(renamed) == want
        _assert_events_equal(read_events(renamed), ev)


# ---------------------------------------------------------------------------------------------
# Hand-built bytes, checked field by field.


def test_bin_hand_built(tmp_path):
    # (x, y, p, t) -> 5 bytes: x, y, p<<7 | t[22:16], t[15:8], t[7:0] (big-endian bit fields).
    events = [(3, 17, 1, 0x012345), (33, 33, 1, 0x7F0000 + 7), (255, 0, 0, (1 << 23) - 1)]
    data = b""
    for x, y, p, t in events:
        data += bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF])
    path = tmp_path / "hand.bin"
    path.write_bytes(data)
    ev = read_events(path)
    assert ev.dtype == EVENT_DTYPE and len(ev) == 3
    for i, (x, y, p, t) in enumerate(events):
        assert (int(ev["x"][i]), int(ev["y"][i]), int(ev["p"][i]), int(ev["t"][i])) == (x, y, p, t)
    # The second byte triple of event 0 spelled out: 0x80 | 0x01, 0x23, 0x45.
    assert data[2:5] == b"\x81\x23\x45"
    # The writer produces exactly these bytes.
    write_events(tmp_path / "again.bin", ev)
    assert (tmp_path / "again.bin").read_bytes() == data


def test_aedat_hand_built(tmp_path):
    # Address bits: p = bit 0, x = bits 1-7, y = bits 8-14 (METHOD.md); bit 15 and the high
    # half are not part of x, y or p and must be masked away.
    events = [(5, 9, 1, 10), (0, 64, 1, 2**31), (127, 127, 0, 2**32 - 1)]
    header = b"#!AER-DAT2.0\r\n# made by hand\r\n#\r\n"
    payload = b""
    for k, (x, y, p, t) in enumerate(events):
        addr = (y << 8) | (x << 1) | p
        if k == 1:
            addr |= 0x8000 | 0x00010000  # noise outside the field masks
        payload += struct.pack(">II", addr, t)
    path = tmp_path / "hand.aedat"
    path.write_bytes(header + payload)
    ev = read_events(path)
    assert len(ev) == 3
    for i, (x, y, p, t) in enumerate(events):
        assert (int(ev["x"][i]), int(ev["y"][i]), int(ev["p"][i]), int(ev["t"][i])) == (x, y, p, t)
    # First pair's bytes spelled out: address 0x0000090B, timestamp 0x0000000A.
    assert payload[:8] == b"\x00\x00\x09\x0b\x00\x00\x00\x0a"
    # Our writer's file starts with the AEDAT 2.0 magic line.
    write_events(tmp_path / "w.aedat", ev[:2])
    assert (tmp_path / "w.aedat").read_bytes().startswith(b"#!AER-DAT2.0\r\n")


def test_nimagenet_event_data_hand_built(tmp_path):
    dt = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8"), ("p", "?")])
    data = np.array([(639, 0, 5, True), (1, 479, 6, False), (320, 240, 6, True)], dtype=dt)
    path = tmp_path / "n_event_data.npz"
    np.savez(path, event_data=data)
    ev = read_events(path)
    assert list(ev["x"]) == [639, 1, 320]
    assert list(ev["y"]) == [0, 479, 240]
    assert list(ev["t"]) == [5, 6, 6]
    assert list(ev["p"]) == [1, 0, 1]


def test_nimagenet_pos_keys_hand_built(tmp_path):
    path = tmp_path / "n_pos.npz"
    # Signed polarity -1/1 maps to 0/1.
    np.savez(path, x_pos=np.array([10, 20], np.int32), y_pos=np.array([30, 40], np.int32),
             timestamp=np.array([1000, 2500], np.int64), polarity=np.array([-1, 1], np.int8))
    ev = read_events(path)
    assert list(ev["x"]) == [10, 20] and list(ev["y"]) == [30, 40]
    assert list(ev["t"]) == [1000, 2500] and list(ev["p"]) == [0, 1]
    assert read_events(path, format="nimagenet_npz").tolist() == ev.tolist()


def test_generic_npz_and_h5_group_hand_built(tmp_path):
    path = tmp_path / "g.npz"
    np.savez(path, x=np.array([1.0, 2.0]), y=np.array([3, 4], np.uint8),
             t=np.array([7.0, 9.0]), p=np.array([1, -1]))
    ev = read_events(path, time_unit="us")
    assert ev.tolist() == [(1, 3, 7, 1), (2, 4, 9, 0)]

    h5 = tmp_path / "group.h5"
    with h5py.File(h5, "w") as f:
        g = f.create_group("events")
        g["x"], g["y"] = np.array([5, 6]), np.array([7, 8])
        g["t"], g["p"] = np.array([100, 200]), np.array([0, 1], np.uint8)
    assert read_events(h5).tolist() == [(5, 7, 100, 0), (6, 8, 200, 1)]


# ---------------------------------------------------------------------------------------------
# Bad inputs: every message names the file.


def _raises(path, *args, match=None, **kwargs):
    with pytest.raises(EventFileError) as info:
        read_events(path, *args, **kwargs)
    msg = str(info.value)
    assert path.name in msg, msg
    assert msg.startswith(str(path)), msg
    if match:
        for m in match if isinstance(match, (list, tuple)) else [match]:
            assert m in msg, msg
    return msg


def test_bin_length_not_multiple_of_5(tmp_path):
    path = tmp_path / "trunc.bin"
    path.write_bytes(bytes(12))
    _raises(path, match="multiple of 5")


def test_aedat_truncated_payload(tmp_path):
    path = tmp_path / "trunc.aedat"
    path.write_bytes(b"#!AER-DAT2.0\r\n" + struct.pack(">II", 2, 3) + b"\x00\x01\x02\x03")
    _raises(path, match="multiple of 8")


def test_aedat_other_version(tmp_path):
    path = tmp_path / "v3.aedat"
    path.write_bytes(b"#!AER-DAT3.1\r\n" + bytes(8))
    _raises(path, match="AEDAT 2.0")


def test_missing_fields(tmp_path):
    gen = tmp_path / "gen.npz"
    np.savez(gen, x=np.zeros(2), y=np.zeros(2), ts=np.zeros(2))
    _raises(gen, match=["'t'", "'p'", "ts"])

    dt = np.dtype([("x", "<u2"), ("y", "<u2"), ("t", "<i8")])
    nim = tmp_path / "nim.npz"
    np.savez(nim, event_data=np.zeros(2, dt))
    _raises(nim, match=["'p'", "event_data"])

    pos = tmp_path / "pos.npz"
    np.savez(pos, x_pos=np.zeros(2), y_pos=np.zeros(2), timestamp=np.zeros(2))
    _raises(pos, match=["'polarity'", "x_pos"])

    h5 = tmp_path / "bad.h5"
    with h5py.File(h5, "w") as f:
        f["x"], f["y"], f["t"] = np.zeros(2), np.zeros(2), np.zeros(2)
    _raises(h5, match=["'p'", "x"])

    # Forcing N-ImageNet on a generic file names the expected keys.
    good = tmp_path / "good.npz"
    write_events(good, _random_events(3, 10, 10, 10))
    _raises(good, "nimagenet_npz", match="x_pos")


def test_empty_streams(tmp_path):
    cases = {"e.bin": b"", "e.aedat": b"#!AER-DAT2.0\r\n# nothing\r\n"}
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        _raises(path, match="no events")
        ev = read_events(path, allow_empty=True)
        assert ev.dtype == EVENT_DTYPE and len(ev) == 0
    path = tmp_path / "e.npz"
    write_events(path, np.zeros(0, EVENT_DTYPE))
    _raises(path, match="no events")
    assert len(read_events(path, allow_empty=True)) == 0


def test_nan_timestamps(tmp_path):
    path = tmp_path / "nan.npz"
    np.savez(path, x=np.zeros(3), y=np.zeros(3), t=np.array([0.0, np.nan, 2.0]), p=np.ones(3))
    _raises(path, time_unit="s", match="NaN")


def test_decreasing_timestamps(tmp_path):
    data = bytes([1, 1, 0, 0, 9]) + bytes([1, 1, 0, 0, 5])  # t = 9 then 5
    path = tmp_path / "unsorted.bin"
    path.write_bytes(data)
    _raises(path, match=["decrease", "9 -> 5"])
    assert read_events(path, check_sorted=False)["t"].tolist() == [9, 5]


def test_coordinates_outside_sensor(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(bytes([40, 3, 0, 0, 1]) + bytes([2, 30, 0, 0, 2]))
    _raises(path, sensor_size=(34, 34), match=["max x = 40", "(34, 34)"])
    assert len(read_events(path, sensor_size=(34, 41))) == 2


def test_bad_polarity_and_coordinates(tmp_path):
    path = tmp_path / "pol.npz"
    np.savez(path, x=np.zeros(2), y=np.zeros(2), t=np.arange(2), p=np.array([0, 2]))
    _raises(path, match="polarity")
    path = tmp_path / "neg.npz"
    np.savez(path, x=np.array([-1, 0]), y=np.zeros(2), t=np.arange(2), p=np.zeros(2))
    _raises(path, match="'x'")
    path = tmp_path / "frac.npz"
    np.savez(path, x=np.array([0.5, 0]), y=np.zeros(2), t=np.arange(2), p=np.zeros(2))
    _raises(path, match="non-integer")


def test_corrupt_and_unknown_files(tmp_path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"this is not a zip archive")
    _raises(path, match="npz")
    path = tmp_path / "corrupt.h5"
    path.write_bytes(b"not hdf5")
    _raises(path, match="HDF5")
    path = tmp_path / "mystery.xyz"
    path.write_bytes(b"\x00\x01\x02\x03")
    _raises(path, match="format")
    with pytest.raises(ValueError, match="mystery.xyz.*aedat2"):
        read_events(path, format="aedat")


def test_writer_validation(tmp_path):
    ev = _random_events(5, 10, 10, 100)
    bad = ev.copy()
    bad["x"][2] = 300
    with pytest.raises(ValueError, match=r"big\.bin.*'x'.*\[0, 255\]"):
        write_events(tmp_path / "big.bin", bad)
    bad = ev.copy()
    bad["t"][-1] = 1 << 23
    with pytest.raises(ValueError, match=r"late\.bin.*'t'"):
        write_events(tmp_path / "late.bin", bad)
    bad = ev.copy()
    bad["y"][0] = 128
    with pytest.raises(ValueError, match=r"big\.aedat.*'y'.*\[0, 127\]"):
        write_events(tmp_path / "big.aedat", bad)
    bad = ev.copy()
    bad["p"][0] = -1
    with pytest.raises(ValueError, match=r"pol\.npz.*'p'"):
        write_events(tmp_path / "pol.npz", bad)
    with pytest.raises(ValueError, match=r"plain\.npz.*fields x, y, t, p"):
        write_events(tmp_path / "plain.npz", np.zeros((5, 4)))
    with pytest.raises(ValueError, match=r"lay\.npz.*layout"):
        write_events(tmp_path / "lay.npz", ev, format="nimagenet_npz", layout="columns")
    with pytest.raises(ValueError, match=r"what\.txt.*format"):
        write_events(tmp_path / "what.txt", ev)


# ---------------------------------------------------------------------------------------------
# Timestamps carry a unit (issue 11, bad case 5): floats without one are refused.


def test_float_seconds_are_refused_without_a_unit(tmp_path):
    # The probe's case: 100 events over 0.5 s stored as float seconds.
    t = np.linspace(0.0, 0.5, 100)
    path = tmp_path / "seconds.npz"
    np.savez(path, x=np.zeros(100, np.int32), y=np.zeros(100, np.int32), t=t,
             p=np.ones(100, np.int8))
    _raises(path, match=["field 't'", "floating-point", "time_unit="])
    ev = read_events(path, time_unit="s")
    np.testing.assert_array_equal(ev["t"], np.round(t * 1e6).astype(np.int64))
    assert ev["t"][-1] == 500_000 and ev["t"][1] == 5051  # 0.5 s / 99 = 5050.505... us

    # Hand-computed conversions of each unit.
    cases = [("s", np.array([0.0, 0.000001, 0.123456, 0.5]), [0, 1, 123456, 500000]),
             ("ms", np.array([0, 3, 7], np.int64), [0, 3000, 7000]),
             ("ns", np.array([1499, 1500, 2500], np.int64), [1, 2, 3]),  # nearest, halves up
             ("us", np.array([5.4, 5.6]), [5, 6])]
    for unit, values, want in cases:
        n = len(values)
        p = tmp_path / f"{unit}.npz"
        np.savez(p, x=np.zeros(n, np.int32), y=np.zeros(n, np.int32), t=values,
                 p=np.zeros(n, np.int8))
        assert read_events(p, time_unit=unit)["t"].tolist() == want, unit


def test_h5_unit_attribute(tmp_path):
    def h5_file(name, t, unit=None, attr="unit"):
        path = tmp_path / name
        with h5py.File(path, "w") as f:
            f["x"], f["y"], f["p"] = np.zeros(len(t)), np.zeros(len(t)), np.ones(len(t))
            f["t"] = t
            if unit is not None:
                f["t"].attrs[attr] = unit
        return path

    # The file's own unit is used without any argument.
    path = h5_file("s.h5", np.array([0.0, 0.25, 1.5]), "s")
    assert read_events(path)["t"].tolist() == [0, 250_000, 1_500_000]
    path = h5_file("ms.h5", np.array([1, 2], np.uint32), "milliseconds", attr="units")
    assert read_events(path)["t"].tolist() == [1000, 2000]
    # A float t without a unit attribute is refused, naming the field.
    _raises(h5_file("bare.h5", np.array([0.0, 0.5])), match=["field 't'", "time_unit="])
    # An unknown unit names the attribute, the dataset and what was expected.
    _raises(h5_file("odd.h5", np.array([1, 2]), "fortnight"),
            match=["attribute 'unit' of dataset 't'", "'fortnight'", "s, ms, us, ns"])
    # A time_unit that contradicts the file is refused; so is an unknown one.
    _raises(path, time_unit="s", match=["in ms", "time_unit='s'"])
    bin_path = tmp_path / "one.bin"
    bin_path.write_bytes(bytes([1, 1, 0, 0, 9]))
    _raises(bin_path, time_unit="ns", match=["in us", "time_unit='ns'"])
    _raises(bin_path, time_unit="weeks", match=["time_unit", "'weeks'"])
    # Our own h5 files say their unit.
    ev = _random_events(5, 10, 10, 100)
    write_events(tmp_path / "ours.h5", ev)
    with h5py.File(tmp_path / "ours.h5") as f:
        assert f["t"].attrs["unit"] == "us"


# ---------------------------------------------------------------------------------------------
# The ATIS overflow marker of the .bin format (issue 11, bad case 6).


def _authors_bin_reader(data: bytes):
    """The dataset authors' reader (gorchard/event-Python eventvision.read_dataset, as tonic
    ports it), event by event: y == 240 adds 2**13 us to its own and every later timestamp,
    then the markers are dropped."""
    raw = list(data)
    rows = [raw[i:i + 5] for i in range(0, len(raw), 5)]
    ts = [((b2 & 127) << 16) | (b3 << 8) | b4 for _, _, b2, b3, b4 in rows]
    for i, row in enumerate(rows):
        if row[1] == 240:
            for j in range(i, len(ts)):
                ts[j] += 2**13
    return [(r[0], r[1], t, r[2] >> 7) for r, t in zip(rows, ts, strict=True)
            if r[1] != 240]


def test_bin_overflow_marker_hand_built(tmp_path):
    def event(x, y, p, t):
        return bytes([x, y, (p << 7) | (t >> 16), (t >> 8) & 0xFF, t & 0xFF])

    marker = event(0, 240, 0, 0)
    data = event(1, 2, 1, 100) + marker + event(3, 4, 0, 50) + marker + event(5, 6, 1, 10)
    path = tmp_path / "overflow.bin"
    path.write_bytes(data)
    ev = read_events(path, sensor_size=(34, 34))  # the marker is no event outside the sensor
    # Hand-computed: 100; 50 + 8192; 10 + 2 * 8192.
    assert ev.tolist() == [(1, 2, 100, 1), (3, 4, 8242, 0), (5, 6, 16394, 1)]
    assert ev.tolist() == _authors_bin_reader(data)
    # N-Caltech101's "max coordinate + 1" sensor no longer grows to 241 rows.
    assert int(ev["y"].max()) + 1 == 7
    # The writer refuses y = 240, which the reader would take for a marker.
    bad = ev.copy()
    bad["y"][0] = 240
    with pytest.raises(ValueError, match=r"again\.bin.*'y'.*\[0, 239\]"):
        write_events(tmp_path / "again.bin", bad)


def test_bin_overflow_marker_matches_authors_reader(tmp_path):
    rng = np.random.default_rng(3)
    n = 400
    rows = np.zeros((n, 5), np.uint8)
    rows[:, 0] = rng.integers(0, 34, n)
    rows[:, 1] = np.where(rng.random(n) < 0.05, 240, rng.integers(0, 34, n))
    t = np.sort(rng.integers(0, 8192, n))  # resets after each marker, as on the sensor
    rows[:, 2] = (rng.integers(0, 2, n) << 7) | (t >> 16)
    rows[:, 3], rows[:, 4] = (t >> 8) & 0xFF, t & 0xFF
    data = rows.tobytes()
    path = tmp_path / "many.bin"
    path.write_bytes(data)
    assert (rows[:, 1] == 240).sum() > 5
    ev = read_events(path, check_sorted=False)
    assert ev.tolist() == _authors_bin_reader(data)


def test_writer_refuses_read_only_formats(tmp_path):
    ev = _random_events(5, 10, 10, 100)
    with pytest.raises(ValueError, match=r"a\.raw.*format"):
        write_events(tmp_path / "a.raw", ev)
    with pytest.raises(ValueError, match=r"b\.h5.*'evt'.*read only"):
        write_events(tmp_path / "b.h5", ev, format="evt")


class _Tripwire:
    """Unpickling this writes a file: proof that a reader executed pickle."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_npz_pickle_is_never_executed(tmp_path):
    tripwire = tmp_path / "pickle_ran"
    path = tmp_path / "evil.npz"
    t = np.array([_Tripwire(str(tripwire)), 1], dtype=object)
    np.savez(path, x=np.zeros(2), y=np.zeros(2), t=t, p=np.zeros(2))
    np.savez(tmp_path / "evil_nim.npz", event_data=t)
    for p in (path, tmp_path / "evil_nim.npz"):
        _raises(p, match=["allow_pickle=False"])
    assert not tripwire.exists()
