"""tools/bench_train_step.py: the step it times is the trainer's step; its cached variant takes
no image-tower forward; one command runs the variants and a (stand-in) peer and prints tables
whose ratios and MFU follow from the raw results."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags

from evclip_jax import embed, objectives, step, trainer

REPO = Path(__file__).resolve().parents[1]
CPU = {"model.dtype": "float32", "model.attention_impl": "xla"}  # cuDNN attention is GPU-only

# Matmul FLOPs of the "tiny" model by hand (2 per multiply-add): 32 px images in 8 px patches,
# 16 patches + the class token = 17 tokens, width 64, MLP 128, 2 layers, projection 32.
PATCH_EMBED = 2 * 16 * (8 * 8 * 3) * 64
PER_LAYER = (4 * 2 * 17 * 64 * 64  # q, k, v, out projections
             + 2 * 2 * 17 * 64 * 128  # MLP in and out
             + 2 * 2 * 17 * 17 * 64)  # q k^T and (attention) v
FORWARD = PATCH_EMBED + 2 * PER_LAYER + 2 * 64 * 32
assert FORWARD == 2_773_504
# Losses at batch n = 8, 100 classes, dim 32: e v^T, its gradient, v v^T, v e^T, its gradient
# (5 [n, n] products); v t^T, e t^T, its gradient (3 [n, 100] products).
LOSSES = 2 * 32 * (5 * 8 * 8 + 3 * 8 * 100)


@pytest.fixture(scope="module")
def bench(load_tool):
    module = load_tool("bench_train_step")
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # the tool's defaults
    return module


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_bench_steps_equal_trainer_step_and_cached_step(bench):
    """Two steps of the bench's step and of the trainer's give the same losses and params. The
    cached variant's batch has no images; fed the image tower's own embeddings of the step's
    images, its step gives the same first-step losses, and its compiled program is one
    image-tower forward smaller."""
    devices = jax.devices()[:2]
    cfg, s, batch = bench.build_jax_step("tiny", 8, {**bench.VARIANTS["step"], **CPU},
                                         devices=devices)
    cfg_c, cached, cached_batch = bench.build_jax_step(
        "tiny", 8, {**bench.VARIANTS["cached"], **CPU}, devices=devices)
    assert not cfg.data.teacher_emb and cfg_c.data.teacher_emb
    assert set(cached_batch) == {"events", "teacher_emb", "labels"}

    # The same run set up as the trainer does: random CLIP from the config, class prompts of
    # data.prompt, step.setup.
    config = bench.bench_config(cfg.batch_size)
    config.model.update(dtype="float32", attention_impl="xla", allow_random_init=True)
    tiny = bench.MODELS["tiny"]
    config.model.vision.update(tiny["vision"], projection_dim=tiny["projection_dim"])
    config.model.text.update(tiny["text"], projection_dim=tiny["projection_dim"])
    towers = step.make_towers(config, trainer.model_config(config))
    assert towers.config == bench.clip_config("tiny")
    params = jax.device_get(towers.init(jax.random.key(config.seed)))
    classes = trainer.class_inputs(config, objectives.get(config.objective), towers, params,
                                   None, bench.class_names())
    mesh = s.classes.sharding.mesh
    ours = step.setup(config, towers, params, classes, mesh,
                      total_steps=config.num_train_steps, warmup_steps=config.optim.warmup_steps)

    with jax.set_mesh(mesh):
        teacher = embed.embed_vision(towers.vision, s.frozen["image_tower"], batch["images"])
        fed = {"events": batch["events"], "teacher_emb": teacher, "labels": batch["labels"]}
        compiled, flops, first = {}, {}, {}
        for name, setup, b in (("full", s, batch), ("cached", cached, fed)):
            compiled[name] = setup.step_fn.lower(setup.state, setup.frozen, setup.classes,
                                                 b).compile()
            flops[name] = _xla_flops(compiled[name])
            setup.state, first[name] = compiled[name](setup.state, setup.frozen, setup.classes,
                                                      b)
        image_fwd = _xla_flops(jax.jit(lambda p, x: towers.vision.apply({"params": p}, x)).lower(
            s.frozen["image_tower"], batch["images"]).compile())
        # The bench's second step; the trainer's two (the first runs at lr 0: warm-up start).
        state_b, m_bench = compiled["full"](s.state, s.frozen, s.classes, batch)
        state_o, _ = ours.step_fn(ours.state, ours.frozen, ours.classes, batch)
        state_o, m_ours = ours.step_fn(state_o, ours.frozen, ours.classes, batch)
    for key in ("loss", "loss_ct", "loss_zs", "loss_kl", "grad_norm"):
        np.testing.assert_allclose(first["cached"][key], first["full"][key], rtol=1e-5,
                                   err_msg=key)
    assert abs((flops["full"] - flops["cached"]) - image_fwd) < 0.05 * image_fwd, \
        (flops, image_fwd)

    m_bench, m_ours = jax.device_get(m_bench), jax.device_get(m_ours)
    p_bench, p_ours = jax.device_get(state_b.params), jax.device_get(state_o.params)
    assert set(m_bench) == set(m_ours) and {"loss_ct", "loss_zs", "loss_kl"} <= set(m_ours)
    # Equal to float32 rounding: the bench makes its params with a jitted init on the device.
    for key in m_ours:
        np.testing.assert_allclose(m_bench[key], m_ours[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p_bench), jax.tree.leaves(p_ours), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    before = jax.device_get(towers.init(jax.random.key(config.seed))["event_tower"])
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(p_ours["event_tower"]), strict=True))


PEER_MS = {"eager": 40.0, "compile": 25.0}
STAND_IN_PEER = f"""
import argparse, json, os
ap = argparse.ArgumentParser()
for name in ("--cases", "--modes", "--steps"):
    ap.add_argument(name)
args = ap.parse_args()
print("2.13.0 Stand-in H200", flush=True)
for case in args.cases.split(","):
    arch, batch = case.split(":")
    for mode in args.modes.split(","):
        ms = {PEER_MS!r}[mode]
        print(json.dumps({{"peer": "stand-in", "arch": arch, "batch": int(batch), "mode": mode,
                          "step_ms": ms, "samples_s": int(batch) / ms * 1e3, "mfu": 0.5,
                          "peak_mem_gb": 1.25, "loss": 3.5, "steps": args.steps,
                          "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}}), flush=True)
"""


def _table_rows(output: str, case: str) -> tuple[list[str], dict[str, list[str]]]:
    """(header names, {variant: cells}) of the printed table of ``case``."""
    lines = output[output.index(f"{case}: global batch"):].splitlines()
    header = lines[1].split()
    rows = {}
    for line in lines[2:]:
        if line.startswith("devices:"):
            break
        rows[line.split()[0]] = line.split()
    return header, rows


def test_one_command_one_table(tmp_path):
    """tiny:8 with the step and cached variants on 2 CPU devices and a stand-in peer (known step
    times) on "GPU 1" at the same time: the table's samples/s, ratios and MFU are those
    computed by hand from the raw JSON; each variant leaves its trace."""
    peer = tmp_path / "peer.py"
    peer.write_text(textwrap.dedent(STAND_IN_PEER))
    result = tmp_path / "bench.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_train_step.py"),
         "--cases=tiny:8:step+cached+peer", "--set=model.dtype=float32",
         "--set=model.attention_impl=xla", f"--peer={peer}", "--peer_gpu=1", "--steps=2",
         "--repeats=3", "--warmup=1", "--peak_tflops=0.002", f"--result_json={result}",
         "--fit_batches=32,16",
         f"--trace_dir={tmp_path / 'traces'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    raw = json.loads(result.read_text())["bench"]
    rows = raw["cases"]["tiny:8"]["rows"]
    assert set(rows) == {"step", "cached", "peer-eager", "peer-compile"}
    # The peer ran once, on GPU 1, with the cases and --steps; the project's variants on GPU 0.
    assert raw["peer"]["cuda_visible_devices"] == "1"
    assert [(r["arch"], r["batch"], r["mode"], r["gpu"], r["steps"])
            for r in raw["peer"]["results"]] == [("TINY", 8, "eager", "1", "2"),
                                                  ("TINY", 8, "compile", "1", "2")]
    for name in ("step", "cached"):
        assert rows[name]["cuda_visible_devices"] == "0" and rows[name]["devices"] == 2
        assert rows[name]["overrides"]["model.attention_impl"] == "xla"
        assert np.isfinite(rows[name]["loss"]) and len(rows[name]["step_s_all"]) == 3
        assert rows[name]["step_mem_gib"] > 0  # at least the state and the batch
        # --trace_dir: a trace of each variant (a CPU trace has no device op lines to sum).
        assert rows[name]["trace_dir"] == str(tmp_path / "traces" / f"tiny_8_{name}")
        assert list(Path(rows[name]["trace_dir"]).rglob("*.xplane.pb"))
        assert rows[name]["top_ops"] == [] and rows[name]["op_kinds"] == {}
    # --fit_batches: the step compiled at global batches 16 then 32 (sorted); a CPU has no
    # allocator limit, so both fit, and the plan grows with the batch.
    for name in ("step", "cached"):
        fit = rows[name]["fit"]
        assert [(f["batch"], f["fits"], f["limit_gib"]) for f in fit] == [(16, True, None),
                                                                          (32, True, None)]
        assert rows[name]["step_mem_gib"] < fit[0]["step_mem_gib"] < fit[1]["step_mem_gib"]
        assert (f"{name} at larger global batches: 16 fits ({fit[0]['step_mem_gib']:.2f} GiB); "
                f"32 fits ({fit[1]['step_mem_gib']:.2f} GiB)") in out.stdout
    assert rows["cached"]["overrides"]["data.teacher_emb"] is True
    # FLOPs of the step that ran: 4 tower forwards per sample, 3 when cached.
    assert rows["step"]["flops"] == 8 * 4 * FORWARD + LOSSES
    assert rows["cached"]["flops"] == 8 * 3 * FORWARD + LOSSES

    step_s = {name: rows[name]["step_s"] for name in ("step", "cached")}
    step_s |= {f"peer-{mode}": ms / 1e3 for mode, ms in PEER_MS.items()}
    devices = {"step": 2, "cached": 2, "peer-eager": 1, "peer-compile": 1}
    flops = {"step": 8 * 4 * FORWARD + LOSSES, "cached": 8 * 3 * FORWARD + LOSSES,
             "peer-eager": 8 * 4 * FORWARD + LOSSES, "peer-compile": 8 * 4 * FORWARD + LOSSES}
    header, table = _table_rows(out.stdout, "tiny:8")
    assert header[:5] == ["variant", "samples/s", "step", "ms", "MFU"]
    assert header[5:12] == ["peak", "GiB", "step", "GiB", "/peer-compile", "/peer-eager",
                            "/step"]
    assert set(table) == set(step_s)
    for name, cells in table.items():
        rate = 8 / step_s[name]
        np.testing.assert_allclose(float(cells[1]), rate, rtol=1e-3, atol=0.05)
        np.testing.assert_allclose(float(cells[2]), 1e3 * step_s[name], atol=0.005)
        mfu = 100 * flops[name] / step_s[name] / (devices[name] * 0.002e12)
        np.testing.assert_allclose(float(cells[3].rstrip("%")), mfu, atol=0.05)
        assert cells[4] == ("1.25" if name.startswith("peer") else "-")  # no CPU memory stats
        # XLA's plan for the compiled step: the project's rows only.
        assert cells[5] == ("-" if name.startswith("peer") else
                            f"{rows[name]['step_mem_gib']:.2f}")
        for col, ref in zip(cells[6:9], ("peer-compile", "peer-eager", "step"), strict=True):
            np.testing.assert_allclose(float(col), rate / (8 / step_s[ref]), atol=5e-4)
    assert "step, cached on 2 x cpu; peer-eager, peer-compile on 1 x Stand-in H200" \
        in out.stdout


def test_mesh_variants_shard_the_event_tower_and_keep_the_loss(bench):
    """fsdp2 and tensor2 build their mesh from the config: the event tower's MLP kernel
    [embed 64, mlp 128] is split over fsdp (rows) or tensor (columns) of the two devices, and
    one step gives the loss of the data-parallel step."""
    devices = jax.devices()[:2]
    losses, specs = {}, {}
    for variant in ("step", "fsdp2", "tensor2"):
        _, s, batch = bench.build_jax_step("tiny", 8, {**bench.VARIANTS[variant], **CPU},
                                           devices=devices)
        fc1 = s.state.params["event_tower"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]
        kernel = fc1["kernel"]
        specs[variant] = kernel.sharding.shard_shape(kernel.shape)
        with jax.set_mesh(kernel.sharding.mesh):
            _, metrics = s.step_fn(s.state, s.frozen, s.classes, batch)
        losses[variant] = float(metrics["loss"])
    assert specs == {"step": (64, 128), "fsdp2": (32, 128), "tensor2": (64, 64)}
    np.testing.assert_allclose(losses["fsdp2"], losses["step"], rtol=1e-5)
    np.testing.assert_allclose(losses["tensor2"], losses["step"], rtol=1e-5)


def test_fit_batch_plans_what_the_concrete_step_plans(bench):
    """fit_batch lowers the step on an abstract batch: at the batch that was built it plans
    exactly the bytes of the step compiled on the real arrays (per device, 2 devices)."""
    devices = jax.devices()[:2]
    _, s, batch = bench.build_jax_step("tiny", 8, {**bench.VARIANTS["step"], **CPU},
                                       devices=devices)
    args = (s.state, s.frozen, s.classes)
    with jax.set_mesh(batch["events"].sharding.mesh):
        concrete = bench.planned_bytes(s.step_fn.lower(*args, batch).compile().memory_analysis())
        fit = bench.fit_batch(s.step_fn, args, batch, 8, devices)
    assert concrete > 0 and fit["step_mem_gib"] * 2**30 == concrete
