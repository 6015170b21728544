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
    """A TPU plane's "XLA Ops" line (not its other lines) and every CUDA stream line of a GPU
    plane (as jax 0.11 writes them on an H200: kernels named after the fusion, cuBLAS, cuDNN
    or NCCL) are summed by name; host planes are left out. By hand: fusion.1 3+1 = 4 us,
    nvjet gemm 5+4 = 9 us, the NCCL all-reduce 2 us, fusion.2 0.5 us, the cuDNN attention
    kernel 1.5 us, Memset 0 0.25 us: 17.25 us."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    names = {1: "fusion.1", 2: "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT", 3: "fusion.2",
             4: "ncclDevKernel_AllReduce_Sum_bf16_RING_LL",
             5: "cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 6: "Memset 0"}

    def plane(name, lines):
        p = space.planes.add()
        p.id, p.name = len(space.planes), name
        for i, op in names.items():
            p.event_metadata[i].id, p.event_metadata[i].name = i, op
        for line_name, events in lines.items():
            line = p.lines.add()
            line.id, line.name = len(p.lines), line_name
            at = 0
            for metadata_id, us in events:
                event = line.events.add()
                event.metadata_id, event.offset_ps = metadata_id, at
                event.duration_ps = int(us * 10**6)
                at += event.duration_ps

    plane("/device:TPU:0", {"XLA Ops": [(1, 3), (3, 0.5)], "XLA Modules": [(1, 50)]})
    plane("/device:GPU:0", {"Stream #14(Memset,Compute)": [(2, 5), (1, 1), (5, 1.5), (6, 0.25)],
                            "Stream #116(Compute)": [(4, 2)], "Launch Stats": [(2, 70)]})
    plane("/device:GPU:1", {"Stream #42(Compute)": [(2, 4)]})
    plane("/host:CPU", {"XLA Ops": [(3, 100)]})
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    (run / "host.xplane.pb").write_bytes(space.SerializeToString())

    times = profiling.device_op_times(tmp_path)
    assert times == {"fusion.1": (4000, 2), names[2]: (9000, 2), "fusion.2": (500, 1),
                     names[4]: (2000, 1), names[5]: (1500, 1), "Memset 0": (250, 1)}
    table = profiling.top_ops_table(times, steps=1, top=2).splitlines()
    assert table[1].split() == ["52.2%", "0.009", "2.0", names[2]]  # 9 of 17.25 us
    assert table[2].split() == ["23.2%", "0.004", "2.0", "fusion.1"]
    assert table[3] == ("by kind: matmul 0.009 ms (52.2%), elementwise 0.005 ms (26.1%), "
                        "collective 0.002 ms (11.6%), attention 0.002 ms (8.7%), "
                        "memory 0.000 ms (1.4%)")
    assert len(table) == 4
    assert profiling.top_ops_table(times, steps=2).splitlines()[2].split()[2] == "1.0"
    assert profiling.busiest_ops(times, steps=2, top=3) == [
        (names[2], 0.0045, 1.0), ("fusion.1", 0.002, 1.0), (names[4], 0.001, 0.5)]
    assert [profiling.op_kind(n) for n in (
        "input_transpose_fusion_126", "input_add_reduce_fusion_400", "gemm_fusion_dot_677",
        "loop_multiply_fusion_48", "all_reduce_220_fusion_1",
        "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>")] == [
        "transpose", "reduction", "matmul", "elementwise", "collective", "attention"]
