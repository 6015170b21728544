r"""Train-step throughput, JAX against PyTorch, and GPU parity of the Flax CLIP with HF.

Benchmark (default): for each model (random init built from config, nothing downloaded) the
real train step of the trainer (step.setup from config_base.base_config(), on a mesh of all local
devices, donated state, frozen image tower run inside the step, 100 class text embeddings
precomputed, bf16 compute, float32 params and optimizer) against the same step in PyTorch
(tools/bench_train_step_torch.py: HF CLIPVisionModelWithProjection, SDPA, bf16 autocast, TF32,
fused AdamW, eager and torch.compile). Each variant runs in its own process so that each
framework has the whole GPU (JAX preallocates most of its memory). Inputs are random arrays
already on the device. Time: warm-up steps (compilation excluded), then ``--repeats`` runs of
``--steps`` steps with a device sync at the end of each; the median per-step time is reported.
FLOPs per step (for MFU) are counted from the model sizes (``step_flops``: XLA's cost
analysis on the GPU leaves out the cuBLAS and cuDNN custom calls); the same FLOPs serve the
PyTorch step.

``--check``: on the GPU, the Flax towers against HF transformers' CLIPModel with the same random
weights (converted with evclip_jax.convert), float32 with matmul precision "highest" and TF32
off (relative error <= 1e-4 on image, event and text embeddings), and bf16 (reported). Also the
PyTorch loss twin against evclip_jax.losses on the same embeddings.

    PYTHONPATH=. python3 tools/bench_train_step.py --check --models=b32,l14
    PYTHONPATH=. python3 tools/bench_train_step.py --models=b32,l14 --steps=20 --repeats=5

Imports no TensorFlow; its config is config_base.base_config() (carry ml_collections as a wheel
where it is not installed).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from absl import app, flags

_MODELS = flags.DEFINE_list("models", ["b32", "l14"], "models to run: b32, l14, tiny")
_BATCH = flags.DEFINE_list("batch_sizes", ["b32:256", "l14:128", "tiny:8"],
                           "global batch size per model, model:size")
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps per repeat")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repeats (the median is reported)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed steps after the first (compiling) one")
_JAX_ATTN = flags.DEFINE_list("jax_attention", ["cudnn", "xla"],
                              "attention_impl values to time for JAX")
_TORCH_MODES = flags.DEFINE_list("torch_modes", ["eager", "compile"], "PyTorch variants")
_COMPILE_MODE = flags.DEFINE_string("torch_compile_mode", "default", "torch.compile mode")
_BENCH = flags.DEFINE_bool("bench", True, "run the throughput benchmark")
_CHECK = flags.DEFINE_bool("check", False, "run the GPU parity check (Flax vs HF torch)")
_CHECK_BATCH = flags.DEFINE_integer("check_batch", 8, "images per parity check")
_DEADLINE = flags.DEFINE_float("deadline_s", 0.0,
                               "> 0: skip benchmark variants that would start after this many "
                               "seconds, and kill a running one at it")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0,
                           "bf16 dense peak per device for MFU; 0: from the device name")
_RESULT_JSON = flags.DEFINE_string("result_json", "", "write all results to this JSON file")
_WORKER = flags.DEFINE_enum("worker", "", ["", "jax", "torch", "check"],
                            "internal: run one variant (or the check) in this process")
_VARIANT = flags.DEFINE_string("variant", "", "internal: attention_impl or torch mode")
_WORKER_MODEL = flags.DEFINE_string("worker_model", "", "internal: model of the worker")
_RESULT_FILE = flags.DEFINE_string("result_file", "", "internal: where the worker writes")

NUM_CLASSES = 100
_START = [time.time()]
_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"bench_train_step_jax_cache_{os.getpid()}")
# bf16 dense tensor-core peak per GPU (datasheet, SXM) for the MFU column.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}

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
    # For trying the script on a CPU.
    "tiny": {"vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, image_size=32, patch_size=8),
             "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, vocab_size=1000, max_position_embeddings=16,
                          eos_token_id=999),
             "projection_dim": 32},
}


def clip_config(model: str):
    """evclip_jax CLIPConfig of a MODELS entry (quick_gelu, LayerNorm eps 1e-5)."""
    from evclip_jax.models.clip import CLIPConfig, TowerConfig

    m = MODELS[model]
    p = m["projection_dim"]
    return CLIPConfig(vision=TowerConfig(**m["vision"], projection_dim=p),
                      text=TowerConfig(**m["text"], projection_dim=p), projection_dim=p)


def hf_vision_config(model: str) -> dict:
    """The HF CLIPVisionConfig kwargs of the same vision tower (for the PyTorch twin)."""
    v = clip_config(model).vision
    return dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                image_size=v.image_size, patch_size=v.patch_size, num_channels=v.num_channels,
                projection_dim=v.projection_dim, hidden_act=v.hidden_act,
                layer_norm_eps=v.layer_norm_eps)


def bench_config(batch_size: int):
    """The training config of the benchmark: ``base_config()`` (the paper's objective and loss,
    the release's optimizer) at this global batch size."""
    from evclip_jax.config_base import base_config

    config = base_config()
    config.batch_size = batch_size
    config.optim.warmup_steps = 100
    config.num_train_steps = 10_000
    return config


def step_flops(model: str, batch_size: int) -> float:
    """Matmul FLOPs (2 per multiply-add) of one train step over the global batch.

    One vision-tower forward per image: patch embedding, per layer the q/k/v/out projections
    (8 T D^2), the MLP (4 T D F) and attention's two batched products (4 T^2 D), then the
    projection of the class token. The step runs the event tower forward and backward (3x a
    forward) and the frozen image tower forward (1x): 4 forwards per sample. The losses'
    [N, N] and [N, 100] products are counted too. XLA's cost analysis on the GPU leaves out
    cuBLAS and cuDNN custom calls, so it cannot give this number there.
    """
    v, p = clip_config(model).vision, MODELS[model]["projection_dim"]
    t, d, f = v.num_patches + 1, v.hidden_size, v.intermediate_size
    patch = 2 * v.num_patches * v.patch_size**2 * v.num_channels * d
    layer = 8 * t * d * d + 4 * t * d * f + 4 * t * t * d
    forward = patch + v.num_hidden_layers * layer + 2 * d * p
    # Losses: e v^T (fwd + 2 bwd), v v^T, e t^T (fwd + bwd), v t^T, v e^T (fwd + bwd).
    n = batch_size
    losses = 2 * p * (3 * n * n + n * n + 3 * n * NUM_CLASSES + n * NUM_CLASSES + 3 * n * n)
    return float(4 * forward * batch_size + losses)


def batch_size_of(model: str) -> int:
    sizes = dict(item.split(":") for item in _BATCH.value)
    return int(sizes[model])


# ----------------------------------------------------------------------------- JAX worker


def _flops(cost) -> float | None:
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def build_jax_step(model: str, batch_size: int, overrides: dict | None = None, devices=None):
    """(config, step.Setup, batch): the trainer's step for ``model`` (step.setup from
    base_config() with ``overrides``, {"model.remat": "matmuls", ...}; random params made on
    the device) and a random batch already placed. With ``data.teacher_emb`` the batch carries
    precomputed image embeddings in place of the images (the cached-teacher step)."""
    import jax
    import jax.numpy as jnp

    from evclip_jax import embed, sharding, step, text
    from evclip_jax.models.clip import Towers

    clip_cfg = clip_config(model)
    cfg = bench_config(batch_size)
    cfg.model.dtype = "bfloat16"
    for field, value in (overrides or {}).items():
        section, name = field.split(".")
        cfg[section][name] = value
    devices = jax.local_devices() if devices is None else devices
    if cfg.batch_size % len(devices):
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {len(devices)} devices")
    mesh = sharding.make_mesh(data=-1, devices=devices)
    towers = step.make_towers(cfg, clip_cfg)

    # Random params made on the device; jit returns separate buffers for the event tower and
    # the image tower it copies (the event tower is donated every step).
    params = jax.jit(Towers(clip_cfg).init)(jax.random.key(cfg.seed))
    prompts = [cfg.data.prompt.format(label=name) for name in class_names()]
    ids = text.hash_tokenize(prompts, clip_cfg.text)  # random text tower: any ids will do
    text_emb = embed.class_text_embeddings(towers.text, params["text_tower"], ids)
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


def jax_bench(model: str, attention: str, steps: int, repeats: int, warmup: int) -> dict:
    """Times the trainer's step for ``model`` with attention_impl ``attention``."""
    import flax
    import jax
    import numpy as np

    t_start = time.perf_counter()

    def phase(what: str) -> None:
        print(f"  [{time.perf_counter() - t_start:6.1f} s] {what}", flush=True)

    cfg, s, batch = build_jax_step(model, batch_size_of(model),
                                   {"model.attention_impl": attention})
    state, frozen, text_emb = s.state, s.frozen, s.classes
    mesh = text_emb.sharding.mesh
    devices = jax.local_devices()
    phase("params initialised and placed, optimizer state and class text embeddings ready")

    with jax.set_mesh(mesh):
        step_fn = s.step_fn
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, frozen, text_emb, batch).compile()
        compile_s = time.perf_counter() - t0
        compiled_flops = _flops(compiled.cost_analysis())
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
    values = {k: float(x) for k, x in jax.device_get(metrics).items()}
    if not np.isfinite(values["loss"]):
        raise FloatingPointError(f"JAX {attention}: non-finite loss {values['loss']}")
    stats = devices[0].memory_stats() or {}
    return {
        "step_s": sorted(times)[len(times) // 2],
        "step_s_all": times,
        "compile_s": compile_s,
        "first_step_s": first_s,
        "flops": step_flops(model, cfg.batch_size),
        # What XLA counts in the compiled program: on the GPU without the cuBLAS/cuDNN calls.
        "xla_compiled_flops_per_device": compiled_flops,
        "loss": values["loss"],
        "grad_norm": values["grad_norm"],
        "peak_mem_gib": stats.get("peak_bytes_in_use", 0) / 2**30 or None,
        "devices": len(devices),
        "device": devices[0].device_kind,
        "versions": f"jax {jax.__version__}, flax {flax.__version__}",
    }


def run_worker() -> None:
    """One variant in this process; the result (or the error) goes to --result_file."""
    model, variant = _WORKER_MODEL.value, _VARIANT.value
    try:
        if _WORKER.value == "check":
            out = run_check()
        elif _WORKER.value == "jax":
            out = jax_bench(model, variant, _STEPS.value, _REPEATS.value, _WARMUP.value)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import bench_train_step_torch

            out = bench_train_step_torch.bench(
                hf_vision_config(model), bench_config(batch_size_of(model)), variant,
                _STEPS.value, _REPEATS.value, _WARMUP.value, NUM_CLASSES, _COMPILE_MODE.value)
    except Exception as e:  # reported in the table; the other variants still run
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    with open(_RESULT_FILE.value, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------- benchmark


def _spawn(worker: str, model: str, variant: str, timeout: float | None) -> dict:
    """Runs one worker in a fresh process (all of the GPU to itself); returns its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={worker}",
           f"--worker_model={model}", f"--variant={variant}", f"--result_file={result_file}",
           f"--steps={_STEPS.value}", f"--repeats={_REPEATS.value}", f"--warmup={_WARMUP.value}",
           f"--batch_sizes={','.join(_BATCH.value)}", f"--models={','.join(_MODELS.value)}",
           f"--check_batch={_CHECK_BATCH.value}",
           f"--torch_compile_mode={_COMPILE_MODE.value}"]
    env = dict(os.environ)
    if worker == "jax":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # alone on the GPU
    if worker in ("jax", "check"):
        # Shared by this invocation's workers: set-up programs (init, text tower) compile once.
        # The timed step is compiled afresh per variant, and its compile time is reported.
        env.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
    print(f"\n=== {worker} {variant} {model} ===", flush=True)
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
    print(f"=== {worker} {variant} {model}: {summary}", flush=True)
    return out


def _peak_flops(device: str) -> float | None:
    if _PEAK.value:
        return _PEAK.value * 1e12
    for name, tflops in PEAK_TFLOPS.items():
        if name in device:
            return tflops * 1e12
    return None


def _table(model: str, batch: int, rows: list[tuple[str, dict]]) -> str:
    """samples/s, step ms, JAX/PyTorch ratios and MFU for one model."""
    flops = next((r["flops"] for _, r in rows if r.get("flops")), None)
    devices = next((r["devices"] for _, r in rows if r.get("devices")), 1)
    device = next((r["device"] for _, r in rows if r.get("device")), "")
    peak = _peak_flops(device)
    rate = {name: batch / r["step_s"] for name, r in rows if "step_s" in r}
    torch_names = [n for n in rate if n.startswith("torch")]
    head = (f"{'variant':<16}{'samples/s':>11}{'step ms':>9}{'MFU':>7}"
            + "".join(f"{'/' + n:>16}" for n in torch_names)
            + f"{'compile s':>11}{'peak GiB':>10}{'loss':>9}")
    lines = [f"{model}: global batch {batch}, {devices} x {device}"
             + (f", {flops / 1e12:.2f} TFLOP/step" if flops else ""), head]
    for name, r in rows:
        if "step_s" not in r:
            lines.append(f"{name:<16}  FAILED: {r.get('error', '?')}")
            continue
        mfu = (f"{100 * flops / r['step_s'] / (devices * peak):6.1f}%"
               if flops and peak else f"{'-':>7}")
        ratios = "".join(f"{rate[name] / rate[n]:>16.2f}" for n in torch_names)
        comp = r.get("compile_s", r.get("first_step_s"))
        mem = r.get("peak_mem_gib")
        lines.append(f"{name:<16}{rate[name]:>11.1f}{1e3 * r['step_s']:>9.2f}{mfu}{ratios}"
                     f"{comp:>11.1f}{(f'{mem:.1f}' if mem else '-'):>10}{r['loss']:>9.4f}")
    return "\n".join(lines)


def _time_left() -> float | None:
    """Seconds left before --deadline_s (counted from the start of main), None without one."""
    return _DEADLINE.value - (time.time() - _START[0]) if _DEADLINE.value else None


def run_bench() -> dict:
    results: dict = {}
    tables = []
    for model in _MODELS.value:
        rows = []
        # Interleaved (JAX's first attention, PyTorch's last mode, ...): the most telling pair
        # runs first, so a deadline cuts the least important variant.
        jax_v = [("jax", a) for a in _JAX_ATTN.value]
        torch_v = [("torch", m) for m in reversed(_TORCH_MODES.value)]
        variants = [v for pair in itertools.zip_longest(jax_v, torch_v) for v in pair if v]
        for worker, variant in variants:
            name = f"{worker}-{variant}"
            left = _time_left()
            if left is not None and left < 20:
                rows.append((name, {"error": "skipped: deadline"}))
                continue
            rows.append((name, _spawn(worker, model, variant, left)))
        rank = {f"{w}-{v}": i for i, (w, v) in enumerate(
            [("jax", a) for a in _JAX_ATTN.value] + [("torch", m) for m in _TORCH_MODES.value])}
        rows.sort(key=lambda row: rank[row[0]])
        results[model] = {"batch_size": batch_size_of(model), **dict(rows)}
        tables.append(_table(model, batch_size_of(model), rows))
    print("\n" + "\n\n".join(tables), flush=True)
    versions = sorted({r["versions"] for m in results.values() for r in m.values()
                       if isinstance(r, dict) and "versions" in r})
    print("versions: " + "; ".join(versions), flush=True)
    return results


# ----------------------------------------------------------------------------- parity check


def _rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_losses(cfg) -> dict:
    """The PyTorch loss twin against evclip_jax.losses: values and gradients (float32, GPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_train_step_torch

    from evclip_jax import losses

    lc = cfg.loss
    rng = np.random.default_rng(0)
    n, d, m = 64, 32, NUM_CLASSES
    v_raw = rng.normal(size=(n, d)).astype(np.float32)
    e_raw = (v_raw + 0.5 * rng.normal(size=(n, d))).astype(np.float32)  # correlated pairs
    t = rng.normal(size=(m, d)).astype(np.float32)
    t /= np.linalg.norm(t, axis=-1, keepdims=True)
    log_tau, scale = np.float32(math.log(0.5)), np.float32(math.log(1 / 0.07))

    def jax_total(e_raw, log_tau, scale):
        norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        e, v = norm(e_raw), norm(jnp.asarray(v_raw))
        ct = losses.loss_ct(e, v, jnp.exp(log_tau))
        zs = losses.loss_zs(e, v, jnp.asarray(t), scale, T=lc.zs_temperature, form=lc.zs_form)
        kl = losses.loss_kl(e, v, lc.kl_temperature, lc.sinkhorn_iters)
        return lc.ct_weight * ct + lc.zs_weight * zs + lc.kl_weight * kl, (ct, zs, kl)

    (j_total, j_terms), j_grads = jax.value_and_grad(jax_total, argnums=(0, 1, 2),
                                                     has_aux=True)(e_raw, log_tau, scale)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    te = torch.tensor(e_raw, device=dev, requires_grad=True)
    tt = torch.tensor(log_tau, device=dev, requires_grad=True)
    ts = torch.tensor(scale, device=dev, requires_grad=True)
    t_total, t_terms = bench_train_step_torch.step_losses(
        te, torch.tensor(v_raw, device=dev), torch.tensor(t, device=dev), tt, ts, lc)
    t_total.backward()
    out = {"loss": _rel_err(t_total.item(), float(j_total))}
    for name, a, b in zip(("loss_ct", "loss_zs", "loss_kl"), t_terms, j_terms, strict=True):
        out[name] = _rel_err(a.item(), float(b))
    for name, a, b in zip(("grad_e", "grad_log_tau", "grad_logit_scale"),
                          (te.grad, tt.grad, ts.grad), j_grads, strict=True):
        out[name] = _rel_err(a.cpu().numpy(), np.asarray(b))
    return out


def _check_model(model: str, dev) -> dict:
    """Errors of the Flax towers against an HF CLIPModel with the same random weights."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from evclip_jax import convert
    from evclip_jax.models.clip import Towers

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

    def errs(dtype, attention):
        towers = Towers(clip_cfg, dtype=dtype, attention_impl=attention)
        vis = jax.jit(lambda p, a: towers.vision.apply({"params": p}, a))
        txt = jax.jit(lambda p, a: towers.text.apply({"params": p}, a))
        return {"image": _rel_err(vis(dev_params["image_tower"], x), ref_img),
                "event": _rel_err(vis(dev_params["event_tower"], x), ref_img),
                "text": _rel_err(txt(dev_params["text_tower"], ids), ref_txt)}

    res = {"conversion_round_trip_exact": round_trip}
    with jax.default_matmul_precision("highest"):
        res["float32_xla"] = errs(jnp.float32, "xla")
    for attention in ("cudnn", "xla"):
        try:
            res[f"bf16_{attention}"] = errs(jnp.bfloat16, attention)
        except Exception as e:
            res[f"bf16_{attention}"] = {
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    res["hf_torch_bf16_autocast"] = {"image": _rel_err(hf_bf16_img, ref_img),
                                     "text": _rel_err(hf_bf16_txt, ref_txt)}
    res["float32_within_1e-4"] = round_trip and max(res["float32_xla"].values()) <= 1e-4
    return res


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
    for model in _MODELS.value:
        results[model] = _check_model(model, dev)
        print(f"{model}: {json.dumps(results[model], indent=1)}", flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    with jax.default_matmul_precision("highest"):
        results["torch_loss_twin_vs_evclip_losses"] = _check_losses(bench_config(64))
    print("loss twin rel err: " + json.dumps(results["torch_loss_twin_vs_evclip_losses"]),
          flush=True)
    failed = [m for m in _MODELS.value if not results[m]["float32_within_1e-4"]]
    print("\nPARITY float32 (limit 1e-4): " + ("ok" if not failed else f"FAILED for {failed}"),
          flush=True)
    return results


def _check_summary(res: dict) -> str:
    """Relative errors of the parity check, one line per model and precision."""
    if "error" in res:
        return f"CHECK FAILED: {res['error']}"
    lines = ["parity vs HF torch on the GPU (relative error ||ours - hf|| / ||hf||):"]
    for model, r in res.items():
        if not isinstance(r, dict) or model == "torch_loss_twin_vs_evclip_losses":
            continue
        lines.append(f"  {model}: conversion round trip exact: "
                     f"{r['conversion_round_trip_exact']}; float32 <= 1e-4: "
                     f"{r['float32_within_1e-4']}")
        for key, errs in r.items():
            if isinstance(errs, dict):
                lines.append(f"    {key:<24}" + ("  ".join(
                    f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in errs.items())))
    twin = res.get("torch_loss_twin_vs_evclip_losses")
    if twin:
        lines.append("  torch loss twin vs evclip_jax.losses: " + "  ".join(
            f"{k} {v:.1e}" for k, v in twin.items()))
    return "\n".join(lines)


def main(argv):
    del argv
    if _WORKER.value:
        run_worker()
        return
    _START[0] = time.time()
    out = {}
    if _CHECK.value:  # in its own process, so that it holds no GPU memory during the benchmark
        out["check"] = _spawn("check", ",".join(_MODELS.value), "", _time_left())
    if _BENCH.value:
        out["bench"] = run_bench()
    if _CHECK.value:
        print("\n" + _check_summary(out["check"]), flush=True)
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
    if _RESULT_JSON.value:
        with open(_RESULT_JSON.value, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
