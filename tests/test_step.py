"""The train step: frozen towers, sharding equivalence, teacher embeddings, the objectives' losses
against float64 references, the optimizer."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evclip_jax import embed, objectives, sharding, step, text, trainer
from evclip_jax.config_base import base_config

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 16, "patch_size": 8, "projection_dim": 16}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 8,
        "eos_token_id": 63, "projection_dim": 16}
BATCH = 16
CLASSES = ["disc", "square", "cross", "ring"]


def tiny_config():
    c = base_config()
    c.batch_size = BATCH
    c.model.allow_random_init = True
    c.model.vision.update(VISION)
    c.model.text.update(TEXT)
    c.optim.base_lr = 0.016
    return c


class Setup:
    """A tiny model placed on a mesh through the trainer's step.setup, with a random batch."""

    def __init__(self, config, devices, **mesh_sizes):
        self.config = config
        self.mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
        self.towers = step.make_towers(config, trainer.model_config(config))
        self.params = jax.device_get(self.towers.init(jax.random.key(config.seed)))
        self.objective = objectives.get(config.objective)
        self.ids = text.token_ids([f"a {c}" for c in CLASSES], self.towers.config.text)
        if self.objective.uses_class_text:
            classes = embed.class_text_embeddings(self.towers.text,
                                                  self.params["text_tower"], self.ids)
        else:
            classes = self.ids[:, None, :]
        self.setup = step.setup(config, self.towers, self.params, classes, self.mesh,
                                total_steps=100, warmup_steps=10)
        self.state, self.frozen = self.setup.state, self.setup.frozen
        self.text_emb = self.setup.classes

    def ctx(self):
        return jax.set_mesh(self.mesh)

    def batch(self, seed=0, **extra):
        rng = np.random.default_rng(seed)
        b = {"events": rng.uniform(-1, 1, (BATCH, 16, 16, 3)).astype(np.float32),
             "images": rng.standard_normal((BATCH, 16, 16, 3)).astype(np.float32),
             "labels": rng.integers(0, len(CLASSES), BATCH).astype(np.int32), **extra}
        return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, np.ndim(v)))
                for k, v in b.items()}

    def loss_fn(self, loss_cfg=None):
        return objectives.make_loss_fn(self.objective, self.towers, loss_cfg or self.config.loss)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _paths(tree):
    return [_path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_frozen_towers_unchanged_and_without_optimizer_state():
    s = Setup(tiny_config(), jax.devices()[:1], data=1)
    before = jax.device_get(s.frozen)
    batch = s.batch()
    with s.ctx():
        step = s.setup.step_fn
        state = s.state
        event_before = jax.device_get(state.params["event_tower"])
        for _ in range(3):
            state, metrics = step(state, s.frozen, s.text_emb, batch)
    after = jax.device_get(s.frozen)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert np.array_equal(a, b)
    # The event tower did move, but for the key biases: a softmax over keys cancels them, so
    # their gradient is zero (clip.Attention does not add them).
    event_after = jax.device_get(state.params["event_tower"])
    moved = {p: not np.array_equal(a, b) for p, a, b in zip(
        _paths(event_before), jax.tree.leaves(event_before), jax.tree.leaves(event_after),
        strict=True)}
    key_bias = {p for p in moved if p.endswith("k_proj/bias")}
    assert key_bias and not any(moved[p] for p in key_bias)
    assert all(m for p, m in moved.items() if p not in key_bias)
    assert np.isfinite(float(metrics["loss"]))
    # Optimizer state: only trainable leaves (event tower, log_tau_ct, logit_scale).
    paths = _paths(state.opt_state)
    assert paths and not any("image_tower" in p or "text_tower" in p for p in paths)
    assert any("event_tower" in p for p in paths)
    n_event = len(jax.tree.leaves(state.params["event_tower"]))
    assert sum("event_tower" in p for p in paths) == 2 * n_event  # Adam mu and nu


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_compiled_step_computes_no_gradient_for_frozen_towers():
    """FLOP counts of the compiled step: running the frozen image tower inside the step costs
    exactly one forward pass of it (a backward would add about twice that again)."""
    s = Setup(tiny_config(), jax.devices()[:1], data=1)
    batch = s.batch()
    with s.ctx():
        teacher = embed.embed_vision(s.towers.vision, s.frozen["image_tower"], batch["images"])
        teacher_batch = {k: v for k, v in batch.items() if k != "images"} | {
            "teacher_emb": teacher}
        with_tower = _flops(s.setup.step_fn.lower(
            s.state, s.frozen, s.text_emb, batch).compile())
        with_teacher = _flops(s.setup.step_fn.lower(
            s.state, s.frozen, s.text_emb, teacher_batch).compile())
        image_fwd = _flops(jax.jit(lambda p, x: s.towers.vision.apply({"params": p}, x)).lower(
            s.frozen["image_tower"], batch["images"]).compile())
    extra = with_tower - with_teacher
    assert abs(extra - image_fwd) < 0.05 * image_fwd, (extra, image_fwd)


@pytest.mark.parametrize("mesh_sizes, sharded_shape", [
    ({"data": 8}, (32, 64)),
    ({"data": 1, "fsdp": 8}, (4, 64)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, (16, 32)),
])
def test_sharded_step_equals_single_device(mesh_sizes, sharded_shape):
    """One step on 8 devices gives the loss and params of 1 device.

    Tolerance: loss rtol 1e-5; params atol 5e-6 (lr here is 1e-3, so this is 0.5% of one
    Adam step; the reductions run in a different order on different layouts)."""
    config = tiny_config()
    single = Setup(config, jax.devices()[:1], data=1)
    multi = Setup(config, jax.devices(), **mesh_sizes)
    results = []
    for s in (single, multi):
        batch = s.batch(seed=3)
        with s.ctx():
            state, metrics = s.setup.step_fn(s.state, s.frozen, s.text_emb, batch)
        results.append((jax.device_get(state.params), jax.device_get(metrics), state))
    (p1, m1, _), (p8, m8, state8) = results
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    for key in ("loss_ct", "loss_zs", "loss_kl"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(b, a, atol=5e-6, rtol=0)
    # The params really are laid out as configured: fc1 kernel [32, 64] = (embed, mlp).
    kernel = state8.params["event_tower"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"][
        "kernel"]
    assert kernel.addressable_shards[0].data.shape == sharded_shape
    assert len(kernel.sharding.device_set) == 8
    # Optimizer moments follow the param layout.
    moments = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state8.opt_state)[0]
               if _path_str(path).endswith("event_tower/vision_model/encoder/layers_0/mlp/fc1/"
                                           "kernel")]
    assert len(moments) == 2  # Adam mu and nu
    assert all(m.addressable_shards[0].data.shape == sharded_shape for m in moments)


def test_gathered_loss_equals_row_sharded_loss():
    """loss.gather_embeddings: every device computes the whole loss from the gathered
    embeddings (no all-reduce of the loss's per-row statistics, f32[N]) and the step gives the
    numbers of the row-sharded loss."""
    results = {}
    for gather in (True, False):
        config = tiny_config()
        config.loss.gather_embeddings = gather
        s = Setup(config, jax.devices(), data=8)
        batch = s.batch(seed=3)
        with s.ctx():
            hlo = s.setup.step_fn.lower(s.state, s.frozen, s.text_emb, batch).compile().as_text()
            state, metrics = s.setup.step_fn(s.state, s.frozen, s.text_emb, batch)
        row_stats = re.findall(rf"= f32\[{BATCH}\]\S* all-reduce\(", hlo)
        results[gather] = (jax.device_get(state.params), jax.device_get(metrics), row_stats)
    (p_g, m_g, rows_g), (p_s, m_s, rows_s) = results[True], results[False]
    assert not rows_g and rows_s, (rows_g, rows_s)
    for key in ("loss", "loss_ct", "loss_zs", "loss_kl"):
        np.testing.assert_allclose(m_g[key], m_s[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p_g), jax.tree.leaves(p_s), strict=True):
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=0)


def test_teacher_embeddings_replace_the_image_tower():
    s = Setup(tiny_config(), jax.devices()[:1], data=1)
    loss_fn = s.loss_fn()
    batch = s.batch()
    with s.ctx():
        teacher = embed.embed_vision(s.towers.vision, s.frozen["image_tower"], batch["images"])
        with_images = loss_fn(s.state.params, s.frozen, s.text_emb, batch, 0)[0]
        alt = {k: v for k, v in batch.items() if k != "images"} | {"teacher_emb": teacher}
        with_teacher = loss_fn(s.state.params, s.frozen, s.text_emb, alt, 0)[0]
    np.testing.assert_allclose(float(with_teacher), float(with_images), rtol=1e-6)


def test_release_switch_sends_no_ct_gradient_to_event_tower():
    config = tiny_config()
    config.loss.zs_weight = config.loss.kl_weight = 0.0
    s = Setup(config, jax.devices()[:1], data=1)
    batch = s.batch()
    grads = {}
    for release in (False, True):
        config.loss.ct_release = release
        loss_fn = s.loss_fn(config.loss)
        with s.ctx():
            g = jax.grad(lambda p, f=loss_fn: f(p, s.frozen, s.text_emb, batch, 0)[0])(
                s.state.params)
        grads[release] = max(float(jnp.max(jnp.abs(x))) for x in
                             jax.tree.leaves(g["event_tower"]))
    assert grads[True] == 0.0
    assert grads[False] > 0.0


def _np_ce(logits, targets):
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -np.mean(logp[np.arange(len(targets)), targets])


def _np_unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_ezsr_loss_is_modulation_plus_infonce(norm):
    """objective ezsr = mod_weight L_mod(e_raw, v_raw) + ct_weight InfoNCE, in float64."""
    config = tiny_config()
    config.objective, config.loss.mod_norm = "ezsr", norm
    config.loss.mod_weight, config.loss.ct_weight = 0.7, 0.3
    s = Setup(config, jax.devices()[:1], data=1)
    batch = s.batch(seed=1)
    with s.ctx():
        total, terms = s.loss_fn()(s.state.params, s.frozen, s.text_emb, batch, 0)
        e = np.asarray(embed.embed_vision(s.towers.vision, s.state.params["event_tower"],
                                          batch["events"]), np.float64)
        v = np.asarray(embed.embed_vision(s.towers.vision, s.frozen["image_tower"],
                                          batch["images"]), np.float64)
    diff = e - v
    mod = np.mean(np.abs(diff)) if norm == "l1" else np.mean(diff**2)
    tau = config.loss.tau_ct_init
    nce = _np_ce(_np_unit(e) @ _np_unit(v).T / tau, np.arange(BATCH))
    np.testing.assert_allclose(float(terms["loss_mod"]), mod, rtol=1e-5)
    np.testing.assert_allclose(float(terms["loss_ct"]), nce, rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.7 * mod + 0.3 * nce, rtol=1e-5)
    assert set(s.state.params) == {"event_tower", "log_tau_ct"}


def test_clip_objective_loss_and_trainable_towers():
    """objective clip: symmetric CE of s v t^T over the batch's captions, in float64; the
    image and text towers are the trainable params and there is no event tower."""
    config = tiny_config()
    config.objective = "clip"
    s = Setup(config, jax.devices()[:1], data=1)
    assert set(s.state.params) == {"image_tower", "text_tower", "logit_scale"}
    assert s.frozen == {}
    batch = s.batch(seed=2)
    with s.ctx():
        total, terms = s.loss_fn()(s.state.params, s.frozen, s.text_emb, batch, 0)
        v = embed.embed_vision(s.towers.vision, s.state.params["image_tower"], batch["images"])
        t = embed.embed_text(s.towers.text, s.state.params["text_tower"],
                             s.ids[np.asarray(batch["labels"])])
    logits = math.exp(config.loss.logit_scale_init) * _np_unit(v) @ _np_unit(t).T
    want = 0.5 * (_np_ce(logits, np.arange(BATCH)) + _np_ce(logits.T, np.arange(BATCH)))
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert set(terms) == {"loss_clip"}


def test_optimizer_schedule_and_decay_mask():
    config = tiny_config()
    config.batch_size = 512
    config.optim.base_lr = 1e-6
    tx, schedule = step.make_optimizer(config, total_steps=100, warmup_steps=10)
    peak = 1e-6 * 512 / 256
    assert math.isclose(float(schedule(10)), peak, rel_tol=1e-6)
    assert float(schedule(0)) == 0.0 and float(schedule(100)) < 1e-12
    np.testing.assert_allclose(float(schedule(55)), peak * 0.5, rtol=1e-5)  # cosine midpoint
    params = {"event_tower": {"vision_model": {
        "embeddings": {"patch_embedding": {"kernel": jnp.ones((2, 2))}},
        "encoder": {"layers_0": {"mlp": {"fc1": {"kernel": jnp.ones((2, 2)),
                                                 "bias": jnp.ones(2)}},
                                 "layer_norm1": {"scale": jnp.ones(2)}}}}},
        "log_tau_ct": jnp.ones(()), "logit_scale": jnp.ones(())}
    # With zero gradients Adam's update is 0, so what moves is weight decay alone: the first
    # update runs at lr 0 (warm-up start), the second at lr = peak / 10.
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt_state = tx.init(params)
    _, opt_state = tx.update(zeros, opt_state, params)
    updates, _ = tx.update(zeros, opt_state, params)
    decays = jax.tree.map(lambda u: float(jnp.max(jnp.abs(u))) > 0, updates)
    np.testing.assert_allclose(
        updates["event_tower"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"],
        -peak / 10 * config.optim.weight_decay * np.ones((2, 2)), rtol=1e-5)
    assert decays["event_tower"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert not decays["event_tower"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["bias"]
    assert not decays["event_tower"]["vision_model"]["encoder"]["layers_0"]["layer_norm1"][
        "scale"]
    assert not decays["event_tower"]["vision_model"]["embeddings"]["patch_embedding"]["kernel"]
    assert not decays["log_tau_ct"] and not decays["logit_scale"]
