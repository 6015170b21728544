"""The one definition of the embedding helpers and of prompt tokenization, against NumPy."""

import numpy as np
import pytest

from evclip_jax import embed, text
from evclip_jax.models.clip import TowerConfig

TEXT_CFG = TowerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=64, max_position_embeddings=8,
                       eos_token_id=63, projection_dim=16)
MEAN, STD = np.array(embed.CLIP_MEAN), np.array(embed.CLIP_STD)


def test_l2_normalize_and_its_float64_twin():
    x = np.random.default_rng(0).normal(size=(5, 7))
    want = x / np.sqrt((x**2).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(embed.l2_normalize(x.astype(np.float32))), want,
                               rtol=1e-6)
    np.testing.assert_allclose(embed.l2_normalize_f64(x), want, rtol=1e-12)
    assert np.array_equal(embed.l2_normalize_f64(np.zeros((1, 3))), np.zeros((1, 3)))


def test_tower_inputs_hand_computed():
    rng = np.random.default_rng(1)
    eq1 = rng.uniform(0, 1, (2, 4, 4)).astype(np.float32)
    out = np.asarray(embed.events_to_tower_input(eq1, "evclip"))
    assert out.shape == (2, 4, 4, 3)
    for c in range(3):  # (E - 0.5) * 2, no CLIP mean/std (the release)
        np.testing.assert_allclose(out[..., c], 2 * eq1 - 1, atol=1e-7)
    # [B, H, W, 3] is already tower input.
    np.testing.assert_array_equal(np.asarray(embed.events_to_tower_input(out)), out)
    rgb = rng.uniform(0, 1, (2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(embed.events_to_tower_input(rgb, "eventclip")),
                               (rgb - MEAN) / STD, rtol=1e-5, atol=1e-6)
    frames = rng.uniform(0, 1, (2, 3, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(embed.events_to_tower_input(frames, "eventbind")),
                               (frames - MEAN) / STD, rtol=1e-5, atol=1e-6)
    gray = rng.integers(0, 256, (2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(embed.images_to_tower_input(gray)),
                               (gray[..., None] / 255 - MEAN) / STD, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"eventbind.*\[B, T, H, W, 3\]"):
        embed.events_to_tower_input(rgb, "eventbind")
    with pytest.raises(ValueError, match="config.data.representation"):
        embed.events_to_tower_input(rgb, "voxel")


def test_embed_vision_averages_frames():
    """[B, T, H, W, C] is embedded frame by frame and the T embeddings averaged."""

    class Linear:
        def apply(self, variables, x):
            return x.reshape(x.shape[0], -1) @ variables["params"]

    w = np.random.default_rng(2).normal(size=(2 * 2 * 3, 5)).astype(np.float32)
    x = np.random.default_rng(3).normal(size=(4, 3, 2, 2, 3)).astype(np.float32)
    got = np.asarray(embed.embed_vision(Linear(), w, x))
    want = np.stack([np.mean([x[b, t].reshape(-1) @ w for t in range(3)], axis=0)
                     for b in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_prompts_and_token_ids(monkeypatch):
    assert text.class_prompts("a photo of a {label}", ["cat", "dog"]) == [
        "a photo of a cat", "a photo of a dog"]
    with pytest.raises(ValueError, match=r"config.data.prompt='a photo'.*\{label\}"):
        text.class_prompts("a photo", ["cat"])
    ids = text.token_ids(["a cat", "a dog"], TEXT_CFG)
    assert ids.shape == (2, 8)
    # The hash tokenizer: one id per word, then EOS, then zeros; same word, same id.
    assert ids[0, 0] == ids[1, 0] and ids[0, 1] != ids[1, 1]
    assert list(ids[0, 2:]) == [63] + [0] * 5
    big = TowerConfig(**{**TEXT_CFG.__dict__, "vocab_size": text.CLIP_VOCAB_SIZE})
    monkeypatch.setattr(text, "open_clip_tokenizer", lambda: None)  # as without open_clip
    with pytest.raises(ValueError, match="/ckpt/x: no tokenizer files"):
        text.token_ids(["a cat"], big, None, "/ckpt/x")
