r"""Input-pipeline throughput: event frames per second and tf.data samples per second.

(a) The --representation's frames function on one core (``event_frame`` for evclip): a
    30,000-event window on the 640x480 N-ImageNet sensor reduced to 224x224 (what a
    per-sample event-file loader would pay).
(b) ``make_dataset`` from paired TFRecords at 224x224 with the release augmentation, on
    synthetic records (random events, random-noise PNG images -- noise is the worst case for
    PNG decoding) written to a temporary folder with ``write_tfrecords``; measured with
    tf.data limited to 1 thread and with its default thread pool (all cores).
Rates are per wall second and per CPU second of this process (the per-core rate, robust to
other jobs on the machine). Cores for 10,000 samples/s = 10000 / (tf.data samples per
CPU-second).

    python tools/bench_data.py --num_records=128 --seconds=15 --representation=eventbind
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

from evclip_jax.events.frames import REPRESENTATIONS

_NUM_RECORDS = flags.DEFINE_integer("num_records", 128, "synthetic TFRecords to write")
_BATCH = flags.DEFINE_integer("batch_size", 32, "per-host batch size for the tf.data run")
_SECONDS = flags.DEFINE_float("seconds", 15.0, "measuring time per tf.data run")
_OUT_SIZE = flags.DEFINE_integer("out_size", 224, "frame/image side")
_TARGET = flags.DEFINE_integer("target", 10_000, "samples/s to size the CPU count for")
_REPRESENTATION = flags.DEFINE_enum("representation", "evclip", list(REPRESENTATIONS),
                                    "event representation of the records")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 3, "eventbind: frames per example")

SENSOR = (480, 640)
WINDOW = 30_000


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
    ev = _random_events(np.random.default_rng(0), WINDOW)
    make_frames(ev, SENSOR, _OUT_SIZE.value, **options)  # warm the coordinate tables
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        make_frames(ev, SENSOR, _OUT_SIZE.value, **options)
        n += 1
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def write_synthetic_records(out_dir: str, num_records: int) -> None:
    """Random events (.npz) and random RGB images (.png) packed with write_tfrecords."""
    import numpy as np
    from PIL import Image

    from evclip_jax.data.records import PairedItem, write_tfrecords
    from evclip_jax.events.io import write_events

    rng = np.random.default_rng(0)
    src = os.path.join(out_dir, "src")
    os.makedirs(src)
    items = []
    for i in range(num_records):
        event_path = os.path.join(src, f"{i:05d}.npz")
        image_path = os.path.join(src, f"{i:05d}.png")
        write_events(event_path, _random_events(rng, 2 * WINDOW))
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(image_path)
        items.append(PairedItem(event_path, image_path, i % 10))
    write_tfrecords(items, out_dir, class_names=[str(c) for c in range(10)],
                    out_size=_OUT_SIZE.value, sensor_size=SENSOR, window_k=WINDOW,
                    num_shards=4, split="train", representation=_REPRESENTATION.value,
                    num_frames=_NUM_FRAMES.value, progress=False)


def bench_tf_data(data_dir: str, threads: int | None, seconds: float) -> tuple[float, float]:
    """Samples per wall second and per CPU second (all threads of this process) of the
    training pipeline (release augmentation, paired). The CPU-second rate is the per-core
    rate and holds even when other jobs share the machine."""
    import tensorflow as tf

    from evclip_jax.data import pipeline
    from evclip_jax.data.augment import RELEASE_AUGMENT

    ds = pipeline.make_dataset(data_dir, "train", global_batch_size=_BATCH.value,
                               out_size=_OUT_SIZE.value, train=True, seed=0,
                               augment=RELEASE_AUGMENT, process_index=0, process_count=1,
                               representation=_REPRESENTATION.value)
    if threads is not None:
        options = tf.data.Options()
        options.threading.private_threadpool_size = threads
        options.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(options)
    it = iter(ds)
    for _ in range(5):  # warm-up: tracing, first reads
        next(it)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        batch = next(it)
        n += int(batch["labels"].shape[0])
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu)


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cores = os.cpu_count()
    print(f"{cores} cores, load average {os.getloadavg()[0]:.2f} at start")
    frames, frames_cpu = bench_event_frame()
    print(f"(a) {_REPRESENTATION.value} frames ({WINDOW} events, {SENSOR[1]}x{SENSOR[0]} -> "
          f"{_OUT_SIZE.value}): {frames:.1f} frames/s wall, {frames_cpu:.1f} frames per "
          "CPU-second")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_synthetic_records(tmp, _NUM_RECORDS.value)
        print(f"    wrote {_NUM_RECORDS.value} records in {time.perf_counter() - start:.1f} s")
        one, one_cpu = bench_tf_data(tmp, 1, _SECONDS.value)
        print(f"(b) tf.data ({_OUT_SIZE.value}x{_OUT_SIZE.value}, release augmentation, batch "
              f"{_BATCH.value}), 1 thread: {one:.1f} samples/s wall, {one_cpu:.1f} samples "
              "per CPU-second")
        pool, pool_cpu = bench_tf_data(tmp, None, _SECONDS.value)
        print(f"    tf.data, default pool on {cores} cores: {pool:.1f} samples/s wall, "
              f"{pool_cpu:.1f} samples per CPU-second")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print(f"cores for {_TARGET.value} samples/s: {_TARGET.value / pool_cpu:.0f} "
          f"(= {_TARGET.value} / {pool_cpu:.1f} samples per core-second, tf.data default pool, "
          f"from TFRecords); for comparison {_TARGET.value / frames_cpu:.0f} cores for "
          f"the {_REPRESENTATION.value} frames alone at {frames_cpu:.1f} frames per core-second "
          "(no file reading, no image)")


if __name__ == "__main__":
    app.run(main)
