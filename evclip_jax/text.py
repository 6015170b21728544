"""Text for the frozen text tower: tokenizer loading, class prompts and their token ids."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evclip_jax.models.clip import TowerConfig

# Size of CLIP's BPE vocabulary: a text tower this large was trained on real tokens, so the
# hash tokenizer of the random demo models would give it meaningless ids.
CLIP_VOCAB_SIZE = 49408


# How a CLIP-vocabulary tower without tokenizer files gets one (the error says it).
HOW_TO_TOKENIZE = (
    "copy vocab.json + merges.txt of the matching HF CLIP into the checkpoint dir (or convert "
    "the checkpoint with tools/convert_hf_clip.py --tokenizer_dir), or install open_clip's "
    "tokenizer: pip install 'evclip_jax[openclip]' && pip install --no-deps "
    "'open_clip_torch>=3.0,<4'")


def load_tokenizer(path: str | os.PathLike | None):
    """The CLIPTokenizer saved in ``path``, or None when it holds no tokenizer files."""
    if path is None or not any((Path(path) / f).is_file()
                               for f in ("tokenizer.json", "vocab.json")):
        return None
    import transformers

    return transformers.CLIPTokenizer.from_pretrained(str(path))


def class_prompts(template: str, class_names: Sequence[str],
                  field: str = "config.data.prompt") -> list[str]:
    """``template`` filled with each class name; a template without ``{label}`` is refused
    (every class would share one prompt)."""
    if "{label}" not in template:
        raise ValueError(f"{field}={template!r}: expected a '{{label}}' placeholder")
    return [template.format(label=name) for name in class_names]


def hash_tokenize(texts: Sequence[str], text_cfg: TowerConfig) -> np.ndarray:
    """Word-hash token ids ending in the EOS id, for random demo CLIPs that have no vocabulary."""
    length, vocab = text_cfg.max_position_embeddings, text_cfg.vocab_size
    ids = np.zeros((len(texts), length), np.int32)
    for i, text in enumerate(texts):
        words = [1 + zlib.crc32(w.encode()) % (vocab - 3) for w in text.lower().split()]
        words = words[: length - 1] + [text_cfg.eos_token_id]
        ids[i, : len(words)] = words
    return ids


@functools.cache
def open_clip_tokenizer():
    """open_clip's ``SimpleTokenizer`` (OpenAI's BPE, its text cleaning and truncation), or None
    when open_clip is not installed.

    Its module is loaded on its own: open_clip's package ``__init__`` imports torchvision for its
    image transforms, which the tokenizer does not use and a CPU torch build may not have.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    name = "evclip_jax._open_clip_tokenizer"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def token_ids(texts: Sequence[str], text_cfg: TowerConfig, tokenizer=None,
              where: str | os.PathLike = "the model") -> np.ndarray:
    """Int token ids [N, L] of ``texts``: the checkpoint's tokenizer; for a CLIP-sized
    vocabulary without one, open_clip's (OpenAI checkpoint files come without tokenizer files);
    else the hash tokenizer of tokenizer-less random models."""
    length = text_cfg.max_position_embeddings
    if tokenizer is not None:
        return tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                         return_tensors="np")["input_ids"]
    if text_cfg.vocab_size >= CLIP_VOCAB_SIZE:
        fallback = open_clip_tokenizer()
        if fallback is None:
            raise ValueError(f"{where}: no tokenizer files (vocab.json + merges.txt or "
                             "tokenizer.json) to encode the prompts of this CLIP text tower, "
                             f"and open_clip is not installed; {HOW_TO_TOKENIZE}")
        return fallback(list(texts), context_length=length).numpy().astype(np.int32)
    return hash_tokenize(texts, text_cfg)
