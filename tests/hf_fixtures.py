"""Tiny random HF CLIP checkpoints (and a tiny CLIP tokenizer), built offline for tests.

``make_tiny_hf_clip`` writes what ``CLIPModel.save_pretrained`` writes for a small random
``transformers.CLIPConfig`` (seeded with ``torch.manual_seed``), optionally with a byte-level BPE
tokenizer (vocab.json + merges.txt) whose ``<|endoftext|>`` id is the text config's
eos_token_id. The helpers ``hf_image_features`` / ``hf_text_features`` run the PyTorch reference,
and ``rel_err`` is the figure the parity tests bound.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# A few BPE merges so the tokenizer does more than split into bytes ("the", "of", "photo").
TINY_MERGES = ("t h", "th e</w>", "o f</w>", "p h", "ph o", "t o</w>", "pho to</w>")

# Small sizes with the awkward cases on by default: a 5x5 patch grid, widths that differ between
# the towers, intermediate sizes that are not multiples of the width, eos = vocab_size - 1.
DEFAULT_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, image_size=30, patch_size=6, hidden_act="quick_gelu")
DEFAULT_TEXT = dict(hidden_size=24, intermediate_size=50, num_hidden_layers=2,
                    num_attention_heads=3, vocab_size=64, max_position_embeddings=12,
                    eos_token_id=63, bos_token_id=62, pad_token_id=63, hidden_act="quick_gelu")
DEFAULT_PROJECTION_DIM = 16


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (the byte-level BPE alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tiny_vocab(merges: tuple[str, ...] = TINY_MERGES) -> dict[str, int]:
    """Vocab laid out as OpenAI CLIP's: bytes, bytes + "</w>", merges, then the two specials."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tiny_tokenizer(out_dir: str | os.PathLike,
                         merges: tuple[str, ...] = TINY_MERGES) -> dict[str, int]:
    """Writes vocab.json + merges.txt (CLIP's format) into ``out_dir``; returns the vocab."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab(merges)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def tiny_clip_config(vision_config: dict | None = None, text_config: dict | None = None,
                     **overrides):
    """A small ``transformers.CLIPConfig``; the dicts update the tower defaults above and the
    remaining keyword arguments (projection_dim, logit_scale_init_value, ...) the top level."""
    import transformers

    top = dict(projection_dim=DEFAULT_PROJECTION_DIM)
    top.update(overrides)
    return transformers.CLIPConfig(
        vision_config={**DEFAULT_VISION, **(vision_config or {})},
        text_config={**DEFAULT_TEXT, **(text_config or {})},
        **top,
    )


def build_hf_clip(config, seed: int = 0):
    """A randomly initialised float32 ``CLIPModel`` in eval mode, deterministic in ``seed``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).float().eval()
    # HF initialises biases to 0 and LayerNorms to (1, 0); perturbing them makes a dropped,
    # swapped or mistransposed bias or norm visible to the parity tests. logit_scale stays
    # the config's logit_scale_init_value.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.02)
    return model


def make_tiny_hf_clip(out_dir: str | os.PathLike, seed: int = 0, with_tokenizer: bool = False,
                      **config_overrides) -> Path:
    """Writes a tiny random HF CLIP dir (config.json + model.safetensors) and returns its path.

    ``config_overrides``: ``vision_config={...}``, ``text_config={...}`` (merged into the
    defaults) and top-level CLIPConfig fields. With ``with_tokenizer`` the dir also gets
    vocab.json + merges.txt; unless overridden, the text vocab_size is then the tokenizer's and
    eos/bos/pad ids are those of ``<|endoftext|>`` / ``<|startoftext|>``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = dict(config_overrides)
    text = dict(overrides.pop("text_config", None) or {})
    if with_tokenizer:
        vocab = write_tiny_tokenizer(out_dir)
        text.setdefault("vocab_size", len(vocab))
        if text["vocab_size"] < len(vocab):
            raise ValueError(f"text_config vocab_size={text['vocab_size']} is smaller than the "
                             f"tiny tokenizer's vocab ({len(vocab)} tokens)")
        text.setdefault("eos_token_id", vocab[EOS_TOKEN])
        text.setdefault("pad_token_id", vocab[EOS_TOKEN])
        text.setdefault("bos_token_id", vocab[BOS_TOKEN])
    config = tiny_clip_config(text_config=text, **overrides)
    build_hf_clip(config, seed).save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------- references


def _pooled(out):
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def hf_image_features(model, pixel_values_nhwc: np.ndarray) -> np.ndarray:
    """HF projected image embeddings of NHWC float input (transposed to NCHW for torch)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(
        np.asarray(pixel_values_nhwc, np.float32).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return _pooled(model.get_image_features(pixel_values=x)).numpy()


def hf_text_features(model, input_ids: np.ndarray) -> np.ndarray:
    """HF projected text embeddings of int token ids [B, L]."""
    import torch

    with torch.no_grad():
        out = model.get_text_features(input_ids=torch.from_numpy(np.asarray(input_ids, np.int64)))
    return _pooled(out).numpy()


def hf_vision_model_features(model, pixel_values_nhwc: np.ndarray) -> np.ndarray:
    """``image_embeds`` of a ``CLIPVisionModelWithProjection`` on NHWC float input."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(
        np.asarray(pixel_values_nhwc, np.float32).transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return model(pixel_values=x).image_embeds.numpy()


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
