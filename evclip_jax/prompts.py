"""Class text of EventBind's hybrid prompts (``model.text_prompts = "hybrid"``).

A class prompt is the hand-written one (``config.data.prompt`` filled with the class name)
whose token embeddings get the offsets of the prompt learner (models/eventbind.HybridPrompts:
a learnable context, and a content prompt from an image or event embedding) at the context
positions: the tokens of the template's words before ``{label}`` (the words EventBind's release
learns, e.g. "a photo of a"), the same in every class prompt. The text tower stays frozen; the
gradient reaches the prompt learner through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from evclip_jax import text
from evclip_jax.embed import embed_text, l2_normalize
from evclip_jax.models.clip import TowerConfig


def _before_eos(ids: np.ndarray, text_cfg: TowerConfig) -> np.ndarray:
    """The tokens of one tokenized text before its end-of-text token."""
    if text_cfg.eos_token_id == 2:  # legacy configs: end-of-text is the largest id
        return ids[: int(np.argmax(ids))]
    return ids[: int(np.argmax(ids == text_cfg.eos_token_id))]


def prompt_inputs(template: str, class_names: Sequence[str], text_cfg: TowerConfig,
                  tokenizer=None, where: str = "the model",
                  field: str = "config.data.prompt") -> tuple[np.ndarray, np.ndarray]:
    """(token ids [M, L] int32, context positions [M, L] bool) of the class prompts.

    ValueError naming ``field`` when the template has no words before ``{label}`` or when they
    do not tokenize the same inside every class prompt.
    """
    ids = text.token_ids(text.class_prompts(template, class_names, field), text_cfg,
                         tokenizer, where).astype(np.int32)
    prefix = template.split("{label}")[0].strip()
    start = len(_before_eos(text.token_ids([""], text_cfg, tokenizer, where)[0], text_cfg))
    lead = _before_eos(text.token_ids([prefix], text_cfg, tokenizer, where)[0], text_cfg)
    if len(lead) <= start:
        raise ValueError(f"{field}={template!r}: hybrid prompts learn a context on the "
                         "template's words before '{label}', and it has none")
    if not np.all(ids[:, : len(lead)] == lead):
        raise ValueError(f"{field}={template!r}: the words before '{{label}}' tokenize "
                         "differently inside the class prompts; end them with a space")
    context = np.zeros(ids.shape, bool)
    context[:, start: len(lead)] = True
    return ids, context


def class_text(towers, prompt_params, text_params, ids: jax.Array, context: jax.Array,
               cond: jax.Array | None = None) -> jax.Array:
    """Unit class text embeddings of the hybrid prompts through the text tower.

    Without ``cond``: [M, D], the learned context alone. With unit embeddings ``cond`` [N, D]:
    [N, M, D], row n with the content prompts of cond[n] (M prompts per row through the tower).
    """
    offsets = towers.prompts.apply({"params": prompt_params}, cond)  # [N or 1, L, width]
    n, (m, length) = offsets.shape[0], ids.shape
    offsets = jnp.where(context[None, :, :, None], offsets[:, None], 0.0)
    emb = embed_text(towers.text, text_params, jnp.tile(ids, (n, 1)),
                     offsets.reshape(n * m, length, -1))
    emb = l2_normalize(emb).reshape(n, m, -1)
    return emb if cond is not None else emb[0]


def per_query_class_text(towers, prompt_params, text_params, ids: np.ndarray,
                         context: np.ndarray, queries: np.ndarray, batch_size: int
                         ) -> np.ndarray:
    """[Q, M, D] host class text embeddings with the content prompts of each of the unit
    ``queries`` [Q, D] (evaluation), ``batch_size`` queries at a time."""
    fn = jax.jit(lambda p, t, q: class_text(towers, p, t, ids, context, q))
    queries = np.asarray(queries, np.float32)
    out = []
    for start in range(0, queries.shape[0], batch_size):
        chunk = queries[start: start + batch_size]
        pad = batch_size - chunk.shape[0]  # one compiled shape for every chunk
        padded = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.float32)])
        out.append(np.asarray(jax.device_get(fn(prompt_params, text_params, padded)))[
            : chunk.shape[0]])
    return np.concatenate(out)
