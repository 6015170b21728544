"""Parity of the Flax CLIP towers (through EventCLIP) with HF PyTorch CLIPModel.

Tiny random configs cover the cases that break a port: patch grids that are odd or leave a
remainder, 1-3 layers, head counts that split the width differently, text and vision widths
that differ, intermediate sizes that are not multiples of the width, quick_gelu and gelu,
legacy (eos_token_id == 2: pool at argmax of ids) and modern (first eos occurrence) text pooling.
The slow tests build full-size ViT-B/32 and ViT-L/14 from config (random init, nothing
downloaded) and compare parameter trees and embeddings.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import transformers
from hf_fixtures import (
    build_hf_clip,
    hf_image_features,
    hf_text_features,
    make_tiny_hf_clip,
    rel_err,
)

from evclip_jax import EventCLIP, convert
from evclip_jax.models.clip import CLIPConfig
from evclip_jax.models.towers import Towers

TINY_RTOL = 1e-5
# One batch size for every vision input, so each case compiles the vision tower once.
BATCH = 2
FULL_RTOL = 1e-4


@dataclasses.dataclass(frozen=True)
class Case:
    vision: dict
    text: dict
    projection_dim: int
    # Sequence lengths for the text test (each compiles once); 12 = max_position_embeddings.
    text_lengths: tuple[int, ...] = (12,)


# Patch grids: 30/6 -> 5x5, 28/7 -> 4x4, 33/11 -> 3x3, 32/6 -> 5x5 with 2 pixels dropped.
# Vision widths 32 (1, 4, 8 heads) and 24 (6 heads); text widths 24 (3, 6 heads), 32 (2 heads)
# and 40 (8 heads, head_dim 5).
CASES = {
    "grid5-v32h4-t24h3-quickgelu-eos_last": Case(
        vision=dict(image_size=30, patch_size=6, hidden_size=32, num_attention_heads=4,
                    intermediate_size=37, num_hidden_layers=2, hidden_act="quick_gelu"),
        text=dict(hidden_size=24, num_attention_heads=3, intermediate_size=50,
                  num_hidden_layers=1, vocab_size=64, eos_token_id=63, hidden_act="quick_gelu"),
        projection_dim=16),
    "grid4-v32h1-t24h6-gelu-legacy_eos": Case(
        vision=dict(image_size=28, patch_size=7, hidden_size=32, num_attention_heads=1,
                    intermediate_size=45, num_hidden_layers=1, hidden_act="gelu"),
        text=dict(hidden_size=24, num_attention_heads=6, intermediate_size=29,
                  num_hidden_layers=3, vocab_size=50, eos_token_id=2, hidden_act="gelu"),
        projection_dim=8, text_lengths=(12, 7)),
    "grid3-v32h8-t32h2-quickgelu-eos_mid": Case(
        vision=dict(image_size=33, patch_size=11, hidden_size=32, num_attention_heads=8,
                    intermediate_size=70, num_hidden_layers=3, hidden_act="quick_gelu"),
        text=dict(hidden_size=32, num_attention_heads=2, intermediate_size=33,
                  num_hidden_layers=2, vocab_size=64, eos_token_id=40, hidden_act="quick_gelu"),
        projection_dim=20, text_lengths=(12, 7)),
    "grid5rem-v24h6-t40h8-gelu-eos_last": Case(
        vision=dict(image_size=32, patch_size=6, hidden_size=24, num_attention_heads=6,
                    intermediate_size=31, num_hidden_layers=2, hidden_act="gelu"),
        text=dict(hidden_size=40, num_attention_heads=8, intermediate_size=90,
                  num_hidden_layers=1, vocab_size=80, eos_token_id=79, hidden_act="gelu"),
        projection_dim=12),
}


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def tiny(request, tmp_path_factory):
    """(HF CLIPModel as saved and reloaded by transformers, EventCLIP of the same dir, case)."""
    case = CASES[request.param]
    text = dict(case.text, max_position_embeddings=12, bos_token_id=0, pad_token_id=1)
    hf_dir = make_tiny_hf_clip(tmp_path_factory.mktemp("hf"), seed=len(request.param),
                               vision_config=case.vision, text_config=text,
                               projection_dim=case.projection_dim)
    hf = transformers.CLIPModel.from_pretrained(str(hf_dir)).eval()
    return hf, EventCLIP.from_pretrained(hf_dir), case


def _row_errs(ours, ref) -> list[float]:
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    return [rel_err(a, b) for a, b in zip(ours, ref, strict=True)]


def _pixels(case: Case, batch: int, seed: int) -> np.ndarray:
    size = case.vision["image_size"]
    return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def _text_ids(case: Case, length: int, seed: int) -> np.ndarray:
    """Token ids whose pooling position is known: bos, random tokens, then the eos token.

    Modern eos: rows are padded with the eos id itself (as CLIP's tokenizer does) or with
    random non-eos tokens after the first eos, so only "first occurrence" pools correctly;
    with eos in the middle of the vocab, larger ids precede it, so argmax(ids) would not.
    Legacy (eos_token_id == 2): the eos is the largest id in the row, padding repeats it.
    """
    rng = np.random.default_rng(seed)
    vocab, eos = case.text["vocab_size"], case.text["eos_token_id"]
    legacy = eos == 2
    eos_id = vocab - 1 if legacy else eos
    rows = []
    for row, eos_pos in enumerate([1, length // 2, length - 1, 3]):
        ids = rng.integers(2, vocab - 1, size=length)
        ids[ids == eos_id] = eos_id - 1
        ids[0] = 0
        ids[eos_pos] = eos_id
        if row % 2 == 0:
            ids[eos_pos + 1:] = eos_id  # padding reuses the eos id
        rows.append(ids)
    return np.stack(rows).astype(np.int32)


def test_image_embeddings_match_hf(tiny):
    hf, model, case = tiny
    x = _pixels(case, BATCH, seed=1)
    errs = _row_errs(model.encode_images(x), hf_image_features(hf, x))
    assert max(errs) <= TINY_RTOL, errs


def test_event_tower_input_matches_hf_image_features(tiny):
    """[B,H,W,3] event input goes straight to the event tower, a copy of the image tower."""
    hf, model, case = tiny
    x = np.random.default_rng(2).uniform(-1, 1, size=_pixels(case, BATCH, 0).shape)
    x = x.astype(np.float32)
    errs = _row_errs(model.encode_events(x), hf_image_features(hf, x))
    assert max(errs) <= TINY_RTOL, errs


def test_event_frames_match_hf_on_release_mapping(tiny):
    """[B,H,W] Eq. 1 frames in [0,1) -> (E - 0.5) * 2, replicated to 3 channels, no mean/std."""
    hf, model, case = tiny
    size = case.vision["image_size"]
    counts = np.random.default_rng(3).poisson(2.0, size=(BATCH, size, size)).astype(np.float64)
    frames = counts / (counts.max(axis=(1, 2), keepdims=True) + 1)
    reference_input = np.repeat(((frames - 0.5) * 2)[..., None], 3, axis=-1)
    errs = _row_errs(model.encode_events(frames.astype(np.float32)),
                     hf_image_features(hf, reference_input))
    assert max(errs) <= TINY_RTOL, errs


def test_text_embeddings_match_hf(tiny):
    hf, model, case = tiny
    for length in case.text_lengths:
        ids = _text_ids(case, length, seed=length)
        errs = _row_errs(model.encode_text(ids), hf_text_features(hf, ids))
        assert max(errs) <= TINY_RTOL, (length, errs)


def test_text_pooling_position_matters(tiny):
    """Guards the text test: moving the eos changes the embedding, so pooling is exercised."""
    hf, model, case = tiny
    ids = _text_ids(case, 12, seed=0)
    moved = ids.copy()
    eos_id = case.text["vocab_size"] - 1 if case.text["eos_token_id"] == 2 else \
        case.text["eos_token_id"]
    moved[0, 1] = 5  # the first eos of row 0 was at position 1; the next is at 2
    assert moved[0, 2] == eos_id
    ours = np.asarray(model.encode_text(moved))
    assert rel_err(ours[0], np.asarray(model.encode_text(ids))[0]) > 1e-3
    assert max(_row_errs(ours, hf_text_features(hf, moved))) <= TINY_RTOL


# ----------------------------------------------------------------------------- full size


def _full_config(name: str, eos_token_id: int) -> transformers.CLIPConfig:
    text = dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=eos_token_id,
                bos_token_id=49406, pad_token_id=1, num_hidden_layers=12,
                hidden_act="quick_gelu")
    vision = dict(image_size=224, num_hidden_layers=12, hidden_act="quick_gelu")
    if name == "ViT-B/32":
        text.update(hidden_size=512, intermediate_size=2048, num_attention_heads=8)
        vision.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                      patch_size=32)
        projection_dim = 512
    else:
        text.update(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
        vision.update(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                      num_hidden_layers=24, patch_size=14)
        projection_dim = 768
    return transformers.CLIPConfig(text_config=text, vision_config=vision,
                                   projection_dim=projection_dim)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("name,eos_token_id", [("ViT-B/32", 49407), ("ViT-L/14", 2)])
def test_full_size_parity(name, eos_token_id, capsys):
    hf_config = _full_config(name, eos_token_id)
    hf = build_hf_clip(hf_config, seed=0)
    config = CLIPConfig.from_hf_dict(hf_config.to_dict())

    # Shapes and counts of a tree built from the config alone, against HF's.
    abstract = Towers(config).abstract_params()
    hf_count = sum(p.numel() for p in hf.parameters())
    ours_count = _count(abstract["image_tower"]) + _count(abstract["text_tower"]) + 1
    assert ours_count == hf_count
    assert _count(abstract["event_tower"]) == sum(
        p.numel() for n, p in hf.named_parameters() if n.startswith(("vision_", "visual_")))

    # position_ids are buffers, not parameters (transformers 5 does not store them).
    state = {k: v.numpy() for k, v in hf.state_dict().items() if not k.endswith("position_ids")}
    params = convert.state_dict_to_params(state, config)
    assert jax.tree.map(np.shape, params) == jax.tree.map(lambda a: a.shape, abstract)
    back = convert.params_to_state_dict(params)
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].shape == value.shape, key
    del back

    model = EventCLIP(config, jax.tree.map(jax.numpy.asarray, params))
    del params, state
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    ids = np.full((2, 77), eos_token_id if eos_token_id != 2 else 49407, np.int32)
    ids[:, 0] = 49406
    ids[0, 1:6] = [320, 1125, 539, 518, 2368]
    ids[0, 6] = 49407
    ids[1, 1:30] = np.random.default_rng(1).integers(300, 40000, size=29)
    ids[1, 30] = 49407
    errs = {
        "image": rel_err(model.encode_images(x), hf_image_features(hf, x)),
        "event": rel_err(model.encode_events(x), hf_image_features(hf, x)),
        "text": rel_err(model.encode_text(ids), hf_text_features(hf, ids)),
    }
    with capsys.disabled():
        print(f"\n{name} (eos {eos_token_id}): params {hf_count:,} (HF) == {ours_count:,} "
              f"(Flax CLIP), event tower {_count(abstract['event_tower']):,}; "
              + ", ".join(f"{k} rel err {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= FULL_RTOL, errs
