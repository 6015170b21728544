"""Event frames: Eq. 1 against independent float64 references, tf parity, windows, options,
and the tower input ``embed.events_to_tower_input`` makes of them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evclip_jax import embed
from evclip_jax.events import EVENT_DTYPE, event_counts, event_frame, frames


def _events(n, width, height, seed=0, t_max=10**6):
    rng = np.random.default_rng(seed)
    ev = np.zeros(n, dtype=EVENT_DTYPE)
    # Cluster part of the events so some pixels collect many counts (exercises clamp).
    ev["x"] = np.where(rng.random(n) < 0.3, width // 2, rng.integers(0, width, n))
    ev["y"] = np.where(rng.random(n) < 0.3, height // 3, rng.integers(0, height, n))
    ev["t"] = np.sort(rng.integers(0, t_max, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


def _reference_counts(ev, sensor_hw, out, clamp=None):
    """Eq. 1 counts written independently: float64 scaling + np.histogram2d."""
    height, width = sensor_hw
    x = ev["x"].astype(np.float64)
    y = ev["y"].astype(np.float64)
    xo = np.floor(x * out / width)
    yo = np.floor(y * out / height)
    counts, _, _ = np.histogram2d(yo, xo, bins=[out, out], range=[[0, out], [0, out]])
    if clamp is not None:
        counts = np.clip(counts, 0, clamp)
    return counts


def _reference_frame(ev, sensor_hw, out, clamp=None):
    counts = _reference_counts(ev, sensor_hw, out, clamp)
    return counts / (counts.max() + 1.0)


def test_hand_computed_four_events():
    ev = np.zeros(4, dtype=EVENT_DTYPE)
    ev["x"] = [0, 0, 1, 3]
    ev["y"] = [0, 0, 2, 3]
    ev["p"] = [0, 1, 1, 0]
    want = np.zeros((4, 4))
    want[0, 0], want[2, 1], want[3, 3] = 2 / 3, 1 / 3, 1 / 3
    np.testing.assert_allclose(event_frame(ev, (4, 4), 4), want, rtol=1e-7)
    want_clamped = np.zeros((4, 4))
    want_clamped[0, 0] = want_clamped[2, 1] = want_clamped[3, 3] = 1 / 2
    np.testing.assert_allclose(event_frame(ev, (4, 4), 4, clamp=1), want_clamped, rtol=1e-7)
    # 4x4 sensor -> 2x2 output: pixel (y, x) = (c * 2 // 4) pools 2x2 blocks.
    np.testing.assert_allclose(event_frame(ev, (4, 4), 2), [[2 / 3, 0], [1 / 3, 1 / 3]],
                               rtol=1e-7)


@pytest.mark.parametrize("clamp", [None, 3, 20])
@pytest.mark.parametrize("sensor_hw,out,n", [((480, 640), 224, 6000), ((34, 34), 224, 2000),
                                             ((180, 240), 64, 3000)])
def test_event_frame_matches_reference(sensor_hw, out, n, clamp):
    ev = _events(n, sensor_hw[1], sensor_hw[0], seed=n)
    frame = event_frame(ev, sensor_hw, out, clamp=clamp)
    assert frame.dtype == np.float32 and frame.shape == (out, out)
    assert frame.min() >= 0 and frame.max() < 1
    np.testing.assert_allclose(frame, _reference_frame(ev, sensor_hw, out, clamp), rtol=1e-6,
                               atol=0)
    counts = event_counts(ev, sensor_hw, out, clamp=clamp)
    assert counts.dtype == np.uint16
    np.testing.assert_array_equal(counts, _reference_counts(ev, sensor_hw, out, clamp))
    # The frame is exactly counts / (max + 1).
    np.testing.assert_array_equal(frame, frames.counts_to_frame(counts))


def test_window_slicing():
    ev = _events(5000, 640, 480, seed=3)
    for window in [(0, 5000), (100, 2100), (4999, 5000), (1234, 4321)]:
        frame = event_frame(ev, (480, 640), 224, clamp=5, window=window)
        want = _reference_frame(ev[window[0]:window[1]], (480, 640), 224, clamp=5)
        np.testing.assert_allclose(frame, want, rtol=1e-6, atol=0)


def test_event_frame_validation():
    ev = _events(100, 640, 480)
    ev["x"][7], ev["y"][3] = 700, 479
    with pytest.raises(ValueError, match="max x = 700"):
        event_frame(ev, (480, 640), 224)
    with pytest.raises(ValueError, match="max y = 479"):
        event_frame(ev, (240, 1000), 224)
    with pytest.raises(ValueError, match="empty event window"):
        event_frame(ev, (480, 1000), 224, window=(5, 5))
    with pytest.raises(ValueError, match="empty event window"):
        event_counts(ev[:0], (480, 1000), 224)
    with pytest.raises(ValueError, match="outside the event array"):
        event_frame(ev, (480, 1000), 224, window=(50, 101))
    with pytest.raises(ValueError, match="fields x, y"):
        event_frame(np.zeros((10, 4)), (480, 640), 224)
    with pytest.raises(ValueError, match="clamp"):
        event_frame(ev, (480, 1000), 224, clamp=0)
    # Signed coordinate fields: negatives are rejected, in-range values counted as usual.
    signed = np.zeros(3, dtype=[("x", "i4"), ("y", "i4")])
    signed["x"], signed["y"] = [0, 3, 3], [1, 1, 1]
    np.testing.assert_allclose(event_frame(signed, (4, 4), 4)[1], [1 / 3, 0, 0, 2 / 3])
    signed["x"][1] = -1
    with pytest.raises(ValueError, match="min x = -1"):
        event_frame(signed, (4, 4), 4)


def test_event_counts_uint16_overflow():
    ev = np.zeros(70000, dtype=EVENT_DTYPE)
    with pytest.raises(ValueError, match="uint16"):
        event_counts(ev, (2, 2), 2)
    assert event_counts(ev, (2, 2), 2, clamp=10)[0, 0] == 10
    # The frame itself has no uint16 limit.
    assert event_frame(ev, (2, 2), 2)[0, 0] == np.float32(70000 / 70001)


def test_event_frame_to_tower_input():
    """The release's map of Eq. 1 frames: (E - 0.5) * 2 replicated, no CLIP mean/std."""
    frame = event_frame(_events(500, 34, 34), (34, 34), 32)
    tower = np.asarray(embed.events_to_tower_input(np.stack([frame, frame]), "evclip"))
    assert tower.shape == (2, 32, 32, 3) and tower.dtype == np.float32
    want = frame.astype(np.float64) * 2.0 - 1.0
    for c in range(3):
        np.testing.assert_allclose(tower[1, ..., c], want, rtol=0, atol=1e-7)
    assert tower.min() >= -1 and tower.max() < 1


def test_windows():
    for seed in range(5):
        assert frames.eval_window(100_000, 30_000, seed) == frames.eval_window(100_000, 30_000,
                                                                               seed)
    assert len({frames.eval_window(100_000, 30_000, s) for s in range(20)}) > 1
    assert frames.eval_window(1000, 2000, 0) == (0, 1000)
    rng = np.random.default_rng(0)
    starts = []
    for _ in range(2000):
        start, stop = frames.random_window(50, 45, rng)
        assert 0 <= start and stop <= 50 and stop - start == 45
        starts.append(start)
    assert set(starts) == set(range(6))  # every start 0..n-k is reachable
    assert frames.random_window(10, 30, rng) == (0, 10)
    with pytest.raises(ValueError):
        frames.random_window(0, 30, rng)
    with pytest.raises(ValueError):
        frames.random_window(10, 0, rng)


def test_frames_import_without_tensorflow():
    code = ("import sys; sys.modules['tensorflow'] = None; "
            "import evclip_jax.events, evclip_jax.events.frames; "
            "assert 'tensorflow' not in [m for m in sys.modules if sys.modules[m] is not None]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# ---------------------------------------------------------------------------------------------
# TensorFlow parity.


@pytest.mark.parametrize("clamp", [None, 4])
def test_tf_matches_numpy(clamp):
    tf = pytest.importorskip("tensorflow")
    ev = _events(8000, 640, 480, seed=11)
    frame = event_frame(ev, (480, 640), 224, clamp=clamp)
    counts = event_counts(ev, (480, 640), 224, clamp=clamp)
    x = tf.constant(ev["x"].astype(np.int32))
    y = tf.constant(ev["y"].astype(np.int32))
    tf_counts = frames.event_counts_tf(x, y, (480, 640), 224, clamp=clamp)
    assert tf_counts.dtype == tf.uint16
    np.testing.assert_array_equal(tf_counts.numpy(), counts)
    tf_frame = frames.event_frame_tf(x, y, (480, 640), 224, clamp=clamp).numpy()
    assert tf_frame.dtype == np.float32
    np.testing.assert_array_equal(tf_frame, frame)
    # The normalisation alone, from stored uint16 counts and from float counts.
    for stored in (counts, counts.astype(np.float32)):
        tf_norm = frames.counts_to_frame_tf(tf.constant(stored)).numpy()
        assert tf_norm.dtype == np.float32
        np.testing.assert_array_equal(tf_norm, frames.counts_to_frame(counts))


def test_tf_inside_dataset_map():
    tf = pytest.importorskip("tensorflow")
    streams = [_events(n, 240, 180, seed=n) for n in (300, 1000, 2500)]
    windows = [(0, 300), (200, 900), (500, 2500)]

    def gen():
        for ev, (a, b) in zip(streams, windows, strict=True):
            yield ev["x"][a:b].astype(np.int64), ev["y"][a:b].astype(np.int64)

    spec = (tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64))
    ds = tf.data.Dataset.from_generator(gen, output_signature=spec).map(
        lambda x, y: (frames.event_frame_tf(x, y, (180, 240), 64, clamp=20),
                      frames.event_counts_tf(x, y, (180, 240), 64, clamp=20)))
    for (tf_frame, tf_counts), ev, window in zip(ds, streams, windows, strict=True):
        np.testing.assert_array_equal(
            tf_frame.numpy(), event_frame(ev, (180, 240), 64, clamp=20, window=window))
        np.testing.assert_array_equal(
            tf_counts.numpy(), event_counts(ev, (180, 240), 64, clamp=20, window=window))


def test_tf_validation():
    tf = pytest.importorskip("tensorflow")
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside sensor width"):
        frames.event_frame_tf(tf.constant([0, 640]), tf.constant([0, 1]), (480, 640), 224)
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty event window"):
        frames.event_frame_tf(tf.zeros([0], tf.int32), tf.zeros([0], tf.int32), (480, 640), 224)
    ds = tf.data.Dataset.from_tensors((tf.constant([5, 1]), tf.constant([0, 500]))).map(
        lambda x, y: frames.event_frame_tf(x, y, (480, 640), 224))
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside sensor height"):
        next(iter(ds))


# ---------------------------------------------------------------------------------------------
# Alternative representations.


def _reference_eventclip(ev, sensor_hw, out, k, nonzero):
    height, width = sensor_hw
    xo = np.floor(ev["x"] * out / width)
    yo = np.floor(ev["y"] * out / height)
    rng = [[0, out], [0, out]]
    on = ev["p"] == 1
    h_on, _, _ = np.histogram2d(yo[on], xo[on], bins=[out, out], range=rng)
    h_off, _, _ = np.histogram2d(yo[~on], xo[~on], bins=[out, out], range=rng)
    hist = np.stack([h_on, h_off], axis=-1)
    vals = hist[hist > 0] if nonzero else hist
    hist = np.where(hist > vals.mean() + k * vals.std(), 0.0, hist)
    return hist / hist.max()


@pytest.mark.parametrize("k,nonzero", [(10.0, False), (2.0, True), (0.0, False)])
def test_eventclip_frame(k, nonzero):
    ev = _events(4000, 240, 180, seed=5)
    ev["x"][::7], ev["y"][::7] = 17, 29  # a hot pixel
    got = frames.eventclip_frame(ev, (180, 240), 56, hot_pixel_k=k, nonzero_stats=nonzero)
    assert got.shape == (56, 56, 3) and got.dtype == np.float32
    if k > 0:
        want = _reference_eventclip(ev, (180, 240), 56, k, nonzero)
        assert got[29 * 56 // 180, 17 * 56 // 240, :2].max() == 0  # hot pixel removed
    else:
        want = _reference_eventclip(ev, (180, 240), 56, np.inf, nonzero)
    np.testing.assert_allclose(got[..., :2], want, rtol=1e-6)
    np.testing.assert_array_equal(got[..., 2], 0)
    assert got.max() == 1.0

    rgb = frames.eventclip_frame(ev, (180, 240), 56, hot_pixel_k=k, nonzero_stats=nonzero,
                                 style="rgb")
    alpha = np.clip(want.sum(-1), 0, 1)
    np.testing.assert_allclose(rgb[..., 0], want[..., 0] * alpha + 1 - alpha, atol=1e-6)
    np.testing.assert_allclose(rgb[..., 1], 1 - alpha, atol=1e-6)
    np.testing.assert_allclose(rgb[..., 2], want[..., 1] * alpha + 1 - alpha, atol=1e-6)


def test_eventbind_frames_hand_computed():
    ev = np.zeros(5, dtype=EVENT_DTYPE)
    # (x, y, t, p) on a 4x4 sensor, two time bins over t in [0, 99]: bin = t * 2 // 100.
    ev["x"] = [0, 0, 1, 2, 3]
    ev["y"] = [0, 0, 1, 2, 3]
    ev["t"] = [0, 10, 20, 60, 99]
    ev["p"] = [1, 0, 1, 0, 1]
    got = frames.eventbind_frames(ev, (4, 4), 4, num_bins=2, background=0.5)
    assert got.shape == (2, 4, 4, 3) and got.dtype == np.float32
    want = np.full((2, 4, 4, 3), 0.5)
    want[0, 0, 0] = (0, 0, 1)  # latest event at (0, 0) in bin 0 is OFF
    want[0, 1, 1] = (1, 0, 0)
    want[1, 2, 2] = (0, 0, 1)
    want[1, 3, 3] = (1, 0, 0)
    np.testing.assert_array_equal(got, want)
    by_count = frames.eventbind_frames(ev, (4, 4), 4, num_bins=5, split="count")
    for i in range(5):  # one event per bin; white elsewhere
        assert (by_count[i] != 1).any(axis=-1).sum() == 1


def test_representation_registry():
    """The registry's names are embed's; each function's output is what embed maps."""
    assert sorted(frames.REPRESENTATIONS) == sorted(embed.REPRESENTATIONS)
    ev = _events(500, 34, 34)
    shapes = {"evclip": (32, 32), "eventclip": (32, 32, 3), "eventbind": (3, 32, 32, 3)}
    for name in embed.REPRESENTATIONS:
        out = frames.get_representation(name)(ev, sensor_size=(34, 34), out_size=32)
        assert out.shape == shapes[name] and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1
        tower = embed.events_to_tower_input(out[None], name)
        assert tower.shape == ((1, 32, 32, 3) if name == "evclip" else (1, *shapes[name]))
    assert frames.REPRESENTATIONS["evclip"] is event_frame
    with pytest.raises(ValueError, match="evclip, eventbind, eventclip"):
        frames.get_representation("eventclp")
    with pytest.raises(ValueError, match="'eq1'"):
        frames.REPRESENTATIONS["eq1"]
