r"""Train-step speed of the project against the shared PyTorch peer, one table per case; and the
GPU parity of the Flax CLIP with HF (``--check``).

Benchmark (default): each case ``model:batch`` (b32 = ViT-B/32, l14 = ViT-L/14, tiny for a CPU;
random init built from config, nothing downloaded) runs its variants. A project variant is a
named set of config overrides (``VARIANTS``) of ``config_base.base_config()``; its step is the
trainer's (``step.setup`` on a mesh of all visible devices, donated state, the frozen image
tower run inside the step or, for ``cached``, precomputed embeddings in its place, 100 class
text embeddings precomputed), each variant in its own process, so that each one has the GPU
to itself and its peak memory is its own (JAX preallocates). The variant ``peer`` runs
``--peer`` (``../shared/bench/peer_torch_step.py``: HF towers, SDPA, bf16 autocast, fused AdamW,
eager and torch.compile) on the same cases in one process, after the project's variants, or at
the same time on another GPU with ``--peer_gpu`` (the project's variants then run on one GPU,
the first one that is not the peer's).

Time: the first (compiling) step, ``--warmup`` steps, then ``--repeats`` runs of ``--steps``
steps with a device sync at the end of each; the median per-step time is reported (the peer
times its own way: 5 warm-up steps, the median of 3 runs of ``--steps``). Inputs are random
arrays already on the device. MFU counts the matmul FLOPs of the step that ran (``step_flops``:
the event tower's forward and backward, 3 forwards, plus the frozen image tower's forward unless
its embeddings are cached; remat's recomputation is not counted), the same count for the
peer's rows, against ``--peak_tflops`` or the device's bf16 dense peak. Each table gives
samples/s, step ms, MFU, peak memory and the ratios of samples/s to the peer's compile and
eager modes and to the project's ``step`` variant; the raw results go to ``--result_json``.

``--check``: on the GPU, the Flax towers against HF transformers' CLIPModel with the same random
weights (converted with evclip_jax.convert), float32 with matmul precision "highest" and TF32
off (relative error <= 1e-4 on image, event and text embeddings), and bf16 (reported).

    python tools/bench_train_step.py --cases=b32:256:step+cached+peer,l14:128:step+peer,\
l14:512:step+remat_matmuls --result_json=bench_train_step.json
    python tools/bench_train_step.py --check --bench=false --cases=b32:8,l14:8

Imports no TensorFlow; its config is config_base.base_config() (carry ml_collections as a wheel
where it is not installed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import NamedTuple

from absl import app, flags

from evclip_jax import config_base

PEER = "peer"  # the variant that runs the shared PyTorch peer
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CASES = flags.DEFINE_list(
    "cases", ["b32:256", "l14:128"],
    "cases model:batch[:variant+variant...] (model b32, l14 or tiny; batch global); a case "
    f"without variants runs --variants. Variants: {PEER} and the names of VARIANTS")
_VARIANTS = flags.DEFINE_list("variants", ["step", PEER], "variants of a case that names none")
_SET = flags.DEFINE_multi_string(
    "set", [], "field=value: a base_config() field set in every project variant, after the "
    "variant's own (e.g. model.attention_impl=xla on a CPU); repeatable")
_PEER = flags.DEFINE_string("peer", os.path.join(_REPO, "..", "shared", "bench",
                                                 "peer_torch_step.py"),
                            "the PyTorch peer script (its --cases, --modes, --steps)")
_PEER_MODES = flags.DEFINE_list("peer_modes", ["eager", "compile"], "the peer's --modes")
_PEER_GPU = flags.DEFINE_integer(
    "peer_gpu", -1, ">= 0: run the peer on this GPU at the same time as the project's variants "
    "(which then run on GPU 0, or 1 if the peer has 0); they share the host's CPUs, which slowed "
    "the peer's ViT-B/32 step by a fifth on an H200 pair; -1: the peer after them, on all GPUs")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per repeat")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repeats (the median is reported)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after the first (compiling) one")
_BENCH = flags.DEFINE_bool("bench", True, "run the throughput benchmark")
_CHECK = flags.DEFINE_bool("check", False, "run the GPU parity check (Flax vs HF torch)")
_CHECK_BATCH = flags.DEFINE_integer("check_batch", 8, "images per parity check")
_DEADLINE = flags.DEFINE_float("deadline_s", 0.0,
                               "> 0: skip variants that would start after this many seconds, "
                               "and kill a running one (or the peer) at it")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0,
                           "bf16 dense peak per device for MFU; 0: from the device name")
_FIT = flags.DEFINE_list(
    "fit_batches", [], "after timing, compile (not run) each variant's step at these global "
    "batch sizes, ascending, up to the first whose planned memory exceeds the device's limit")
_TRACE_DIR = flags.DEFINE_string(
    "trace_dir", "", "if set, a jax.profiler trace of 3 more steps of each project variant in "
    "DIR/<model>_<batch>_<variant>, and its busiest device ops printed")
_RESULT_JSON = flags.DEFINE_string("result_json", "bench_train_step.json",
                                   "where the raw results go (JSON); empty: nowhere")
_WORKER = flags.DEFINE_enum("worker", "", ["", "jax", "check"],
                            "internal: run one variant (or the check) in this process")
_VARIANT = flags.DEFINE_string("variant", "", "internal: the worker's variant")
_WORKER_CASE = flags.DEFINE_string("worker_case", "", "internal: the worker's model:batch")
_RESULT_FILE = flags.DEFINE_string("result_file", "", "internal: where the worker writes")

NUM_CLASSES = 100
_START = [time.time()]
_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"bench_train_step_jax_cache_{os.getpid()}")
# bf16 dense tensor-core peak per GPU (datasheet, SXM) for the MFU column.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}
TRACE_STEPS = 3  # steps in each --trace_dir trace

# Project variants: config overrides of bench_config(), from config_base.VARIANTS where it
# names them. "step" is the fast default on a GPU: bf16 compute, cuDNN fused attention.
_FAST = config_base.VARIANTS["cudnn"]
VARIANTS = {
    "step": dict(_FAST),
    # Precomputed image-tower embeddings replace the frozen forward (records' teacher_emb).
    "cached": {**_FAST, **config_base.VARIANTS["teacher_emb"]},
    "remat_matmuls": {**_FAST, "model.remat": "matmuls"},
    "remat_matmuls_attention": {**_FAST, "model.remat": "matmuls_attention"},
    "remat_full": {**_FAST, "model.remat": "full"},
    "xla_attention": {**config_base.VARIANTS["bf16"], "model.attention_impl": "xla"},
    # Two devices shared by parameter sharding (FSDP) or by tensor parallelism, not by data.
    "fsdp2": {**_FAST, "mesh.fsdp": 2},
    "tensor2": {**_FAST, "mesh.tensor": 2},
}

# Sizes of HF's openai/clip-vit-base-patch32 and clip-vit-large-patch14 (TowerConfig fields).
MODELS = {
    "b32": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=32),
            "text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8),
            "projection_dim": 512},
    "l14": {"vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14),
            "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12),
            "projection_dim": 768},
    # For trying the tool on a CPU.
    "tiny": {"vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, image_size=32, patch_size=8),
             "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, vocab_size=1000, max_position_embeddings=16,
                          eos_token_id=999),
             "projection_dim": 32},
}


class Case(NamedTuple):
    """One table: a model at a global batch size, and the variants to run on it."""

    model: str
    batch_size: int
    variants: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.model}:{self.batch_size}"


def parse_cases(items: list[str], default_variants: list[str]) -> list[Case]:
    """``--cases`` entries ``model:batch[:v1+v2...]`` -> Cases; ValueError naming the entry."""
    known = [*VARIANTS, PEER]
    cases = []
    for item in items:
        parts = item.split(":")
        variants = parts[2].split("+") if len(parts) == 3 else list(default_variants)
        if len(parts) not in (2, 3) or parts[0] not in MODELS or not parts[1].isdigit() \
                or int(parts[1]) < 1:
            raise ValueError(f"--cases entry {item!r}: expected model:batch[:variant+...] with "
                             f"model one of {', '.join(MODELS)} and a positive batch")
        unknown = [v for v in variants if v not in known]
        if unknown or not variants:
            raise ValueError(f"--cases entry {item!r}: variants {unknown or variants}; "
                             f"expected some of {', '.join(known)}")
        cases.append(Case(parts[0], int(parts[1]), tuple(dict.fromkeys(variants))))
    return cases


def parse_overrides(items: list[str]) -> dict:
    """``--set`` entries ``field=value`` -> {field: value}, each value converted to the type of
    the base_config() field; ValueError naming the entry for an unknown field or a bad value."""
    base = bench_config(1)
    out = {}
    for item in items:
        field, sep, raw = item.partition("=")
        node = base
        try:
            for name in field.split("."):
                node = node[name]
        except (KeyError, AttributeError, TypeError):
            node = None
        if not sep or node is None or isinstance(node, (dict, list, tuple)) \
                or hasattr(node, "keys"):
            raise ValueError(f"--set {item!r}: expected field=value with a scalar field of "
                             "config_base.base_config(), e.g. model.attention_impl=xla")
        if isinstance(node, bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError(f"--set {item!r}: expected true or false")
            out[field] = raw.lower() == "true"
        else:
            try:
                out[field] = type(node)(raw)
            except ValueError as e:
                raise ValueError(f"--set {item!r}: expected a {type(node).__name__}") from e
    return out


def clip_config(model: str):
    """evclip_jax CLIPConfig of a MODELS entry (quick_gelu, LayerNorm eps 1e-5)."""
    from evclip_jax.models.clip import CLIPConfig, TowerConfig

    m = MODELS[model]
    p = m["projection_dim"]
    return CLIPConfig(vision=TowerConfig(**m["vision"], projection_dim=p),
                      text=TowerConfig(**m["text"], projection_dim=p), projection_dim=p)


def bench_config(batch_size: int):
    """The training config of the benchmark: ``base_config()`` (the paper's objective and loss,
    the release's optimizer) at this global batch size."""
    config = config_base.base_config()
    config.batch_size = batch_size
    config.optim.warmup_steps = 100
    config.num_train_steps = 10_000
    return config


def step_flops(model: str, batch_size: int, cached: bool = False) -> float:
    """Matmul FLOPs (2 per multiply-add) of one train step over the global batch.

    One vision-tower forward per image: patch embedding, per layer the q/k/v/out projections
    (8 T D^2), the MLP (4 T D F) and attention's two batched products (4 T^2 D), then the
    projection of the class token. The step runs the event tower forward and backward (3x a
    forward) and, unless the image embeddings are ``cached``, the frozen image tower forward
    (1x). The losses' products are counted too: e v^T and its gradient (L_ct), v v^T, v e^T
    and its gradient (L_kl), v t^T, e t^T and its gradient (L_zs, 100 classes). XLA's cost
    analysis on the GPU leaves out cuBLAS and cuDNN custom calls, so it cannot give this
    number there.
    """
    v, p = clip_config(model).vision, MODELS[model]["projection_dim"]
    t, d, f = v.num_patches + 1, v.hidden_size, v.intermediate_size
    patch = 2 * v.num_patches * v.patch_size**2 * v.num_channels * d
    layer = 8 * t * d * d + 4 * t * d * f + 4 * t * t * d
    forward = patch + v.num_hidden_layers * layer + 2 * d * p
    n = batch_size
    losses = 2 * p * (5 * n * n + 3 * n * NUM_CLASSES)
    return float((3 if cached else 4) * forward * batch_size + losses)


# ----------------------------------------------------------------------------- JAX worker


def _flops(cost) -> float | None:
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _set_field(cfg, field: str, value) -> None:
    *parents, name = field.split(".")
    for parent in parents:
        cfg = cfg[parent]
    cfg[name] = value


def build_jax_step(model: str, batch_size: int, overrides: dict | None = None, devices=None):
    """(config, step.Setup, batch): the trainer's step for ``model`` (step.setup from
    base_config() with ``overrides``, {"model.remat": "matmuls", ...}; random params made on
    the device) and a random batch already placed. With ``data.teacher_emb`` the batch carries
    precomputed image embeddings in place of the images (the cached-teacher step)."""
    import jax
    import jax.numpy as jnp

    from evclip_jax import embed, sharding, step, text

    clip_cfg = clip_config(model)
    cfg = bench_config(batch_size)
    for field, value in (overrides or {}).items():
        _set_field(cfg, field, value)
    devices = jax.local_devices() if devices is None else devices
    if cfg.batch_size % len(devices):
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {len(devices)} devices")
    mesh = sharding.make_mesh(**cfg.mesh, devices=devices)
    towers = step.make_towers(cfg, clip_cfg)

    # Random params made on the host: XLA's CPU backend compiles and runs the init in seconds,
    # where a GPU spent over a minute compiling it. Its forward pass (which only gives the
    # shapes) runs XLA attention there, which has no params of its own.
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        params = jax.jit(dataclasses.replace(towers, attention_impl="xla").init)(
            jax.random.key(cfg.seed))
    prompts = [cfg.data.prompt.format(label=name) for name in class_names()]
    ids = text.hash_tokenize(prompts, clip_cfg.text)  # random text tower: any ids will do
    text_emb = embed.class_text_embeddings(
        towers.text, jax.device_put(params["text_tower"], devices[0]), ids)
    setup = step.setup(cfg, towers, params, text_emb, mesh, total_steps=cfg.num_train_steps,
                       warmup_steps=cfg.optim.warmup_steps)
    del params

    v = clip_cfg.vision
    shape = (cfg.batch_size, v.image_size, v.image_size, v.num_channels)
    second = "teacher_emb" if cfg.data.teacher_emb else "images"

    def make_batch(key):
        k1, k2, k3 = jax.random.split(key, 3)
        other = (jax.random.normal(k2, (cfg.batch_size, v.projection_dim), jnp.float32)
                 if cfg.data.teacher_emb else jax.random.normal(k2, shape, jnp.float32))
        return {"events": jax.random.uniform(k1, shape, jnp.float32, -1.0, 1.0),
                second: other,
                "labels": jax.random.randint(k3, (cfg.batch_size,), 0, NUM_CLASSES, jnp.int32)}

    batch_sh = {"events": sharding.batch_sharding(mesh, 4),
                second: sharding.batch_sharding(mesh, 2 if cfg.data.teacher_emb else 4),
                "labels": sharding.batch_sharding(mesh, 1)}
    batch = jax.jit(make_batch, out_shardings=batch_sh)(jax.random.key(1))
    return cfg, setup, batch


def class_names() -> list[str]:
    return [f"class {i}" for i in range(NUM_CLASSES)]


def jax_bench(case: Case, variant: str, steps: int, repeats: int, warmup: int) -> dict:
    """Times the trainer's step of ``variant`` (VARIANTS, then --set) on ``case``."""
    import flax
    import jax
    import numpy as np

    from evclip_jax import profiling

    t_start = time.perf_counter()

    def phase(what: str) -> None:
        print(f"  [{time.perf_counter() - t_start:6.1f} s] {what}", flush=True)

    overrides = {**VARIANTS[variant], **parse_overrides(_SET.value)}
    cfg, s, batch = build_jax_step(case.model, case.batch_size, overrides)
    state, frozen, text_emb = s.state, s.frozen, s.classes
    mesh = text_emb.sharding.mesh
    devices = jax.local_devices()
    phase("params initialised and placed, optimizer state and class text embeddings ready")

    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = s.step_fn.lower(state, frozen, text_emb, batch).compile()
        compile_s = time.perf_counter() - t0
        compiled_flops = _flops(compiled.cost_analysis())
        step_mem = compiled.memory_analysis()
        phase(f"train step compiled in {compile_s:.1f} s")
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, text_emb, batch)
        jax.block_until_ready((state, metrics))
        first_s = time.perf_counter() - t0
        for _ in range(warmup):
            state, metrics = compiled(state, frozen, text_emb, batch)
        jax.block_until_ready((state, metrics))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, frozen, text_emb, batch)
            jax.block_until_ready((state, metrics))
            times.append((time.perf_counter() - t0) / steps)
        phase("timed")
        trace_dir = (os.path.join(_TRACE_DIR.value, f"{case.model}_{case.batch_size}_{variant}")
                     if _TRACE_DIR.value else None)
        op_times = {}
        if trace_dir:
            jax.profiler.start_trace(trace_dir)
            for _ in range(TRACE_STEPS):
                state, metrics = compiled(state, frozen, text_emb, batch)
            jax.block_until_ready((state, metrics))
            jax.profiler.stop_trace()
            op_times = profiling.device_op_times(trace_dir)
            phase(f"{TRACE_STEPS} steps traced in {trace_dir}" + (
                ":\n" + profiling.top_ops_table(op_times, TRACE_STEPS) if op_times else
                " (no device op lines: a CPU trace)"))
        # The high-water mark of every device since the process began, read before
        # --fit_batches compiles anything more.
        peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices]
        fit = []
        for size in sorted(int(b) for b in _FIT.value):
            fit.append(fit_batch(s.step_fn, (state, frozen, text_emb), batch, size, devices))
            if not fit[-1]["fits"]:
                break
        if fit:
            phase("fit: " + fit_line(fit))
    values = {k: float(x) for k, x in jax.device_get(metrics).items()}
    if not np.isfinite(values["loss"]):
        raise FloatingPointError(f"{variant}: non-finite loss {values['loss']}")
    step_bytes = planned_bytes(step_mem)
    return {
        "step_s": sorted(times)[len(times) // 2],
        "step_s_all": times,
        "compile_s": compile_s,
        "first_step_s": first_s,
        "flops": step_flops(case.model, cfg.batch_size, cached=cfg.data.teacher_emb),
        # What XLA counts in the compiled program: on the GPU without the cuBLAS/cuDNN calls.
        "xla_compiled_flops_per_device": compiled_flops,
        "overrides": overrides,
        "loss": values["loss"],
        "grad_norm": values["grad_norm"],
        "peak_mem_gib": max(peaks) / 2**30 or None,
        "step_mem_gib": step_bytes / 2**30 or None,
        "devices": len(devices),
        "device": devices[0].device_kind,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "versions": f"jax {jax.__version__}, flax {flax.__version__}",
        "trace_dir": trace_dir,
        # The 30 busiest device ops of the trace: [name, ms per step, calls per step].
        "top_ops": profiling.busiest_ops(op_times, TRACE_STEPS, top=30),
        "op_kinds": profiling.kind_shares(op_times, TRACE_STEPS),  # {kind: ms per step}
        # --fit_batches: [{"batch", "step_mem_gib", "limit_gib", "fits"}] up to the first misfit.
        "fit": fit,
    }


def planned_bytes(mem) -> int:
    """What XLA plans for a compiled step on one device (its memory_analysis): arguments,
    outputs and temporaries, less the donated (aliased) buffers; 0 where it gives none."""
    if mem is None:
        return 0
    return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)


def fit_batch(step_fn, args: tuple, batch: dict, batch_size: int, devices) -> dict:
    """Compiles (does not run) ``step_fn`` at global ``batch_size`` and compares its planned
    memory per device with the devices' allocator limit; where the backend reports no limit
    (a CPU), it fits."""
    import jax

    abstract = {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=v.sharding)
                for k, v in batch.items()}
    planned = planned_bytes(step_fn.lower(*args, abstract).compile().memory_analysis())
    limit = min((d.memory_stats() or {}).get("bytes_limit", 0) for d in devices)
    return {"batch": batch_size, "step_mem_gib": planned / 2**30,
            "limit_gib": limit / 2**30 or None, "fits": not limit or planned <= limit}


def fit_line(fit: list[dict]) -> str:
    """"1024 fits (118.20 of 125.00 GiB); 1536 does not (170.31 of 125.00 GiB)"."""
    limit = (lambda f: f" of {f['limit_gib']:.2f}" if f["limit_gib"] else "")
    return "; ".join(f"{f['batch']} {'fits' if f['fits'] else 'does not'} "
                     f"({f['step_mem_gib']:.2f}{limit(f)} GiB)" for f in fit)


def run_worker() -> None:
    """One variant in this process; the result (or the error) goes to --result_file."""
    try:
        if _WORKER.value == "check":
            out = run_check()
        else:
            case = parse_cases([f"{_WORKER_CASE.value}:{_VARIANT.value}"], [])[0]
            out = jax_bench(case, _VARIANT.value, _STEPS.value, _REPEATS.value, _WARMUP.value)
    except Exception as e:  # reported in the table; the other variants still run
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    with open(_RESULT_FILE.value, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------- benchmark


def _time_left() -> float | None:
    """Seconds left before --deadline_s (counted from the start of main), None without one."""
    return _DEADLINE.value - (time.time() - _START[0]) if _DEADLINE.value else None


def _gpu_id(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry of the index-th visible GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return str(index)
    ids = visible.split(",")
    if index >= len(ids):
        raise ValueError(f"--peer_gpu={_PEER_GPU.value}: CUDA_VISIBLE_DEVICES={visible} has "
                         f"{len(ids)} GPUs")
    return ids[index]


def _spawn(worker: str, case: str, variant: str, env: dict, timeout: float | None) -> dict:
    """Runs one worker in a fresh process (the GPU to itself); returns its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={worker}",
           f"--worker_case={case}", f"--variant={variant}", f"--result_file={result_file}",
           f"--steps={_STEPS.value}", f"--repeats={_REPEATS.value}", f"--warmup={_WARMUP.value}",
           f"--cases={','.join(_CASES.value)}", f"--check_batch={_CHECK_BATCH.value}",
           f"--trace_dir={_TRACE_DIR.value}", f"--fit_batches={','.join(_FIT.value)}",
           *[f"--set={item}" for item in _SET.value]]
    env = dict(env)
    if worker == "jax":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # alone on the GPU
    # Shared by this invocation's workers: set-up programs (init, text tower) compile once.
    # The timed step is compiled afresh per variant, and its compile time is reported.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
    print(f"\n=== {worker} {variant} {case} ===", flush=True)
    t0 = time.time()
    try:
        subprocess.run(cmd, env=env, timeout=timeout, check=False)
        with open(result_file) as f:
            out = json.load(f)
    except subprocess.TimeoutExpired:
        out = {"error": f"killed at the deadline after {time.time() - t0:.0f} s"}
    except (OSError, json.JSONDecodeError) as e:
        out = {"error": f"worker wrote no result ({type(e).__name__})"}
    finally:
        if os.path.exists(result_file):
            os.remove(result_file)
    out["wall_s"] = round(time.time() - t0, 1)
    summary = {k: out[k] for k in ("step_s", "loss", "error", "wall_s") if k in out}
    print(f"=== {worker} {variant} {case}: {summary}", flush=True)
    return out


class PeerRun:
    """The peer script over every case that names ``peer``, in one process; its stdout (a
    header line, then one JSON line per case and mode) goes to a temporary file."""

    def __init__(self, cases: list[Case], env: dict):
        self.cmd = [sys.executable, os.path.abspath(_PEER.value),
                    "--cases=" + ",".join(f"{c.model.upper()}:{c.batch_size}" for c in cases),
                    f"--modes={','.join(_PEER_MODES.value)}", f"--steps={_STEPS.value}"]
        self.gpu = env.get("CUDA_VISIBLE_DEVICES")
        self.out = tempfile.TemporaryFile("w+")
        print(f"\n=== peer: {' '.join(self.cmd)} (CUDA_VISIBLE_DEVICES={self.gpu}) ===",
              flush=True)
        self.t0 = time.time()
        self.proc = subprocess.Popen(self.cmd, env=env, stdout=self.out)

    def finish(self, timeout: float | None) -> dict:
        """Waits (killing it at ``timeout``); {"results": {(model, batch, mode): line}, ...}."""
        try:
            returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            returncode = f"killed at the deadline after {time.time() - self.t0:.0f} s"
            self.proc.wait()
        self.out.seek(0)
        lines = self.out.read().splitlines()
        self.out.close()
        print("\n".join(["=== peer output:", *lines]), flush=True)
        results, header = {}, []
        for line in lines:
            if not line.startswith("{"):
                header.append(line)
                continue
            r = json.loads(line)
            results[(str(r["arch"]).lower(), int(r["batch"]), str(r["mode"]))] = r
        return {"command": self.cmd, "cuda_visible_devices": self.gpu, "returncode": returncode,
                "header": "\n".join(header), "results": results}


def peer_row(case: Case, mode: str, peer: dict) -> dict:
    """The peer's line for (case, mode) as a table row: our FLOP count of the full step."""
    line = peer["results"].get((case.model, case.batch_size, mode))
    if line is None:
        return {"error": f"no peer result (exit {peer['returncode']})"}
    if "step_ms" not in line:
        return {"error": str(line.get("error", "?")), "peer": line}
    # The header's first line is "<torch version> <device name>".
    device = peer["header"].splitlines()[0].partition(" ")[2] if peer["header"] else ""
    return {"step_s": line["step_ms"] / 1e3, "flops": step_flops(case.model, case.batch_size),
            "devices": 1, "device": device, "peak_mem_gib": line.get("peak_mem_gb"),
            "loss": line.get("loss"), "peer": line}


def _peak_flops(device: str) -> float | None:
    if _PEAK.value:
        return _PEAK.value * 1e12
    for name, tflops in PEAK_TFLOPS.items():
        if name in device:
            return tflops * 1e12
    return None


def case_table(case: Case, rows: dict[str, dict]) -> str:
    """samples/s, step ms, MFU, peak memory and ratios of samples/s for one case."""
    batch = case.batch_size
    rate = {name: batch / r["step_s"] for name, r in rows.items() if "step_s" in r}
    refs = [n for n in (f"{PEER}-compile", f"{PEER}-eager", "step") if n in rate]
    head = (f"{'variant':<24}{'samples/s':>11}{'step ms':>10}{'MFU':>8}{'peak GiB':>10}"
            f"{'step GiB':>10}"
            + "".join(f"{'/' + n:>15}" for n in refs) + f"{'compile s':>11}{'loss':>10}")
    lines = [f"{case.name}: global batch {batch}", head]
    for name, r in rows.items():
        if "step_s" not in r:
            lines.append(f"{name:<24}  FAILED: {r.get('error', '?')}")
            continue
        peak = _peak_flops(r.get("device", ""))
        mfu = (f"{100 * r['flops'] / r['step_s'] / (r['devices'] * peak):7.1f}%"
               if peak else f"{'-':>8}")
        mem, step_mem = r.get("peak_mem_gib"), r.get("step_mem_gib")
        comp = r.get("compile_s")
        loss = r.get("loss")
        lines.append(
            f"{name:<24}{rate[name]:>11.1f}{1e3 * r['step_s']:>10.2f}{mfu}"
            f"{(f'{mem:.2f}' if mem else '-'):>10}{(f'{step_mem:.2f}' if step_mem else '-'):>10}"
            + "".join(f"{rate[name] / rate[n]:>15.3f}" for n in refs)
            + f"{(f'{comp:.1f}' if comp is not None else '-'):>11}"
            + f"{(f'{loss:.4f}' if loss is not None else '-'):>10}")
    devices: dict[str, list[str]] = {}
    for name, r in rows.items():
        if "devices" in r:
            devices.setdefault(f"{r['devices']} x {r['device']}", []).append(name)
    lines.append("devices: " + "; ".join(f"{', '.join(names)} on {where}"
                                         for where, names in devices.items()))
    lines += [f"{name} at larger global batches: {fit_line(r['fit'])}"
              for name, r in rows.items() if r.get("fit")]
    return "\n".join(lines)


def run_bench(cases: list[Case]) -> dict:
    """Every project variant of every case (one process each), then or meanwhile the peer."""
    peer_cases = [c for c in cases if PEER in c.variants]
    jax_env, peer = dict(os.environ), None
    if peer_cases and _PEER_GPU.value >= 0:
        peer_env = dict(os.environ, CUDA_VISIBLE_DEVICES=_gpu_id(_PEER_GPU.value))
        jax_env["CUDA_VISIBLE_DEVICES"] = _gpu_id(1 if _PEER_GPU.value == 0 else 0)
        peer = PeerRun(peer_cases, peer_env)
    rows: dict[str, dict[str, dict]] = {}
    for case in cases:
        rows[case.name] = {}
        for variant in case.variants:
            if variant == PEER:
                continue
            left = _time_left()
            if left is not None and left < 20:
                rows[case.name][variant] = {"error": "skipped: deadline"}
                continue
            rows[case.name][variant] = _spawn("jax", case.name, variant, jax_env, left)
    peer_out = None
    if peer_cases:
        peer = peer or PeerRun(peer_cases, dict(os.environ))
        peer_out = peer.finish(_time_left())
        for case in peer_cases:
            for mode in _PEER_MODES.value:
                rows[case.name][f"{PEER}-{mode}"] = peer_row(case, mode, peer_out)
        peer_out["results"] = list(peer_out["results"].values())
    tables = [case_table(case, rows[case.name]) for case in cases]
    print("\n" + "\n\n".join(tables), flush=True)
    versions = sorted({r["versions"] for case_rows in rows.values() for r in case_rows.values()
                       if "versions" in r})
    if peer_out and peer_out["header"]:
        versions.append(f"peer: {peer_out['header']}")
    print("versions: " + "; ".join(versions), flush=True)
    return {"cases": {c.name: {"model": c.model, "batch_size": c.batch_size,
                               "rows": rows[c.name]} for c in cases},
            "peer": peer_out, "tables": tables}


# ----------------------------------------------------------------------------- parity check


def _rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_model(model: str, dev) -> dict:
    """Errors of the Flax towers against an HF CLIPModel with the same random weights."""
    import jax
    import numpy as np
    import torch
    import transformers

    from evclip_jax import convert, step

    clip_cfg = clip_config(model)
    hf_cfg = transformers.CLIPConfig(**clip_cfg.to_hf_dict())
    torch.manual_seed(0)
    with dev:
        hf = transformers.CLIPModel._from_config(hf_cfg, attn_implementation="sdpa")
    hf = hf.float().eval()
    with torch.no_grad():  # non-zero biases and norms, so that a dropped one shows
        for name, p in hf.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.02)
    state = {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()
             if not k.endswith("position_ids")}
    params = convert.state_dict_to_params(state, clip_cfg)
    back = convert.params_to_state_dict(params)
    round_trip = set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    del back, state

    b, v, t = _CHECK_BATCH.value, clip_cfg.vision, clip_cfg.text
    rng = np.random.default_rng(0)
    x = rng.normal(size=(b, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
    ids = np.full((b, t.max_position_embeddings), t.eos_token_id, np.int32)
    ids[:, 0] = t.vocab_size - 2  # a start token (49406 in the full-size vocabulary)
    for i in range(b):  # prompts of different lengths, each ended by the eos token
        length = 3 + (i * 5) % (t.max_position_embeddings - 4)
        ids[i, 1:length] = rng.integers(1, t.vocab_size - 2, size=length - 1)
        ids[i, length] = t.eos_token_id
    x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
    ids_t = torch.from_numpy(ids.astype(np.int64)).to(dev)

    def hf_feats(autocast: bool):
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=autocast):
            img = hf.get_image_features(pixel_values=x_t)
            txt = hf.get_text_features(input_ids=ids_t)
        img = getattr(img, "pooler_output", img)  # transformers 5 returns a model output
        txt = getattr(txt, "pooler_output", txt)
        return img.float().cpu().numpy(), txt.float().cpu().numpy()

    ref_img, ref_txt = hf_feats(False)
    hf_bf16_img, hf_bf16_txt = hf_feats(True)
    hf.to("cpu")  # frees its GPU memory for the Flax copies
    dev_params = jax.device_put(params)

    def errs(dtype: str, attention: str):
        cfg = bench_config(b)
        cfg.model.update(dtype=dtype, attention_impl=attention)
        towers = step.make_towers(cfg, clip_cfg)
        vis = jax.jit(lambda p, a: towers.vision.apply({"params": p}, a))
        txt = jax.jit(lambda p, a: towers.text.apply({"params": p}, a))
        return {"image": _rel_err(vis(dev_params["image_tower"], x), ref_img),
                "event": _rel_err(vis(dev_params["event_tower"], x), ref_img),
                "text": _rel_err(txt(dev_params["text_tower"], ids), ref_txt)}

    res = {"conversion_round_trip_exact": round_trip}
    with jax.default_matmul_precision("highest"):
        res["float32_xla"] = errs("float32", "xla")
    for attention in ("cudnn", "xla"):
        try:
            res[f"bf16_{attention}"] = errs("bfloat16", attention)
        except Exception as e:
            res[f"bf16_{attention}"] = {
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    res["hf_torch_bf16_autocast"] = {"image": _rel_err(hf_bf16_img, ref_img),
                                     "text": _rel_err(hf_bf16_txt, ref_txt)}
    res["float32_within_1e-4"] = round_trip and max(res["float32_xla"].values()) <= 1e-4
    return res


def _models() -> list[str]:
    """The models of --cases, in order."""
    return list(dict.fromkeys(item.split(":")[0] for item in _CASES.value))


def run_check() -> dict:
    """Flax towers vs HF CLIPModel on the GPU (same random weights), float32 and bf16."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
    import jax
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"check on jax {jax.devices()[0].device_kind} / torch {dev}", flush=True)
    results: dict = {}
    for model in _models():
        results[model] = _check_model(model, dev)
        print(f"{model}: {json.dumps(results[model], indent=1)}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    failed = [m for m in results if not results[m]["float32_within_1e-4"]]
    print("\nPARITY float32 (limit 1e-4): " + ("ok" if not failed else f"FAILED for {failed}"),
          flush=True)
    return results


def _check_summary(res: dict) -> str:
    """Relative errors of the parity check, one line per model and precision."""
    if "error" in res:
        return f"CHECK FAILED: {res['error']}"
    lines = ["parity vs HF torch on the GPU (relative error ||ours - hf|| / ||hf||):"]
    for model, r in res.items():
        if not isinstance(r, dict):
            continue
        lines.append(f"  {model}: conversion round trip exact: "
                     f"{r['conversion_round_trip_exact']}; float32 <= 1e-4: "
                     f"{r['float32_within_1e-4']}")
        for key, errs in r.items():
            if isinstance(errs, dict):
                lines.append(f"    {key:<24}" + ("  ".join(
                    f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in errs.items())))
    return "\n".join(lines)


def main(argv):
    del argv
    if _WORKER.value:
        run_worker()
        return
    _START[0] = time.time()
    try:
        cases = parse_cases(_CASES.value, _VARIANTS.value)
        parse_overrides(_SET.value)
        if not all(b.isdigit() and int(b) > 0 for b in _FIT.value):
            raise ValueError(f"--fit_batches={','.join(_FIT.value)}: expected positive "
                             "global batch sizes")
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if _BENCH.value and any(PEER in c.variants for c in cases) \
            and not os.path.isfile(_PEER.value):
        raise app.UsageError(f"--peer={_PEER.value}: no such file; expected the PyTorch peer "
                             "script (../shared/bench/peer_torch_step.py beside the repository)")
    out = {}
    if _CHECK.value:  # in its own process, so that it holds no GPU memory during the benchmark
        out["check"] = _spawn("check", "", "", dict(os.environ), _time_left())
    if _BENCH.value:
        out["bench"] = run_bench(cases)
    if _CHECK.value:
        print("\n" + _check_summary(out["check"]), flush=True)
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
    if _RESULT_JSON.value:
        with open(_RESULT_JSON.value, "w") as f:
            json.dump(out, f, indent=1)
        print(f"raw results: {os.path.abspath(_RESULT_JSON.value)}", flush=True)


if __name__ == "__main__":
    app.run(main)
