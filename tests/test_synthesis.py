"""Tests for events/synthesis.py and tools/video_to_events.py against hand-computed cases."""

import os

import numpy as np
import pytest
from PIL import Image

from evclip_jax.events.io import EVENT_DTYPE, read_events
from evclip_jax.events.synthesis import (
    AffineMotion,
    image_to_events,
    majority_label,
    video_to_event_frames,
    video_to_events,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hand_video() -> np.ndarray:
    """34 frames of 4x4: 33 differences -> 2 instances of 16, the 33rd difference dropped."""
    frames = np.full((34, 4, 4), 100, np.uint8)
    alternate = np.arange(34) % 2 == 1
    frames[alternate, 0, 0] = 124   # |d| = 24 every difference: never fires
    frames[alternate, 0, 1] = 125   # |d| = 25 exactly at the threshold: never fires
    frames[alternate, 1, 1] = 126   # |d| = 26 every difference: fires 16 times per instance
    frames[:5, 2, 2] = 50
    frames[5:, 2, 2] = 250          # one jump of +200 at d_5 (instance 0)
    frames[16:, 3, 0] = 74          # -26 at d_16: last difference of instance 0
    frames[17:, 3, 1] = 126         # +26 at d_17: first difference of instance 1
    frames[33:, 3, 3] = 0           # -100 at d_33: incomplete tail, dropped
    return frames


EXPECTED_FRAMES = np.array([
    [[0, 0, 0, 0],
     [0, 16, 0, 0],
     [0, 0, 1, 0],
     [1, 0, 0, 0]],
    [[0, 0, 0, 0],
     [0, 16, 0, 0],
     [0, 0, 0, 0],
     [0, 1, 0, 0]],
], np.float32)

# Instance 0 owns frames 1..16: eight 0s then eight 1s -> tie -> the larger label, 1.
# (Cutting frames 0..15 instead would give nine 0s -> 0.) Instance 1 owns frames 17..32:
# nine 0s, seven 1s -> 0. Frame 33 belongs to the dropped tail.
HAND_LABELS = np.array([0] + [0] * 8 + [1] * 8 + [0] * 9 + [1] * 7 + [1], np.int64)
EXPECTED_LABELS = np.array([1, 0])


def test_video_to_event_frames_hand_computed():
    assert HAND_LABELS.shape == (34,)
    frames, labels = video_to_event_frames(_hand_video(), HAND_LABELS, threshold=25, stack=16)
    assert frames.dtype == np.float32 and frames.shape == (2, 4, 4)
    np.testing.assert_array_equal(frames, EXPECTED_FRAMES)
    np.testing.assert_array_equal(labels, EXPECTED_LABELS)


def test_video_to_event_frames_without_labels_and_short_video():
    frames, labels = video_to_event_frames(_hand_video()[:17])
    assert labels is None
    np.testing.assert_array_equal(frames, EXPECTED_FRAMES[:1])
    frames, labels = video_to_event_frames(_hand_video()[:16], HAND_LABELS[:16])
    assert frames.shape == (0, 4, 4) and labels.shape == (0,)


def test_video_to_event_frames_threshold_is_strict():
    video = np.zeros((3, 1, 3), np.uint8)
    video[1] = [[25, 26, 24]]
    video[2] = [[50, 52, 48]]
    frames, _ = video_to_event_frames(video, threshold=25, stack=2)
    np.testing.assert_array_equal(frames, [[[0, 2, 0]]])


def test_video_to_event_frames_rgb_uses_luma():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 3, 3, 3), dtype=np.uint8)
    luma = np.rint(rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    got, _ = video_to_event_frames(rgb, stack=2)
    want, _ = video_to_event_frames(luma, stack=2)
    np.testing.assert_array_equal(got, want)


def test_majority_label_ties_go_to_larger():
    assert majority_label(np.array([0, 1, 1, 0])) == 1
    assert majority_label(np.array([2, 2, 5, 5, 1])) == 5
    assert majority_label(np.array([3, 3, 3, 7])) == 3


def test_video_to_event_frames_rejects_bad_input():
    with pytest.raises(ValueError, match="labels"):
        video_to_event_frames(_hand_video(), HAND_LABELS[:-1])
    with pytest.raises(ValueError, match="uint8"):
        video_to_event_frames(_hand_video().astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        video_to_event_frames(np.zeros((4, 4), np.uint8))


def test_video_to_events_hand_computed():
    video = np.full((3, 2, 2), 100, np.uint8)
    video[1, 0, 1] = 130  # +30 at frame 1: ON
    video[1, 1, 0] = 70   # -30 at frame 1: OFF
    video[1, 1, 1] = 125  # +25 at frame 1: not over the threshold
    video[2, 1, 1] = 125  # unchanged at frame 2
    video[2, 1, 0] = 70   # unchanged at frame 2; (0, 1) falls back -30 at frame 2: OFF
    ev = video_to_events(video, fps=10)
    want = np.array([(1, 0, 100_000, 1), (0, 1, 100_000, 0), (1, 0, 200_000, 0)], EVENT_DTYPE)
    np.testing.assert_array_equal(ev, want)
    shifted = video_to_events(video, fps=10, start_index=4)
    np.testing.assert_array_equal(shifted["t"], want["t"] + 400_000)
    assert video_to_events(video[:1], fps=10).dtype == EVENT_DTYPE


def _step_edge(width: int = 16, edge: int = 8) -> np.ndarray:
    image = np.full((6, width), 0.1)
    image[:, edge:] = 0.9
    return image


def test_static_image_gives_no_events():
    rng = np.random.default_rng(0)
    image = rng.random((12, 12))
    ev = image_to_events(image, rng, max_translation=0, max_rotation_deg=0, scale_range=(1, 1))
    assert ev.dtype == EVENT_DTYPE and ev.size == 0
    assert image_to_events(image, 0, motion=AffineMotion()).size == 0


@pytest.mark.parametrize("tx, columns, polarity", [(3.0, [8, 9, 10], 0), (-3.0, [5, 6, 7], 1)])
def test_translated_step_edge(tx, columns, polarity):
    """Moving the bright side right darkens columns 8-10; moving it left brightens 5-7."""
    log_threshold, eps = 0.2, 1e-2
    ev = image_to_events(_step_edge(), 0, motion=AffineMotion(tx=tx), num_steps=10,
                         log_threshold=log_threshold, log_eps=eps, duration_us=100_000)
    assert sorted(np.unique(ev["x"]).tolist()) == columns
    assert np.all(ev["p"] == polarity)
    # Each pixel's intensity moves monotonically 0.9 <-> 0.1, so with reference memory it fires
    # floor(|total log change| / threshold) times in all.
    per_pixel = int(np.floor(abs(np.log(eps + 0.9) - np.log(eps + 0.1)) / log_threshold))
    counts = np.zeros((6, 16), np.int64)
    np.add.at(counts, (ev["y"], ev["x"]), 1)
    expected = np.zeros((6, 16), np.int64)
    expected[:, columns] = per_pixel
    np.testing.assert_array_equal(counts, expected)
    assert np.all(np.diff(ev["t"]) >= 0) and ev["t"].min() >= 0 and ev["t"].max() < 100_000
    if tx > 0:
        # Column 10 samples the source at 10 - 0.3k: still on the bright side until step 7.
        assert ev["t"][ev["x"] == 10].min() >= 60_000
        assert ev["t"][ev["x"] == 8].min() < 10_000


def test_random_translation_stays_near_edge():
    image = _step_edge(width=32, edge=16)
    total = 0
    for seed in range(8):
        ev = image_to_events(image, np.random.default_rng(seed), max_translation=0.1,
                             max_rotation_deg=0, scale_range=(1, 1))
        total += ev.size
        if ev.size:  # a tiny random shift may stay under the contrast threshold
            # |shift| <= 0.1 * 32 = 3.2 px, so only columns 16-4 .. 16+3 can change.
            assert ev["x"].min() >= 12 and ev["x"].max() <= 19
            assert np.unique(ev["p"]).size == 1  # a pure shift moves the edge one way
    assert total > 0


def test_image_to_events_deterministic_per_seed():
    image = np.random.default_rng(1).random((20, 24))
    a = image_to_events(image, np.random.default_rng(7))
    b = image_to_events(image, np.random.default_rng(7))
    c = image_to_events(image, np.random.default_rng(8))
    assert a.size > 0
    np.testing.assert_array_equal(a, b)
    assert a.size != c.size or not np.array_equal(a, c)
    assert a["x"].max() < 24 and a["y"].max() < 20
    assert np.all(np.diff(a["t"]) >= 0) and a["t"].max() < 100_000


def test_image_to_events_rejects_bad_image():
    with pytest.raises(ValueError, match="image"):
        image_to_events(np.zeros((2, 3, 3)), 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        image_to_events(np.full((3, 3), 2.0), 0)


# --- tools/video_to_events.py -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tool(load_tool):
    return load_tool("video_to_events")


def test_tool_converts_image_sequence(tool, tmp_path):
    video_dir = tmp_path / "clip"
    video_dir.mkdir()
    for index, frame in enumerate(_hand_video()):
        Image.fromarray(frame).save(video_dir / f"{index:03d}.png")
    labels_path = tmp_path / "labels.txt"
    labels_path.write_text("\n".join(str(v) for v in HAND_LABELS))
    out = tmp_path / "out"
    summary = tool.convert_video(str(video_dir / "%03d.png"), str(out), ["npz", "frames"],
                                 threshold=25, stack=16, labels_path=str(labels_path), fps=10,
                                 progress=False)
    assert summary["frames"] == 34 and summary["instances"] == 2
    with np.load(out / "clip_frames.npz") as z:
        np.testing.assert_array_equal(z["event_frames"], EXPECTED_FRAMES)
        np.testing.assert_array_equal(z["instance_labels"], EXPECTED_LABELS)
    ev = read_events(out / "clip.npz")
    # Chunked conversion equals one pass over the whole video, tail difference included.
    np.testing.assert_array_equal(ev, video_to_events(_hand_video(), fps=10))
    assert ev["t"].max() == 3_300_000  # d_33 at frame 33 = 3.3 s


def test_tool_names_unreadable_file(tool, tmp_path):
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(ValueError, match="nope.mp4"):
        tool.convert_video(missing, str(tmp_path / "out"), progress=False)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="junk.mp4"):
        tool.convert_video(str(junk), str(tmp_path / "out"), progress=False)
