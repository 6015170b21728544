"""EventBind's hybrid text prompts (prompts.py, models/eventbind.HybridPrompts): the context
positions, the class texts against HF transformers with the offsets hooked into its token
embeddings, HTCA with per-event class texts against NumPy float64, zero-shot against each
query's own class texts, and the settings refused."""

import dataclasses

import jax
import numpy as np
import pytest
from hf_fixtures import hf_text_features, make_tiny_hf_clip

from evclip_jax import convert, embed, objectives, prompts, step, text, trainer
from evclip_jax.config_base import base_config
from evclip_jax.evaluate.zeroshot import zeroshot_metrics
from evclip_jax.models.clip import TowerConfig
from evclip_jax.models.towers import Towers

TEXT = TowerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=4, vocab_size=64, max_position_embeddings=8,
                   eos_token_id=63, projection_dim=16)
CLASSES = ["disc", "cat", "red square"]


def _randomized(prompt_params, seed):
    """Prompt-learner params moved off their zero init (a trained learner)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(np.shape(x)),
                        jax.device_get(prompt_params))


def _content(prompt_params, cond):
    """NumPy float64 content prompt: Linear, ReLU, Linear."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), prompt_params)
    h = np.maximum(cond @ p["content_net_fc1"]["kernel"] + p["content_net_fc1"]["bias"], 0)
    return h @ p["content_net_fc2"]["kernel"] + p["content_net_fc2"]["bias"]


def test_context_positions_are_the_template_words_before_the_label(tmp_path):
    # The hash tokenizer of random models: no start token, one token per word.
    ids, context = prompts.prompt_inputs("a photo of a {label}.", CLASSES, TEXT)
    assert ids.shape == context.shape == (3, 8)
    assert np.array_equal(context, np.repeat([[1, 1, 1, 1, 0, 0, 0, 0]], 3, axis=0) > 0)
    # A BPE tokenizer: after <|startoftext|>, the tokens of "a photo of a".
    tokenizer = text.load_tokenizer(make_tiny_hf_clip(tmp_path, with_tokenizer=True))
    cfg = dataclasses.replace(TEXT, vocab_size=len(tokenizer), max_position_embeddings=16,
                              eos_token_id=tokenizer.eos_token_id)
    ids, context = prompts.prompt_inputs("a photo of a {label}", CLASSES, cfg, tokenizer)
    prefix = tokenizer("a photo of a")["input_ids"][:-1]  # [start, words...], no end token
    assert np.array_equal(ids[:, : len(prefix)], np.repeat([prefix], 3, axis=0))
    expected = np.zeros_like(context)
    expected[:, 1: len(prefix)] = True
    assert np.array_equal(context, expected)
    with pytest.raises(ValueError, match=r"config.data.prompt='\{label\} here'.*before"):
        prompts.prompt_inputs("{label} here", CLASSES, TEXT)


def test_class_texts_against_hf_transformers(tmp_path):
    """Learned context and content prompts through our frozen text tower equal HF's CLIP text
    model with the same offsets added to its token embeddings (a forward hook); untrained,
    the hybrid prompts are the hand-written ones."""
    import torch
    import transformers

    hf_dir = make_tiny_hf_clip(tmp_path, with_tokenizer=True)
    config, params = convert.load_hf_clip(hf_dir)
    towers = Towers(dataclasses.replace(config, text_prompts="hybrid"))
    tokenizer = text.load_tokenizer(hf_dir)
    ids, context = prompts.prompt_inputs("a photo of a {label}", CLASSES, config.text, tokenizer)
    rng = np.random.default_rng(0)
    cond = embed.l2_normalize_f64(rng.standard_normal((2, config.projection_dim)))
    init = towers.prompts.init(jax.random.key(0), cond.astype(np.float32))["params"]

    handcrafted = np.asarray(embed.class_text_embeddings(towers.text, params["text_tower"], ids))
    for got in (prompts.class_text(towers, init, params["text_tower"], ids, context),
                prompts.class_text(towers, init, params["text_tower"], ids, context,
                                   cond.astype(np.float32))):
        np.testing.assert_allclose(np.asarray(got).reshape(-1, 3, handcrafted.shape[1])[0],
                                   handcrafted, atol=1e-6, rtol=0)  # float32 rounding

    trained = _randomized(init, 1)
    got = np.asarray(prompts.class_text(towers, trained, params["text_tower"], ids, context,
                                        cond.astype(np.float32)))
    model = transformers.CLIPModel.from_pretrained(str(hf_dir)).eval()
    embedding = model.text_model.embeddings.token_embedding
    for n in range(2):
        offsets = np.asarray(trained["context"], np.float64) + _content(trained, cond[n])
        offsets = np.where(context[:, :, None], offsets[None], 0.0)  # [M, L, width]
        hook = embedding.register_forward_hook(
            lambda module, inputs, out, o=offsets: out + torch.from_numpy(o).to(out.dtype))
        reference = embed.l2_normalize_f64(hf_text_features(model, ids))
        hook.remove()
        np.testing.assert_allclose(got[n], reference, atol=2e-5)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # each condition has its own texts


def test_htca_with_each_events_class_texts_against_numpy():
    """The eventbind objective with hybrid prompts: L_ei over the batch plus, per event, L_et
    and L_it against that event's class texts (content prompts from its embedding)."""
    c = base_config()
    c.objective, c.model.allow_random_init = "eventbind", True
    c.model.vision.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 4, "image_size": 16, "patch_size": 8,
                           "projection_dim": 16})
    c.model.text.update(dataclasses.asdict(TEXT))
    c.model.event_encoder, c.model.event_prompts, c.model.text_prompts = "eventbind", 2, "hybrid"
    c.data.representation, c.data.num_frames = "eventbind", 2
    towers = step.make_towers(c, trainer.model_config(c))
    params = jax.device_get(jax.jit(towers.init)(jax.random.key(0)))
    params["text_prompts"] = _randomized(params["text_prompts"], 2)
    objective = objectives.get("eventbind")
    classes = trainer.class_inputs(c, objective, towers, params, None, CLASSES)
    trainable = objectives.initial_trainable(objective, params, c.loss)
    assert set(trainable) == {"event_tower", "logit_scale", "text_prompts"}
    rng = np.random.default_rng(3)
    batch = {"events": rng.standard_normal((6, 2, 16, 16, 3)).astype(np.float32),
             "images": rng.standard_normal((6, 16, 16, 3)).astype(np.float32),
             "labels": np.array([0, 1, 2, 0, 1, 1], np.int32)}
    frozen = {"image_tower": params["image_tower"], "text_tower": params["text_tower"]}
    loss_fn = objectives.make_loss_fn(objective, towers, c.loss)
    loss, terms = jax.jit(loss_fn)(trainable, frozen, classes, batch, 0)

    e = embed.l2_normalize_f64(jax.jit(embed.embed_vision, static_argnums=0)(
        towers.event, params["event_tower"], batch["events"]))
    v = embed.l2_normalize_f64(jax.jit(embed.embed_vision, static_argnums=0)(
        towers.vision, params["image_tower"], batch["images"]))
    t = np.asarray(jax.jit(lambda p, q: prompts.class_text(
        towers, p, params["text_tower"], classes["ids"], classes["context"], q))(
            trainable["text_prompts"], e.astype(np.float32)), np.float64)
    s, y = np.exp(float(trainable["logit_scale"])), batch["labels"]

    def log_softmax(z):
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    rows = np.arange(6)
    l_ei = -(log_softmax(s * e @ v.T)[rows, rows].mean()
             + log_softmax(s * v @ e.T)[rows, rows].mean()) / 2
    cur = log_softmax(s * np.einsum("nd,nmd->nm", e, t))
    ref = log_softmax(s * np.einsum("nd,nmd->nm", v, t))
    l_et = -cur[rows, y].mean()
    l_it = np.mean(np.sum(np.exp(ref) * (ref - cur), axis=1))
    np.testing.assert_allclose(float(loss), l_ei + l_et + l_it, rtol=2e-5)
    np.testing.assert_allclose(float(terms["loss_htca"]), float(loss), rtol=0)


def test_zeroshot_ranks_each_query_against_its_own_class_texts():
    rng = np.random.default_rng(0)
    n, m, d = 40, 5, 8
    emb = rng.standard_normal((n, d))
    texts = rng.standard_normal((n, m, d))
    labels = rng.integers(0, m, n)
    unit = embed.l2_normalize_f64
    scores = np.einsum("nd,nmd->nm", unit(emb), unit(texts))
    metrics = zeroshot_metrics(emb, labels, texts)
    assert metrics["top1"] == np.mean(scores.argmax(axis=1) == labels)
    assert metrics["top5"] == 1.0
    # Held-out classes 1 and 3, ranked against their own prompts only.
    keep = np.isin(labels, [1, 3])
    sub = scores[keep][:, [1, 3]]
    expected = np.mean(np.array([1, 3])[sub.argmax(axis=1)] == labels[keep])
    got = zeroshot_metrics(emb, labels, texts, eval_classes=[1, 3], rank_against="heldout")
    assert got["top1"] == expected and got["num_samples"] == keep.sum()
    with pytest.raises(ValueError, match=r"class_text_emb: expected finite per-sample"):
        zeroshot_metrics(emb, labels, texts[:3])


def test_hybrid_prompts_need_the_eventbind_objective():
    c = base_config()
    c.model.text_prompts = "hybrid"
    with pytest.raises(ValueError, match="model.text_prompts.*objective='eventbind'"):
        trainer.check_config(c)
