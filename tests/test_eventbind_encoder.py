"""EventBind's temporal event encoder (models/eventbind.py): CLIP's image tower at
initialisation, its train step (frozen towers untouched, encoder and prompts moving), the step
on a mesh, remat, and our checkpoint format (no HF twin)."""

import jax
import numpy as np
import pytest

from evclip_jax import api, checkpoints, convert, embed, objectives, sharding, step, trainer
from evclip_jax.config_base import base_config
from evclip_jax.models.clip import CLIPConfig, TowerConfig
from evclip_jax.models.towers import Towers

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "image_size": 16, "patch_size": 8, "projection_dim": 16}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "vocab_size": 64, "max_position_embeddings": 8,
        "eos_token_id": 63, "projection_dim": 16}
BATCH, FRAMES = 16, 3
CLASSES = ["disc", "square", "cross", "ring"]


def eventbind_config(text_prompts="hybrid"):
    """The tiny model with EventBind's encoder, trained by HTCA on T=3 frames."""
    c = base_config()
    c.batch_size = BATCH
    c.objective = "eventbind"
    c.model.allow_random_init = True
    c.model.vision.update(VISION)
    c.model.text.update(TEXT)
    c.model.event_encoder = "eventbind"
    c.model.event_prompts = 4
    c.model.text_prompts = text_prompts
    c.data.representation = "eventbind"
    c.data.num_frames = FRAMES
    c.data.prompt = "a photo of a {label}"
    c.optim.base_lr = 0.016
    return c


def frames(seed, n=BATCH):
    """Tower input [n, T, 16, 16, 3]."""
    return np.random.default_rng(seed).standard_normal((n, FRAMES, 16, 16, 3)).astype(np.float32)


def _leaves(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


class Setup:
    """The trainer's model, classes and step.setup on a mesh, with a random batch."""

    def __init__(self, config, devices, **mesh_sizes):
        self.mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
        self.towers = step.make_towers(config, trainer.model_config(config))
        self.params = jax.device_get(jax.jit(self.towers.init)(jax.random.key(config.seed)))
        objective = objectives.get(config.objective)
        classes = trainer.class_inputs(config, objective, self.towers, self.params, None,
                                       CLASSES)
        self.setup = step.setup(config, self.towers, self.params, classes, self.mesh,
                                total_steps=100, warmup_steps=10)

    def step(self, seed=0, state=None):
        rng = np.random.default_rng(seed)
        batch = {"events": frames(seed),
                 "images": rng.standard_normal((BATCH, 16, 16, 3)).astype(np.float32),
                 "labels": rng.integers(0, len(CLASSES), BATCH).astype(np.int32)}
        s = self.setup
        with jax.set_mesh(self.mesh):
            batch = {k: jax.device_put(v, sharding.batch_sharding(self.mesh, v.ndim))
                     for k, v in batch.items()}
            return s.step_fn(state or s.state, s.frozen, s.classes, batch)


# ----------------------------------------------------------------------------- at init


def test_encoder_at_init_is_the_image_tower_averaged_over_frames():
    """Within float32 rounding of embed_vision (the image tower on each frame, averaged) and of
    HF transformers' CLIPVisionModelWithProjection run frame by frame; the new parameters are
    wired (each changes the output once it is moved off its initial value)."""
    import torch
    import transformers

    towers = Towers(CLIPConfig(TowerConfig(**VISION), TowerConfig(**TEXT), 16,
                               event_encoder="eventbind", num_frames=FRAMES, event_prompts=4))
    params = jax.jit(towers.init)(jax.random.key(0))
    x = frames(1, n=5)
    per_frame = np.asarray(embed.embed_vision(towers.vision, params["image_tower"], x))
    event_fn = jax.jit(lambda p: embed.embed_vision(towers.event, p, x))
    temporal = np.asarray(event_fn(params["event_tower"]))
    np.testing.assert_allclose(temporal, per_frame, rtol=1e-6, atol=1e-6)

    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **convert.hf_config_dict(towers.config, "image"))).eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in convert.params_to_state_dict(
        jax.device_get(params), "image").items()}, strict=False)
    with torch.no_grad():
        reference = hf(pixel_values=torch.from_numpy(
            x.reshape(-1, 16, 16, 3).transpose(0, 3, 1, 2).copy())).image_embeds.numpy()
    np.testing.assert_allclose(temporal, reference.reshape(5, FRAMES, -1).mean(axis=1),
                               rtol=1e-5, atol=1e-5)

    encoder = params["event_tower"]["vision_model"]["encoder"]
    assert np.abs(np.asarray(encoder["event_prompts_1"])).max() > 0  # random, gated to zero
    rng = np.random.default_rng(2)
    for path in [("vision_model", "temporal_embedding"),
                 ("vision_model", "encoder", "prompt_gate_1")]:
        moved = jax.tree.map(np.array, params["event_tower"])
        node = moved
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = node[path[-1]] + 0.5 * rng.standard_normal(node[path[-1]].shape)
        out = np.asarray(event_fn(moved))
        assert np.abs(out - per_frame).max() > 1e-3, path


def test_a_clip_checkpoint_completes_into_the_temporal_encoder(tmp_path):
    """A trainer run from an HF CLIP: workdir/init holds the temporal encoder with the image
    tower's weights at every CLIP path, and the prompt learner at zero."""
    from hf_fixtures import make_tiny_hf_clip

    hf_dir = make_tiny_hf_clip(tmp_path / "hf")
    config = eventbind_config()
    config.model.checkpoint = str(hf_dir)
    towers = step.make_towers(config, trainer.model_config(config))
    init_dir = trainer.write_init_dir(config, tmp_path / "run", towers)
    _, params = convert.load_evclip(init_dir)
    _, hf_params = convert.load_hf_clip(hf_dir)
    image, event = _leaves(hf_params["image_tower"]), _leaves(params["event_tower"])
    assert set(image) < set(event)
    for key, value in image.items():
        np.testing.assert_array_equal(event[key], value)
    prompts = _leaves(params["text_prompts"])
    for key in ("context", "content_net_fc2/kernel", "content_net_fc2/bias"):
        assert not np.any(prompts[key]), key


# ----------------------------------------------------------------------------- the step


def test_htca_step_freezes_the_towers_and_moves_encoder_and_prompts():
    """Two steps: the warm-up's learning rate is 0 at the first."""
    s = Setup(eventbind_config(), jax.devices()[:1], data=1)
    state0 = _leaves(s.setup.state.params)
    frozen0 = _leaves(s.setup.frozen)
    state, _ = s.step()
    state, metrics = s.step(seed=1, state=state)
    assert np.isfinite(float(metrics["loss_htca"]))
    for key, value in _leaves(s.setup.frozen).items():  # image and text towers: bitwise
        np.testing.assert_array_equal(value, frozen0[key])
    assert {k.split("/")[0] for k in frozen0} == {"image_tower", "text_tower"}
    after = _leaves(state.params)
    moved = {k for k in after if not np.array_equal(after[k], state0[k])}
    encoder = "event_tower/vision_model/encoder"
    for key in ("event_tower/vision_model/embeddings/patch_embedding/kernel",
                f"{encoder}/layers_1/mlp/fc2/kernel",
                "event_tower/vision_model/temporal_embedding",
                f"{encoder}/prompt_gate_0",
                f"{encoder}/cross_frame_prompts_1/self_attn/out_proj/kernel",
                "text_prompts/context", "text_prompts/content_net_fc2/kernel"):
        assert key in moved, key
    # Only the trainable params have optimizer state; the text tower none.
    opt = _leaves(state.opt_state)
    assert not any("image_tower" in k or "text_tower" in k for k in opt)
    assert any("text_prompts/context" in k for k in opt)


@pytest.mark.slow
def test_step_on_eight_devices_equals_one():
    """Loss and params after one step: 8 fake devices (data 2, fsdp 2, tensor 2) against one.
    Tolerance as tests/test_step.py: reductions run in another order on another layout."""
    config = eventbind_config()
    single = Setup(config, jax.devices()[:1], data=1)
    multi = Setup(config, jax.devices(), data=2, fsdp=2, tensor=2)
    (p1, m1), (p8, m8) = [(_leaves(st.params), jax.device_get(m))
                          for st, m in (single.step(seed=3), multi.step(seed=3))]
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    assert p1.keys() == p8.keys()
    for key, value in p1.items():
        np.testing.assert_allclose(p8[key], value, atol=5e-6, rtol=0, err_msg=key)


def _htca_grads(remat):
    """Gradients of HTCA (hand-written prompts) with respect to the trainable params."""
    config = eventbind_config(text_prompts="handcrafted")
    config.model.remat = remat
    towers = step.make_towers(config, trainer.model_config(config))
    params = jax.jit(towers.init)(jax.random.key(0))
    objective = objectives.get("eventbind")
    loss_fn = objectives.make_loss_fn(objective, towers, config.loss)
    classes = embed.class_text_embeddings(towers.text, params["text_tower"],
                                          np.arange(32).reshape(4, 8) % 60 + 1)
    batch = {"events": frames(0, 4), "labels": np.arange(4, dtype=np.int32),
             "images": frames(1, 4)[:, 0]}
    frozen = {"image_tower": params["image_tower"]}
    grad = jax.jit(jax.grad(lambda p: loss_fn(p, frozen, classes, batch, 0)[0]))
    return _leaves(grad(objectives.initial_trainable(objective, params, config.loss)))


def test_remat_gives_the_same_gradients():
    none, full = _htca_grads("none"), _htca_grads("full")
    for key, value in none.items():
        np.testing.assert_allclose(full[key], value, rtol=1e-4, atol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------- checkpoints


def test_our_format_round_trips_and_hf_export_is_refused(tmp_path):
    towers = Towers(CLIPConfig(TowerConfig(**VISION), TowerConfig(**TEXT), 16,
                               event_encoder="eventbind", num_frames=FRAMES, event_prompts=4,
                               text_prompts="hybrid"))
    params = jax.tree.map(np.array, jax.jit(towers.init)(jax.random.key(0)))
    params["event_tower"]["vision_model"]["temporal_embedding"] += 0.1  # a trained encoder
    model = api.EventCLIP(towers.config, params)
    x = np.random.default_rng(0).uniform(0, 1, (2, FRAMES, 16, 16, 3)).astype(np.float32)
    expected = np.asarray(model.encode_events(x, representation="eventbind"))
    model.save_pretrained(tmp_path / "evclip")
    config, _, _ = checkpoints.load_model(tmp_path / "evclip")
    assert config == towers.config
    loaded = api.EventCLIP.from_pretrained(tmp_path / "evclip")
    np.testing.assert_array_equal(
        np.asarray(loaded.encode_events(x, representation="eventbind")), expected)
    assert set(loaded.params) == set(params)
    with pytest.raises(ValueError, match="no HF transformers twin.*temporal position"):
        loaded.save_pretrained_hf(tmp_path / "hf_event", tower="event")
    with pytest.raises(ValueError, match="no HF transformers twin"):
        loaded.save_pretrained_openai(tmp_path / "event.pt", tower="image", layout="release")
    # The image tower is CLIP's and exports as ever, without our additions in its config.
    out = loaded.save_pretrained_hf(tmp_path / "hf_image", tower="image")
    assert "evclip_additions" not in (out / "config.json").read_text()


def test_config_refuses_the_encoder_without_its_frames():
    config = eventbind_config()
    config.data.representation = "evclip"
    with pytest.raises(ValueError, match="model.event_encoder.*data.representation"):
        trainer.check_config(config)
