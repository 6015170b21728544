"""config.profile: a jax.profiler trace of training steps N..M in workdir/profile, written by
process 0 only, that TensorBoard's profile plugin (XSpace protobuf) and Perfetto (trace JSON)
read; and the evaluation's progress bar with an ETA."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import jax
import pytest

from evclip_jax import profiling, trainer


def _tiny_config():
    sys.path.insert(0, str(Path(__file__).parent / "configs"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    return tiny.get_config()


def test_trace_of_steps_n_to_m(tmp_path):
    """Steps 1-2 of a 4-step tiny run: one run folder holding an XSpace that parses, and a
    Perfetto trace whose train-step executions are exactly those two steps on every device."""
    config = _tiny_config()
    config.num_train_steps = 4
    config.checkpoint.every_steps = 4
    config.debug.log_data_order = False
    config.profile.start_step, config.profile.num_steps = 1, 2
    trainer.train_and_evaluate(config, str(tmp_path))

    runs = list((tmp_path / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1, runs
    (xplane,) = runs[0].glob("*.xplane.pb")
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # the profile plugin's input

    space = xplane_pb2.XSpace()
    space.ParseFromString(xplane.read_bytes())
    host = {plane.name: plane for plane in space.planes}["/host:CPU"]
    assert sum(len(line.events) for line in host.lines) > 100

    with gzip.open(runs[0] / "perfetto_trace.json.gz", "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    executions = [e for e in events if e["name"].endswith("Execute (jit_train_step)")
                  and e["name"].startswith("[")]  # one per device and step
    assert len(executions) == 2 * jax.device_count()
    assert any(e["name"].startswith("all-reduce") for e in events)  # the step's XLA ops


def test_trace_only_on_process_zero(tmp_path, monkeypatch):
    """Process 0 traces steps [start_step, start_step + num_steps), another process never;
    bad settings are refused naming the field."""
    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: calls.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append("stop"))
    monkeypatch.setattr(jax, "block_until_ready", lambda tree: tree)
    profile = _tiny_config().profile
    profile.start_step, profile.num_steps = 1, 2
    for index, expected in ((0, [0, "start", 1, 2, "stop", 3]), (1, [0, 1, 2, 3])):
        monkeypatch.setattr(jax, "process_index", lambda i=index: i)
        calls.clear()
        with profiling.StepTrace(profile, tmp_path) as trace:
            for at in range(4):  # the loop: before the step, the step, after it
                trace.before_step(at)
                calls.append(at)
                trace.after_step(at + 1, None)
        assert calls == expected, index
    profile.num_steps = -1
    with pytest.raises(ValueError, match="config.profile: start_step=1, num_steps=-1"):
        profiling.StepTrace(profile, tmp_path)


def test_eval_pass_shows_progress_with_eta(tmp_path, capsys):
    """Each pass over an eval split counts its padded batches and shows the remaining time."""
    from evclip_jax import sharding
    from evclip_jax.data.synthetic import make_synthetic_dataset
    from evclip_jax.evaluate import runner

    manifests = make_synthetic_dataset(tmp_path, num_classes=3, per_class=6, image_size=16,
                                       splits={"test": 1.0})
    config = _tiny_config()
    config.eval.batch_size = 8
    mesh = sharding.make_mesh(**config.mesh)
    split = runner._open_split(config, tmp_path, "test", mesh, manifests["test"]["class_names"],
                               16)
    assert len(list(split())) == 3  # 18 records in batches of 8, the last one padded
    # tqdm's "n/total [elapsed<remaining" is the bar's count and ETA.
    assert re.search(r"eval test: 100%.*\| 3/3 \[\d\d:\d\d<\d\d:\d\d",
                     capsys.readouterr().err)


def test_busiest_device_ops_from_a_hand_made_xspace(tmp_path):
    """Two GPU planes' "XLA Ops" lines summed by op; host planes and other lines left out.
    By hand: fusion.1 3+1+2 = 6 us, gemm 5+4 = 9 us, fusion.2 0.5 us of 15.5 us."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    names = {1: "fusion.1", 2: "cublas_gemm", 3: "fusion.2"}

    def plane(name, line_name, events):
        p = space.planes.add()
        p.id, p.name = len(space.planes), name
        for i, op in names.items():
            p.event_metadata[i].id, p.event_metadata[i].name = i, op
        line = p.lines.add()
        line.id, line.name = 1, line_name
        at = 0
        for metadata_id, us in events:
            event = line.events.add()
            event.metadata_id, event.offset_ps = metadata_id, at
            event.duration_ps = int(us * 10**6)
            at += event.duration_ps

    plane("/device:GPU:0", "XLA Ops", [(1, 3), (2, 5), (1, 1), (3, 0.5)])
    plane("/device:GPU:1", "XLA Ops", [(1, 2), (2, 4)])
    plane("/device:GPU:1", "Stream #7", [(2, 100)])  # kernels: not ops
    plane("/host:CPU", "XLA Ops", [(3, 100)])
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    (run / "host.xplane.pb").write_bytes(space.SerializeToString())

    times = profiling.device_op_times(tmp_path)
    assert times == {"fusion.1": (6000, 3), "cublas_gemm": (9000, 2), "fusion.2": (500, 1)}
    table = profiling.top_ops_table(times, steps=1, top=2).splitlines()
    assert table[1].split() == ["58.1%", "0.009", "2.0", "cublas_gemm"]  # 9 of 15.5 us
    assert table[2].split() == ["38.7%", "0.006", "3.0", "fusion.1"]
    assert len(table) == 3
    assert profiling.top_ops_table(times, steps=2).splitlines()[2].split()[2] == "1.5"
    assert profiling.busiest_ops(times, steps=2, top=3) == [
        ("cublas_gemm", 0.0045, 1.0), ("fusion.1", 0.003, 1.5), ("fusion.2", 0.00025, 0.5)]
