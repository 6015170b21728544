r"""Input-pipeline cost: host CPU per sample by record encoding, and the device-side map.

(a) The --representation's frames function on one core (``event_frame`` for evclip): a
    30,000-event window on the 640x480 N-ImageNet sensor reduced to 224x224 (what a
    per-sample event-file loader would pay).
(b) ``make_dataset`` (training mode: shuffle, one of --windows event windows per epoch) from
    paired TFRecords at --out_size, for each of --encodings: ``png`` (16-bit PNG counts, 8-bit
    PNG image), ``raw`` (uint16 counts and uint8 image bytes), ``raw_gzip`` / ``raw_zlib``
    (raw in GZIP/ZLIB-compressed TFRecords). Synthetic records (random events, random-noise
    images: noise is the worst case for PNG and for compression; --num_records records in 4
    shards, made from at most 64 distinct source pairs) written with ``write_tfrecords``.
    Reported: bytes per record on disk and samples per wall second and per CPU second of this
    process (the per-core rate, robust to other jobs on the machine), with tf.data limited to
    1 thread and with its default pool. The host does parse + decode +
    batch only; the augmentation runs on the device (c).
(c) ``device_prep.prepare`` with the release augmentation, jitted on the first JAX device
    (the GPU where there is one), on a batch of --prep_batch integer examples: ms per batch.
    Compare it with the train step's time (tools/bench_train_step.py) for its share.
    --prep_only runs (c) alone (no TensorFlow needed).

    python tools/bench_data.py --num_records=1024 --seconds=15 --windows=4
    python tools/bench_data.py --prep_only --prep_batch=256   # on the GPU machine
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

from evclip_jax.events.frames import REPRESENTATIONS

ENCODINGS = {"png": ("png", None), "raw": ("raw", None), "raw_gzip": ("raw", "GZIP"),
             "raw_zlib": ("raw", "ZLIB")}

_NUM_RECORDS = flags.DEFINE_integer("num_records", 1024, "synthetic TFRecords to write")
_BATCH = flags.DEFINE_integer("batch_size", 32, "per-host batch size for the tf.data run")
_SECONDS = flags.DEFINE_float("seconds", 15.0, "measuring time per tf.data run")
_OUT_SIZE = flags.DEFINE_integer("out_size", 224, "frame/image side")
_TARGET = flags.DEFINE_integer("target", 10_000, "samples/s to size the CPU count for")
_REPRESENTATION = flags.DEFINE_enum("representation", "evclip", list(REPRESENTATIONS),
                                    "event representation of the records")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 3, "eventbind: frames per example")
_ENCODINGS = flags.DEFINE_list("encodings", list(ENCODINGS),
                               f"record encodings to measure, of {', '.join(ENCODINGS)}")
_WINDOWS = flags.DEFINE_integer("windows", 1, "event windows per record")
_WINDOW = flags.DEFINE_integer("window_k", 30_000, "events per window")
_PREP_BATCH = flags.DEFINE_integer("prep_batch", 256, "(c): examples per device batch")
_PREP_ONLY = flags.DEFINE_bool("prep_only", False, "run (c) alone")

SENSOR = (480, 640)


def _random_events(rng, n: int):
    import numpy as np

    from evclip_jax.events.io import EVENT_DTYPE

    ev = np.zeros(n, EVENT_DTYPE)
    ev["x"] = rng.integers(0, SENSOR[1], n)
    ev["y"] = rng.integers(0, SENSOR[0], n)
    ev["t"] = np.sort(rng.integers(0, 1_000_000, n))
    ev["p"] = rng.integers(0, 2, n)
    return ev


def bench_event_frame(seconds: float = 5.0) -> tuple[float, float]:
    """Frames per wall second and per CPU second of the representation's NumPy function, with
    the options the records use (1 thread)."""
    import numpy as np

    from evclip_jax.data.records import representation_options
    from evclip_jax.events.frames import get_representation

    options = representation_options(_REPRESENTATION.value, _NUM_FRAMES.value)
    make_frames = get_representation(_REPRESENTATION.value)
    ev = _random_events(np.random.default_rng(0), _WINDOW.value)
    make_frames(ev, SENSOR, _OUT_SIZE.value, **options)  # warm the coordinate tables
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        make_frames(ev, SENSOR, _OUT_SIZE.value, **options)
        n += 1
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def write_sources(src: str, num_records: int, window_k: int, distinct: int = 64) -> list:
    """``num_records`` pairs of random events (.npz, 2 * window_k each) and random RGB images
    (.png), ``distinct`` files of each, reused in turn."""
    import numpy as np
    from PIL import Image

    from evclip_jax.data.records import PairedItem
    from evclip_jax.events.io import write_events

    rng = np.random.default_rng(0)
    os.makedirs(src)
    items = []
    for i in range(num_records):
        event_path = os.path.join(src, f"{i % distinct:05d}.npz")
        image_path = os.path.join(src, f"{i % distinct:05d}.png")
        if i < distinct:
            write_events(event_path, _random_events(rng, 2 * window_k))
            image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
            Image.fromarray(image).save(image_path)
        items.append(PairedItem(event_path, image_path, i % 10))
    return items


def write_records(items: list, out_dir: str, encoding: str, *, out_size: int, window_k: int,
                  num_windows: int, representation: str = "evclip",
                  num_frames: int = 3) -> float:
    """Writes the training split in ``encoding`` (a key of ENCODINGS); bytes per record."""
    from evclip_jax.data.records import write_tfrecords

    codec, compression = ENCODINGS[encoding]
    manifest = write_tfrecords(
        items, out_dir, class_names=[str(c) for c in range(10)], out_size=out_size,
        sensor_size=SENSOR, window_k=window_k, num_shards=4, split="train",
        representation=representation, num_frames=num_frames, encoding=codec,
        compression=compression, num_windows=num_windows, progress=False)
    size = sum(os.path.getsize(os.path.join(out_dir, s)) for s in manifest["shards"])
    return size / manifest["num_examples"]


def bench_tf_data(data_dir: str, threads: int | None, seconds: float, batch_size: int,
                  out_size: int, representation: str = "evclip") -> tuple[float, float]:
    """Samples per wall second and per CPU second (all threads of this process) of the
    training pipeline. The CPU-second rate is the per-core rate and holds even when other
    jobs share the machine."""
    import tensorflow as tf

    from evclip_jax.data import pipeline

    ds = pipeline.make_dataset(data_dir, "train", global_batch_size=batch_size,
                               out_size=out_size, train=True, seed=0, process_index=0,
                               process_count=1, representation=representation)
    if threads is not None:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    it = ds.as_numpy_iterator()
    for _ in range(5):  # warm-up: tracing, first reads, the shuffle buffer
        next(it)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        n += int(batch["labels"].shape[0])
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def prep_batch(batch_size: int, size: int, representation: str, num_frames: int = 3,
               seed: int = 0) -> dict:
    """A batch of the pipeline's contract (random counts and images) on the first device."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    if representation == "evclip":
        events = rng.integers(0, 8, (batch_size, size, size), dtype=np.uint16)
    else:
        shape = [num_frames] if representation == "eventbind" else []
        events = rng.random((batch_size, *shape, size, size, 3), dtype=np.float32)
    batch = {"events": events,
             "images": rng.integers(0, 256, (batch_size, size, size), dtype=np.uint8),
             "labels": np.zeros(batch_size, np.int32), "mask": np.ones(batch_size, bool),
             "index": np.arange(batch_size, dtype=np.int32),
             "epoch": np.zeros(batch_size, np.int32)}
    return {k: jax.device_put(jnp.asarray(v), jax.devices()[0]) for k, v in batch.items()}


def bench_prepare(batch_size: int, size: int, representation: str, num_frames: int = 3,
                  repeats: int = 20) -> float:
    """Seconds per batch of the jitted ``device_prep.prepare`` with the release augmentation
    (paired, as the default config), on the first JAX device."""
    import jax

    from evclip_jax.data import device_prep
    from evclip_jax.data.augment import RELEASE_AUGMENT

    prep = device_prep.InputPrep(representation, size, augment=RELEASE_AUGMENT,
                                 fill=1.0 if representation == "eventbind" else 0.0)
    fn = jax.jit(lambda b: device_prep.prepare(b, prep))
    batch = prep_batch(batch_size, size, representation, num_frames)
    jax.block_until_ready(fn(batch))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import jax

    cores = os.cpu_count()
    print(f"{cores} cores, load average {os.getloadavg()[0]:.2f} at start")
    if not _PREP_ONLY.value:
        _host(cores)
    seconds = bench_prepare(_PREP_BATCH.value, _OUT_SIZE.value, _REPRESENTATION.value,
                            _NUM_FRAMES.value)
    print(f"(c) device_prep.prepare ({_REPRESENTATION.value}, release augmentation, paired) on "
          f"{jax.devices()[0].device_kind}: {1e3 * seconds:.3f} ms per batch of "
          f"{_PREP_BATCH.value} at {_OUT_SIZE.value}x{_OUT_SIZE.value}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


def _host(cores: int | None) -> None:
    """(a) and (b), printed."""
    unknown = sorted(set(_ENCODINGS.value) - set(ENCODINGS))
    if unknown:
        raise app.UsageError(f"--encodings: unknown {unknown}; expected of {list(ENCODINGS)}")
    frames, frames_cpu = bench_event_frame()
    print(f"(a) {_REPRESENTATION.value} frames ({_WINDOW.value} events, {SENSOR[1]}x{SENSOR[0]} "
          f"-> {_OUT_SIZE.value}): {frames:.1f} frames/s wall, {frames_cpu:.1f} frames per "
          "CPU-second")
    print(f"(b) tf.data, {_OUT_SIZE.value}x{_OUT_SIZE.value}, batch {_BATCH.value}, "
          f"{_WINDOWS.value} window(s) per record, {_NUM_RECORDS.value} records")
    header = (f"    {'encoding':<9} {'bytes/record':>12} {'1 thread: /s':>13} {'/CPU-s':>8} "
              f"{'pool: /s':>9} {'/CPU-s':>8} {f'cores for {_TARGET.value}/s':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        items = write_sources(os.path.join(tmp, "src"), _NUM_RECORDS.value, _WINDOW.value)
        rows = []
        for encoding in _ENCODINGS.value:
            out = os.path.join(tmp, encoding)
            size = write_records(items, out, encoding, out_size=_OUT_SIZE.value,
                                 window_k=_WINDOW.value, num_windows=_WINDOWS.value,
                                 representation=_REPRESENTATION.value,
                                 num_frames=_NUM_FRAMES.value)
            rates = [bench_tf_data(out, threads, _SECONDS.value, _BATCH.value, _OUT_SIZE.value,
                                   _REPRESENTATION.value) for threads in (1, None)]
            (one, one_cpu), (pool, pool_cpu) = rates
            rows.append(f"    {encoding:<9} {size:>12,.0f} {one:>13.1f} {one_cpu:>8.1f} "
                        f"{pool:>9.1f} {pool_cpu:>8.1f} {_TARGET.value / pool_cpu:>18.1f}")
        print("\n".join([header, *rows]))
    print(f"    ({cores} cores; rates per CPU-second of this process, tf.data default pool "
          "for the core count)")


if __name__ == "__main__":
    app.run(main)
