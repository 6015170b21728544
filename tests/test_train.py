"""The train step: frozen towers, sharding equivalence, teacher-embedding and caption paths."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from evclip_jax import sharding, train
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
    """A tiny model placed on a mesh, with a random batch."""

    def __init__(self, config, devices, **mesh_sizes):
        self.config = config
        self.mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
        self.rules = sharding.DEFAULT_RULES
        self.towers = train.make_towers(config, train.model_config(config))
        params = train.initial_params(config, self.towers)
        self.tx, self.schedule = train.make_optimizer(config, 100, 10)
        place = lambda tree: train.place_params(tree, self.towers, self.mesh, self.rules)
        self.frozen = place({k: params[k] for k in train.FROZEN})
        with self.ctx():
            self.state = train.init_state(place(train.trainable_from(params, config)), self.tx)
            ids = train.hash_tokenize([f"a {c}" for c in CLASSES], self.towers.config.text)
            self.ids = ids
            self.text_emb = jax.device_put(
                train.class_text_embeddings(self.towers, self.frozen["text_tower"], ids),
                sharding.replicated(self.mesh))

    def ctx(self):
        return _Both(jax.set_mesh(self.mesh), flax.linen.logical_axis_rules(self.rules))

    def batch(self, seed=0, **extra):
        rng = np.random.default_rng(seed)
        b = {"events": rng.uniform(-1, 1, (BATCH, 16, 16, 3)).astype(np.float32),
             "images": rng.standard_normal((BATCH, 16, 16, 3)).astype(np.float32),
             "labels": rng.integers(0, len(CLASSES), BATCH).astype(np.int32), **extra}
        return {k: jax.device_put(v, sharding.batch_sharding(self.mesh, np.ndim(v)))
                for k, v in b.items()}

    def step_fn(self, batch):
        step = train.make_train_step(self.towers, self.config.loss, self.tx, self.schedule)
        return train.jit_train_step(step, self.state, self.frozen, self.text_emb, batch,
                                    self.mesh)


class _Both:
    def __init__(self, *ctxs):
        self.ctxs = ctxs

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _paths(tree):
    return [_path_str(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_frozen_towers_unchanged_and_without_optimizer_state():
    s = Setup(tiny_config(), jax.devices()[:1], data=1)
    before = jax.device_get(s.frozen)
    batch = s.batch()
    with s.ctx():
        step = s.step_fn(batch)
        state = s.state
        event_before = jax.device_get(state.params["event_tower"])
        for _ in range(3):
            state, metrics = step(state, s.frozen, s.text_emb, batch)
    after = jax.device_get(s.frozen)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert np.array_equal(a, b)
    # The event tower did move.
    event_after = jax.device_get(state.params["event_tower"])
    moved = [not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(event_before), jax.tree.leaves(event_after), strict=True)]
    assert all(moved)
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
        teacher = s.towers.vision.apply({"params": s.frozen["image_tower"]}, batch["images"])
        teacher_batch = {k: v for k, v in batch.items() if k != "images"} | {
            "teacher_emb": teacher}
        with_tower = _flops(s.step_fn(batch).lower(
            s.state, s.frozen, s.text_emb, batch).compile())
        with_teacher = _flops(s.step_fn(teacher_batch).lower(
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
            state, metrics = s.step_fn(batch)(s.state, s.frozen, s.text_emb, batch)
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


def test_teacher_embeddings_replace_the_image_tower():
    s = Setup(tiny_config(), jax.devices()[:1], data=1)
    loss_fn = train.make_loss_fn(s.towers, s.config.loss)
    batch = s.batch()
    with s.ctx():
        teacher = s.towers.vision.apply({"params": s.frozen["image_tower"]}, batch["images"])
        with_images = loss_fn(s.state.params, s.frozen, s.text_emb, batch)[0]
        alt = {k: v for k, v in batch.items() if k != "images"} | {"teacher_emb": teacher}
        with_teacher = loss_fn(s.state.params, s.frozen, s.text_emb, alt)[0]
    np.testing.assert_allclose(float(with_teacher), float(with_images), rtol=1e-6)


def test_caption_ids_run_the_frozen_text_tower():
    """A caption batch equals a class batch whose class set is the batch's own captions."""
    s = Setup(tiny_config(), jax.devices()[:1], data=1)
    loss_fn = train.make_loss_fn(s.towers, s.config.loss)
    batch = s.batch()
    captions = s.ids[np.asarray(batch["labels"])]
    with s.ctx():
        cap = {k: v for k, v in batch.items() if k != "labels"} | {"caption_ids": captions}
        got, terms = loss_fn(s.state.params, s.frozen, s.text_emb, cap)
        per_sample = train.class_text_embeddings(s.towers, s.frozen["text_tower"], captions)
        ref_batch = batch | {"labels": jnp.arange(BATCH)}
        want, _ = loss_fn(s.state.params, s.frozen, per_sample, ref_batch)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    assert set(terms) == {"loss_ct", "loss_zs", "loss_kl"}


def test_release_switch_sends_no_ct_gradient_to_event_tower():
    config = tiny_config()
    config.loss.zs_weight = config.loss.kl_weight = 0.0
    s = Setup(config, jax.devices()[:1], data=1)
    batch = s.batch()
    grads = {}
    for release in (False, True):
        config.loss.ct_release = release
        loss_fn = train.make_loss_fn(s.towers, config.loss)
        with s.ctx():
            g = jax.grad(lambda p, f=loss_fn: f(p, s.frozen, s.text_emb, batch)[0])(
                s.state.params)
        grads[release] = max(float(jnp.max(jnp.abs(x))) for x in
                             jax.tree.leaves(g["event_tower"]))
    assert grads[True] == 0.0
    assert grads[False] > 0.0


def test_optimizer_schedule_and_decay_mask():
    config = tiny_config()
    config.batch_size = 512
    config.optim.base_lr = 1e-6
    tx, schedule = train.make_optimizer(config, total_steps=100, warmup_steps=10)
    peak = 1e-6 * 512 / 256
    assert math.isclose(float(schedule(10)), peak, rel_tol=1e-6)
    assert float(schedule(0)) == 0.0 and float(schedule(100)) < 1e-12
    np.testing.assert_allclose(float(schedule(55)), peak * 0.5, rtol=1e-5)  # cosine midpoint
    params = {"event_tower": {"vision_model": {
        "embeddings": {"patch_embedding": {"kernel": jnp.ones((2, 2))}},
        "encoder": {"layers_0": {"mlp": {"fc1": {"kernel": jnp.ones((2, 2)),
                                                 "bias": jnp.ones(2)}},
                                 "layer_norm1": {"scale": jnp.ones(2)}}}}},
        "log_tau_ct": jnp.zeros(()), "logit_scale": jnp.zeros(())}
    decays = jax.tree_util.tree_map_with_path(train._decays, params)
    assert decays["event_tower"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    assert not decays["event_tower"]["vision_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["bias"]
    assert not decays["event_tower"]["vision_model"]["embeddings"]["patch_embedding"]["kernel"]
    assert not decays["log_tau_ct"] and not decays["logit_scale"]
