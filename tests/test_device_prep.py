"""The device side of the input pipeline and the codec-free records: the augmentation's
resampling against tf.image.resize, raw/compressed multi-window records against the NumPy
reference (embed's maps of frames.py's counts), the per-epoch window draw, resume exactness
after the device augmentation, the map keeping the batch sharded, and the benchmark tool on a
tiny case."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

tf = pytest.importorskip("tensorflow")

from event_fixtures import random_events  # noqa: E402

from evclip_jax import embed  # noqa: E402
from evclip_jax.data import device_prep, pipeline, records  # noqa: E402
from evclip_jax.data.augment import RELEASE_AUGMENT, Augment  # noqa: E402
from evclip_jax.events.frames import (  # noqa: E402
    counts_to_frame,
    eval_window,
    event_counts,
    random_window,
)
from evclip_jax.events.io import write_events  # noqa: E402

S = 24
SENSOR = (30, 36)
N = 12
K = 4  # windows per training record
WINDOW_K = 60
CLAMP = 200  # <= 255: raw counts are stored as uint8


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(0)
    items, events = [], []
    for i in range(N):
        ev = random_events(rng, int(rng.integers(200, 400)), SENSOR)
        write_events(str(root / f"e{i}.npz"), ev)
        Image.fromarray(rng.integers(0, 256, (S + 6, S, 3), dtype=np.uint8)).save(
            str(root / f"i{i}.png"))
        items.append(records.PairedItem(str(root / f"e{i}.npz"), str(root / f"i{i}.png"), i))
        events.append(ev)
    return {"root": root, "items": items, "events": events}


@pytest.fixture(scope="module", params=[("raw", None), ("raw", "GZIP"), ("png", "ZLIB")])
def built(request, source, tmp_path_factory):
    """Train (K windows) and test splits in one encoding and compression."""
    encoding, compression = request.param
    out = tmp_path_factory.mktemp(f"{encoding}_{compression}")
    for split in ("train", "test"):
        records.write_tfrecords(
            source["items"], out, class_names=[f"c{i}" for i in range(N)], out_size=S,
            sensor_size=SENSOR, clamp=CLAMP, window_k=WINDOW_K, num_shards=2, split=split,
            seed=7, encoding=encoding, compression=compression, num_windows=K, progress=False)
    return {"dir": str(out), "encoding": encoding, "compression": compression, **source}


@pytest.fixture(scope="module")
def bench(load_tool):
    return load_tool("bench_data")


def _windows(ev, label):
    """The writer's K training windows of item ``label`` (item index == label)."""
    rng = np.random.default_rng([7, label])
    return [random_window(len(ev), WINDOW_K, rng) for _ in range(K)]


def _counts(ev, window):
    return event_counts(ev, SENSOR, S, clamp=CLAMP, window=window)


def _batches(data_dir, split="train", n=None, **kw):
    kw = {"global_batch_size": 4, "out_size": S, "train": split == "train", "seed": 0,
          "process_index": 0, "process_count": 1, **kw}
    ds = pipeline.make_dataset(data_dir, split, **kw)
    return list(ds.take(n).as_numpy_iterator() if n is not None else ds.as_numpy_iterator())


def test_manifest_and_eval_inputs_equal_numpy_reference(built):
    """Evaluation (the fixed window, no augmentation): the device map of each row equals
    embed's maps of frames.py's Eq. 1 frame and of the gray image, to float32 rounding."""
    manifest = records.read_manifest(built["dir"], "test")
    dtype = "uint8" if built["encoding"] == "raw" else "uint16"
    assert (manifest["encoding"], manifest["compression"], manifest["event_dtype"]) == \
        (built["encoding"], built["compression"], dtype)
    assert manifest["num_windows"] == 1
    assert records.read_manifest(built["dir"], "train")["num_windows"] == K
    batches = _batches(built["dir"], "test")
    assert sum(int(b["mask"].sum()) for b in batches) == N
    tower_inputs = jax.jit(device_prep.tower_inputs)
    for b in batches:
        assert b["events"].dtype == np.dtype(dtype) and b["images"].dtype == np.uint8
        got = tower_inputs(b)
        for row in np.flatnonzero(b["mask"]):
            ev = built["events"][b["labels"][row]]
            counts = _counts(ev, eval_window(len(ev), WINDOW_K, 7))
            want = embed.events_to_tower_input(counts_to_frame(counts)[None], "evclip")[0]
            np.testing.assert_allclose(got["events"][row], want, rtol=0, atol=1e-6)
            gray = records.load_gray_image(str(built["root"] / f"i{b['labels'][row]}.png"), S)
            np.testing.assert_allclose(got["images"][row],
                                       embed.images_to_tower_input(gray[None])[0],
                                       rtol=0, atol=2e-6)


def test_window_drawn_per_epoch_seeded(built):
    """Training: each row holds one of the record's K stored windows, drawn per (seed, epoch,
    record): the same again with the same seed, mostly different across epochs and seeds."""
    n = 3 * N // 4  # three epochs
    a, again = _batches(built["dir"], n=n), _batches(built["dir"], n=n)
    other = _batches(built["dir"], n=n, seed=1)
    drawn = {}
    for batches, seed in ((a, 0), (again, 0), (other, 1)):
        for b in batches:
            for row in range(4):
                label, epoch = int(b["labels"][row]), int(b["epoch"][row])
                ev = built["events"][label]
                stored = [_counts(ev, w) for w in _windows(ev, label)]
                match = [k for k in range(K) if np.array_equal(b["events"][row], stored[k])]
                assert match, (label, epoch)
                drawn.setdefault((seed, label, epoch), set()).add(match[0])
    assert all(len(v) == 1 for v in drawn.values())  # same seed, same draw
    per_record = [[drawn[(0, label, e)].copy().pop() for e in range(3)] for label in range(N)]
    assert sum(len(set(p)) > 1 for p in per_record) >= N // 2
    assert any(drawn[(0, label, e)] != drawn[(1, label, e)]
               for label in range(N) for e in range(3))


def test_resume_exact_after_device_augmentation(built):
    """A run resumed at step 4 (12 records, 4 per batch: inside epoch 1) sees, after the
    device map with the release augmentation, exactly the batches of an uninterrupted run;
    and the augmentation did change the inputs."""
    prep = device_prep.InputPrep("evclip", S, augment=RELEASE_AUGMENT, seed=3)
    fn = jax.jit(lambda b: device_prep.prepare(b, prep))
    full = [fn(b) for b in _batches(built["dir"], n=7, seed=3)]
    tail = [fn(b) for b in _batches(built["dir"], n=3, seed=3, start_step=4)]
    for x, y in zip(full[4:], tail, strict=True):
        for k in x:
            np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))
    plain = device_prep.tower_inputs(_batches(built["dir"], n=1, seed=3)[0])
    assert not np.array_equal(np.asarray(plain["events"]), np.asarray(full[0]["events"]))
    assert not np.array_equal(np.asarray(plain["images"]), np.asarray(full[0]["images"]))


def _tf_reference(x, t, margin, method, fill):
    """tf.image.resize of the shifted, cropped stack [N, S, S, C], then the flip."""
    dy, dx = (int(v) for v in t["shift"])
    top, left, h, w = (int(v) for v in t["box"])
    size = x.shape[1]
    padded = tf.pad(x, [[0, 0], [margin, margin], [margin, margin], [0, 0]],
                    constant_values=fill)
    shifted = padded[:, margin - dy:margin - dy + size, margin - dx:margin - dx + size]
    out = tf.image.resize(shifted[:, top:top + h, left:left + w], [size, size], method=method)
    return np.asarray(tf.reverse(out, [2]) if bool(t["flip"]) else out)


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_resample_matches_tf_image_resize(method):
    """Augment.resample (shift, crop box, resize, flip as two gathers) equals TensorFlow's
    pad/slice/crop/tf.image.resize/reverse of the same transform."""
    aug = Augment({**RELEASE_AUGMENT, "shift_px": 40}, S)  # margin 4 at 24 px
    assert aug.margin == 4
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, S, S, 3)).astype(np.float32)
    fill = 1.0 if method == "nearest" else 0.0
    for seed in range(12):
        t = jax.tree.map(np.asarray, aug.draw(jax.random.key(seed)))
        top, left, h, w = t["box"]
        assert 0 <= top <= S - h and 0 <= left <= S - w and abs(t["shift"]).max() <= 4
        got = np.asarray(aug.resample(jnp.asarray(x), t, method, fill))
        want = _tf_reference(x, t, aug.margin, method, fill)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 if method == "bilinear" else 0)


def test_prepare_keeps_the_batch_sharded(bench):
    """On 8 devices the jitted map moves no data between them (no collectives in the
    compiled program), keeps the batch sharding and equals the single-device result."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    batch = bench.prep_batch(16, S, "evclip")
    placed = jax.device_put(batch, sharding)
    prep = device_prep.InputPrep("evclip", S, augment=RELEASE_AUGMENT, paired=False)
    fn = jax.jit(lambda b: device_prep.prepare(b, prep))
    hlo = fn.lower(placed).compile().as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert op not in hlo, op
    out = fn(placed)
    assert out["events"].sharding.is_equivalent_to(sharding, 4)
    single = fn(batch)
    for k in ("events", "images"):
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(single[k]))


def test_bench_data_tool_runs_tiny(tmp_path, bench):
    """tools/bench_data.py's pieces on a tiny case: bytes per record, host rates, the device
    map's time."""
    items = bench.write_sources(str(tmp_path / "src"), 8, window_k=50)
    sizes = {}
    for encoding in ("png", "raw", "raw_gzip"):
        sizes[encoding] = bench.write_records(items, str(tmp_path / encoding), encoding,
                                              out_size=16, window_k=50, num_windows=2)
        wall, cpu = bench.bench_tf_data(str(tmp_path / encoding), 1, 0.2, 4, 16)
        assert wall > 0 and cpu > 0
    # 2 windows of uint16 counts + the image, raw; less with gzip (zero counts compress).
    assert sizes["raw"] > 2 * 16 * 16 * 2 + 16 * 16 > sizes["raw_gzip"]
    assert bench.bench_prepare(4, 16, "evclip", repeats=2) > 0
