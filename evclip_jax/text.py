"""Text for the frozen text tower: tokenizer loading, class prompts and their token ids."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evclip_jax.models.clip import TowerConfig

# Size of CLIP's BPE vocabulary: a text tower this large was trained on real tokens, so the
# hash tokenizer of the random demo models would give it meaningless ids.
CLIP_VOCAB_SIZE = 49408


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


def token_ids(texts: Sequence[str], text_cfg: TowerConfig, tokenizer=None,
              where: str | os.PathLike = "the model") -> np.ndarray:
    """Int token ids [N, L] of ``texts``: the checkpoint's tokenizer, else the hash tokenizer
    of tokenizer-less random models (refused for a CLIP-sized vocabulary)."""
    length = text_cfg.max_position_embeddings
    if tokenizer is not None:
        return tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                         return_tensors="np")["input_ids"]
    if text_cfg.vocab_size >= CLIP_VOCAB_SIZE:
        raise ValueError(f"{where}: no tokenizer files (vocab.json + merges.txt or "
                         "tokenizer.json) to encode the prompts of this CLIP text tower")
    return hash_tokenize(texts, text_cfg)
