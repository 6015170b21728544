"""EventCLIP: exports that transformers loads and that match, the evclip dir round trip, the
tokenizer path (strings -> ids -> text embeddings), one jit trace per shape, input errors, and
tools/export_to_pytorch.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_fixtures import (
    EOS_TOKEN,
    hf_image_features,
    hf_text_features,
    hf_vision_model_features,
    make_tiny_hf_clip,
    rel_err,
)

from evclip_jax import EventCLIP, convert

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
IMAGE_SIZE = 28  # 4x4 patches of 7
TEXTS = ["a photo of the cat", "the of photo", "hello world!", ""]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_clip(
        tmp_path_factory.mktemp("hf") / "tiny", seed=5, with_tokenizer=True,
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=7, hidden_size=24,
                           num_attention_heads=3, intermediate_size=40),
        text_config=dict(max_position_embeddings=10), projection_dim=12)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.CLIPModel.from_pretrained(str(hf_dir)).eval()


@pytest.fixture(scope="module")
def model(hf_dir) -> EventCLIP:
    return EventCLIP.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def trained(model) -> EventCLIP:
    """The same model with an event tower that no longer equals the image tower."""
    rng = np.random.default_rng(0)
    event = jax.tree.map(
        lambda x: jnp.asarray(x + 0.05 * rng.normal(size=x.shape).astype(np.float32)),
        model.params["event_tower"])
    return EventCLIP(model.config, dict(model.params, event_tower=event),
                     tokenizer=model.tokenizer, tokenizer_dir=model.tokenizer_dir)


def _pixels(batch: int = 2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def _assert_same_params(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- exports


def test_event_tower_starts_as_the_image_tower(model, hf_model):
    x = _pixels()
    np.testing.assert_array_equal(model.encode_events(x), model.encode_images(x))
    assert rel_err(model.encode_images(x), hf_image_features(hf_model, x)) <= RTOL


@pytest.mark.parametrize("tower", ["event", "image"])
def test_export_vision_tower_loads_in_transformers(trained, tower, tmp_path):
    out = trained.save_pretrained_hf(tmp_path / tower, tower=tower)
    config = json.loads((out / "config.json").read_text())
    assert config["projection_dim"] == trained.config.projection_dim
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(str(out)).eval()
    assert hf.config.projection_dim == trained.config.projection_dim
    frames = np.random.default_rng(1).random((2, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    x = np.repeat(((frames - 0.5) * 2)[..., None], 3, axis=-1)
    ours = trained.encode_events(x) if tower == "event" else trained.encode_images(x)
    assert rel_err(ours, hf_vision_model_features(hf, x)) <= RTOL
    if tower == "event":
        assert rel_err(trained.encode_events(frames), hf_vision_model_features(hf, x)) <= RTOL
    # The two towers differ, so the export carries the one asked for.
    assert rel_err(trained.encode_events(x), trained.encode_images(x)) > 1e-3


def test_export_clip_loads_in_transformers(trained, tmp_path):
    out = trained.save_pretrained_hf(tmp_path / "clip", tower="clip")
    hf = transformers.CLIPModel.from_pretrained(str(out)).eval()
    x = _pixels(seed=2)
    ids = trained.tokenize(TEXTS)
    assert rel_err(trained.encode_images(x), hf_image_features(hf, x)) <= RTOL
    assert rel_err(trained.encode_text(ids), hf_text_features(hf, ids)) <= RTOL
    assert hf.logit_scale.item() == float(trained.logit_scale)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(out))
    np.testing.assert_array_equal(
        tokenizer(TEXTS, padding="max_length", max_length=10, truncation=True,
                  return_tensors="np")["input_ids"], ids)


def test_evclip_dir_round_trip(trained, tmp_path):
    out = trained.save_pretrained(tmp_path / "ev")
    loaded = EventCLIP.from_pretrained(out)
    assert loaded.config == trained.config
    _assert_same_params(loaded.params, trained.params)
    assert loaded.tokenizer is not None
    np.testing.assert_array_equal(loaded.tokenize(TEXTS), trained.tokenize(TEXTS))
    x = _pixels(seed=3)
    # An evclip dir exports like an HF dir does.
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(
        str(loaded.save_pretrained_hf(tmp_path / "event", tower="event")))
    assert rel_err(trained.encode_events(x), hf_vision_model_features(hf, x)) <= RTOL


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_loads_offline(hf_dir, model):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    vocab = json.loads((hf_dir / "vocab.json").read_text())
    assert tokenizer.eos_token_id == vocab[EOS_TOKEN] == model.config.text.eos_token_id
    assert len(tokenizer) <= model.config.text.vocab_size
    assert isinstance(model.tokenizer, transformers.CLIPTokenizer)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a photo of the cat")["input_ids"])
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "the</w>", "c", "a",
                      "t</w>", "<|endoftext|>"]


def test_encode_text_strings_match_hf(hf_dir, model, hf_model):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    ids = tokenizer(TEXTS, padding="max_length", max_length=10, truncation=True,
                    return_tensors="np")["input_ids"]
    eos = model.config.text.eos_token_id
    assert (ids == eos).any(axis=1).all()
    assert (ids == eos).sum(axis=1).max() >= 2  # padding reuses the eos id
    np.testing.assert_array_equal(model.tokenize(TEXTS), ids)
    errs = [rel_err(a, b) for a, b in zip(
        np.asarray(model.encode_text(TEXTS)), hf_text_features(hf_model, ids), strict=True)]
    assert max(errs) <= RTOL, errs


def test_encode_text_strings_without_tokenizer(model):
    bare = EventCLIP(model.config, model.params)
    with pytest.raises(ValueError, match="tokenizer"):
        bare.encode_text(["a photo"])


# ----------------------------------------------------------------------------- jit


def test_jit_traces_once_per_shape(model):
    """Repeated calls with one shape reuse one compiled function; event input of the same shape
    reuses the image tower's (same module, same param shapes)."""
    x = _pixels(batch=5)  # a batch size no other test uses
    before = model._vision._cache_size()
    model.encode_images(x)
    model.encode_images(x + 1)
    model.encode_events(x)
    model.encode_events(x[..., 0] * 0 + 0.5)  # [B,H,W] frames become [B,H,W,3]
    assert model._vision._cache_size() == before + 1

    before = model._text._cache_size()
    model.encode_text(TEXTS[:3])
    model.encode_text(model.tokenize(TEXTS[1:]))
    assert model._text._cache_size() == before + 1


# ----------------------------------------------------------------------------- inputs


def test_normalize(model):
    x = _pixels()
    out = np.asarray(model.encode_images(x, normalize=True), np.float64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-6)
    raw = np.asarray(model.encode_images(x), np.float64)
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=-1, keepdims=True), rtol=1e-6)
    text = np.asarray(model.encode_text(TEXTS, normalize=True), np.float64)
    np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, rtol=1e-6)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match=r"\[B, H, W\]"):
        model.encode_events(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 2), np.float32))
    with pytest.raises(ValueError, match=f"{IMAGE_SIZE}, {IMAGE_SIZE}, 3"):
        model.encode_images(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="NHWC"):
        model.encode_images(np.zeros((2, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))
    with pytest.raises(ValueError, match="max_position_embeddings=10"):
        model.encode_text(jnp.zeros((1, 11), jnp.int32))


def test_from_pretrained_not_a_checkpoint(tmp_path):
    with pytest.raises(convert.CheckpointError, match="neither"):
        EventCLIP.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- the tool


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/export_to_pytorch.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XLA_FLAGS": ""})


@pytest.fixture(scope="module")
def export_tool(load_tool):
    """The tool's module, imported in-process to test its function without a subprocess."""
    return load_tool("export_to_pytorch")


def test_export_tool(trained, tmp_path):
    checkpoint = trained.save_pretrained(tmp_path / "ev")
    out = tmp_path / "event_hf"
    run = _run_tool("--checkpoint", str(checkpoint), "--out", str(out), "--tower", "event")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith(f"loading {checkpoint}")
    assert any(line.startswith("wrote") and "MB" in line for line in lines)
    count = sum(x.size for x in jax.tree.leaves(trained.params["event_tower"]))
    assert lines[-1].startswith(f"done: event tower ({count:,} params) -> {out}")
    assert lines[-1].rstrip().endswith(" s")
    hf = transformers.CLIPVisionModelWithProjection.from_pretrained(str(out)).eval()
    x = _pixels(seed=4)
    assert rel_err(trained.encode_events(x), hf_vision_model_features(hf, x)) <= RTOL


def test_export_tool_clip_from_hf_dir(export_tool, hf_dir, model, tmp_path):
    out = tmp_path / "clip_hf"
    lines = []
    summary = export_tool.export_tower(str(hf_dir), str(out), "clip", log=lines.append)
    assert summary["hf_class"] == "CLIPModel" and lines[0].endswith("(HF CLIP dir)")
    hf = transformers.CLIPModel.from_pretrained(str(out)).eval()
    ids = model.tokenize(TEXTS)
    assert rel_err(model.encode_text(ids), hf_text_features(hf, ids)) <= RTOL
    assert (out / "vocab.json").read_bytes() == (hf_dir / "vocab.json").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_tool.export_tower(str(hf_dir), str(out), "image", log=lines.append)
    export_tool.export_tower(str(hf_dir), str(out), "image", overwrite=True, log=lines.append)
    assert json.loads((out / "config.json").read_text())["model_type"] == "clip_vision_model"


def test_export_tool_bad_checkpoint(export_tool, tmp_path):
    with pytest.raises(convert.CheckpointError, match=re.escape(str(tmp_path))):
        export_tool.export_tower(str(tmp_path), str(tmp_path / "out"), log=lambda _: None)
    assert not (tmp_path / "out").exists()
