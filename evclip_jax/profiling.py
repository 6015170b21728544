"""Profiles: a jax.profiler trace of chosen training steps, and the busiest device ops of a
trace (what a step spends its device time on), read from its XSpace."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import jax


def device_op_times(trace_dir: str | Path) -> dict[str, tuple[float, int]]:
    """{op name: (total ns, executions)} over every device plane of the newest ``*.xplane.pb``
    under ``trace_dir``; {} where there is none (a CPU trace has no device planes).

    A TPU plane has an "XLA Ops" line: its events are the HLO ops. A GPU plane has one line
    per CUDA stream ("Stream #14(Compute)", ...): its events are the kernels, memsets and
    copies, named after the XLA fusion, the cuBLAS/cuDNN kernel or the NCCL collective (the
    HLO op behind a kernel is the command buffer that launched it when XLA uses CUDA graphs,
    so the kernel name is the one that tells ops apart)."""
    files = sorted(Path(trace_dir).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
    if not files:
        return {}
    total, count = Counter(), Counter()
    for plane in jax.profiler.ProfileData.from_file(str(files[-1])).planes:
        if not plane.name.startswith("/device:"):
            continue
        lines = list(plane.lines)
        ops = [line for line in lines if line.name == "XLA Ops"]
        for line in ops or [line for line in lines if line.name.startswith("Stream #")]:
            for event in line.events:
                total[event.name] += event.duration_ns
                count[event.name] += 1
    return {name: (total[name], count[name]) for name in total}


# What a device op is, from its name: (kind, name fragments), the first match wins. The
# fragments are those of XLA's fusion names, cuBLAS (nvjet, cutlass, gemm), cuDNN's fused
# attention (sdpa, flash, cudnn) and NCCL.
OP_KINDS = (
    ("collective", ("nccl", "all_reduce", "all-reduce", "all-gather", "all_gather",
                    "reduce-scatter", "reduce_scatter", "collective")),
    ("attention", ("sdpa", "flash", "fmha", "cudnn")),
    ("matmul", ("nvjet", "gemm", "cutlass", "cublas", "xmma", "convolution", "dot")),
    ("transpose", ("transpose", "copy")),
    ("reduction", ("reduce",)),
    ("memory", ("memset", "memcpy")),
)


def op_kind(name: str) -> str:
    """collective, attention, matmul, transpose, reduction, memory or elementwise."""
    lower = name.lower()
    for kind, fragments in OP_KINDS:
        if any(f in lower for f in fragments):
            return kind
    return "elementwise"


def kind_shares(times: dict[str, tuple[float, int]], steps: int) -> dict[str, float]:
    """{kind: ms per step} of ``times`` (device_op_times), busiest first."""
    ms = Counter()
    for name, (ns, _) in times.items():
        ms[op_kind(name)] += ns / steps / 1e6
    return dict(ms.most_common())


def busiest_ops(times: dict[str, tuple[float, int]], steps: int,
                top: int = 15) -> list[tuple[str, float, float]]:
    """The ``top`` ops by device time as (name, ms per step, executions per step)."""
    ranked = sorted(times.items(), key=lambda kv: -kv[1][0])[:top]
    return [(name, ns / steps / 1e6, n / steps) for name, (ns, n) in ranked]


def top_ops_table(times: dict[str, tuple[float, int]], steps: int, top: int = 15) -> str:
    """The ``top`` ops by device time: share of all device op time, ms and executions per
    step (summed over devices)."""
    all_ms = sum(ns for ns, _ in times.values()) / steps / 1e6 or 1.0
    lines = [f"{'share':>7}{'ms/step':>10}{'calls/step':>12}  op  "
             f"(device op time {all_ms:.2f} ms/step over all devices)"]
    for name, ms, calls in busiest_ops(times, steps, top):
        lines.append(f"{100 * ms / all_ms:6.1f}%{ms:10.3f}{calls:12.1f}  {name[:100]}")
    lines.append("by kind: " + ", ".join(f"{kind} {ms:.3f} ms ({100 * ms / all_ms:.1f}%)"
                                         for kind, ms in kind_shares(times, steps).items()))
    return "\n".join(lines)


class StepTrace:
    """``config.profile``: a jax.profiler trace of steps [start_step, start_step + num_steps)
    in ``<workdir>/profile`` (an ``.xplane.pb`` for TensorBoard's profile plugin and a
    ``perfetto_trace.json.gz`` for Perfetto), by process 0 only. Steps are the loop's 0-based
    ``at``; a run resumed past start_step takes no trace."""

    def __init__(self, profile, log_dir: Path):
        start, num = int(profile.start_step), int(profile.num_steps)
        if start < 0 or num < 0:
            raise ValueError(f"config.profile: start_step={start}, num_steps={num}; expected "
                             "both >= 0 (num_steps 0: no trace)")
        self.steps = range(start, start + num) if jax.process_index() == 0 else range(0)
        self.log_dir, self.active = log_dir, False

    def __enter__(self):
        return self

    def before_step(self, at: int) -> None:
        """Starts the trace before step ``at`` reads its batch."""
        if self.steps and at == self.steps.start:
            jax.profiler.start_trace(str(self.log_dir), create_perfetto_trace=True)
            self.active = True

    def after_step(self, at: int, state) -> None:
        """Ends the trace when ``at`` steps are done and the last traced one has run."""
        if self.active and at == self.steps.stop:
            jax.block_until_ready(state)
            self.__exit__()

    def __exit__(self, *exc):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile of steps %d-%d written to %s", self.steps.start,
                         self.steps.stop - 1, self.log_dir)
            times = device_op_times(self.log_dir)
            if times:
                logging.info("busiest device ops:\n%s", top_ops_table(times, len(self.steps)))
