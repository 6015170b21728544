"""The OpenAI CLIP checkpoint layout (OpenAI's ``clip``, open_clip / LAION, the paper's release):
architecture from shapes, and renaming to and from our params.

OpenAI layout (METHOD.md, "Checkpoint layouts users bring") differs from HF's by its names, by one
fused attention input projection (``attn.in_proj_weight`` = [q; k; v]) and by the two output
projections, stored [in, out]. Both directions go through the HF state dict, so one renaming
table serves both and ``convert.state_dict_to_params`` checks every shape. The architecture is
read from the shapes as OpenAI's ``build_model`` reads it. Files are read and written by
``checkpoint_files``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from evclip_jax import convert
from evclip_jax.convert import CheckpointError
from evclip_jax.models.clip import CLIPConfig, TowerConfig

# The release saves {"checkpoint": state dict of its training module}: the trained event encoder
# (encoder_k), the frozen image encoder (encoder_q) and a third frozen copy, each a full CLIP.
EVENT_PREFIX, IMAGE_PREFIX, FOUNDATION_PREFIX = "encoder_k.", "encoder_q.", "foundation_model."
RELEASE_PREFIXES = (EVENT_PREFIX, IMAGE_PREFIX, FOUNDATION_PREFIX)
OPENAI_HEAD_WIDTH = 64  # build_model: heads = width // 64
# HF's marker for OpenAI's pooling rule (the end-of-text token has the largest id: pool at the
# argmax of the ids), which models.clip.TextTransformer follows as well.
ARGMAX_POOLING_EOS_ID = 2
ACTIVATIONS = ("quick_gelu", "gelu")
# Entries that are not parameters: attributes of OpenAI's JIT models (build_model drops them)
# and causal-mask buffers.
_NOT_PARAMS = re.compile(r"^(input_resolution|context_length|vocab_size)$|(^|\.)attn_mask$")

# OpenAI name -> HF name. Vision names sit under "visual." / "vision_model.", text names at the
# top level / under "text_model.", block names under each tower's resblocks / encoder layers.
_VISION = {"conv1.weight": "embeddings.patch_embedding.weight",
           "class_embedding": "embeddings.class_embedding",
           "positional_embedding": "embeddings.position_embedding.weight",
           "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
           "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
_TEXT = {"token_embedding.weight": "embeddings.token_embedding.weight",
         "positional_embedding": "embeddings.position_embedding.weight",
         "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_TOWERS = (("visual.transformer.resblocks", "vision_model.encoder.layers"),
           ("transformer.resblocks", "text_model.encoder.layers"))
# Output projections: [in, out] in OpenAI layout, [out, in] in HF's.
_PROJECTIONS = {"visual.proj": "visual_projection.weight",
                "text_projection": "text_projection.weight"}


def release_groups(state: dict, source: Any) -> dict[str, dict] | None:
    """The release's state dict split by prefix (prefix removed); None for a CLIP state dict."""
    if not any(key.startswith(EVENT_PREFIX) for key in state):
        return None
    groups: dict[str, dict] = {prefix: {} for prefix in RELEASE_PREFIXES}
    for key, value in state.items():
        prefix = next((p for p in RELEASE_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise CheckpointError(f"{source}: key {key!r} in a release checkpoint; expected every "
                                  f"key under one of {RELEASE_PREFIXES}")
        groups[prefix][key[len(prefix):]] = value
    return groups


# ----------------------------------------------------------------------------- architecture


def _shape(state: dict, key: str, source: Any) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(
            f"{source}: missing key {key!r}; expected a ViT CLIP in OpenAI layout (ResNet image "
            "towers and open_clip's timm or HF towers are not supported)")
    return tuple(state[key].shape)


def _layer_count(state: dict, prefix: str) -> int:
    block = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    ids = [int(m.group(1)) for key in state if (m := block.match(key))]
    return max(ids) + 1 if ids else 0


def vision_sizes(state: dict, source: Any) -> dict:
    """The vision tower's sizes, read from shapes as OpenAI's build_model reads them."""
    width, channels, patch, _ = _shape(state, "visual.conv1.weight", source)
    positions = _shape(state, "visual.positional_embedding", source)[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise CheckpointError(f"{source}: visual.positional_embedding has {positions} rows; "
                              "expected a square patch grid plus the class token")
    return dict(hidden_size=width, num_channels=channels, patch_size=patch,
                image_size=patch * grid,
                num_hidden_layers=_layer_count(state, _TOWERS[0][0]),
                intermediate_size=_shape(
                    state, f"{_TOWERS[0][0]}.0.mlp.c_fc.weight", source)[0],
                projection_dim=_shape(state, "visual.proj", source)[1])


def _text_sizes(state: dict, source: Any) -> dict:
    return dict(hidden_size=_shape(state, "ln_final.weight", source)[0],
                vocab_size=_shape(state, "token_embedding.weight", source)[0],
                max_position_embeddings=_shape(state, "positional_embedding", source)[0],
                num_hidden_layers=_layer_count(state, _TOWERS[1][0]),
                intermediate_size=_shape(state, f"{_TOWERS[1][0]}.0.mlp.c_fc.weight", source)[0],
                projection_dim=_shape(state, "text_projection", source)[1])


def _heads(width: int, override: int | None, name: str, source: Any) -> int:
    if override is not None:
        if width % override:
            raise CheckpointError(f"{source}: {name}={override} does not divide the width {width}")
        return override
    if width % OPENAI_HEAD_WIDTH:
        raise CheckpointError(
            f"{source}: width {width} is not a multiple of {OPENAI_HEAD_WIDTH} (OpenAI's head "
            f"size); give {name}, the number of attention heads")
    return width // OPENAI_HEAD_WIDTH


def infer_config(state: dict, source: Any, vision_heads: int | None = None,
                 text_heads: int | None = None, activation: str = "quick_gelu") -> CLIPConfig:
    """The CLIP architecture of an OpenAI-layout state dict: sizes from the shapes, heads
    width // 64 unless given, text pooling at the argmax token id (OpenAI's rule)."""
    if any(key.startswith(("vision_model.", "text_model.")) for key in state):
        raise CheckpointError(f"{source}: an HF CLIP state dict; give the HF dir it belongs to "
                              "(config.json beside the weights)")
    vision, text = vision_sizes(state, source), _text_sizes(state, source)
    if vision["projection_dim"] != text["projection_dim"]:
        raise CheckpointError(
            f"{source}: visual.proj projects to {vision['projection_dim']} and text_projection "
            f"to {text['projection_dim']}; expected one embedding size")
    return CLIPConfig(
        vision=TowerConfig(**vision, hidden_act=activation, num_attention_heads=_heads(
            vision["hidden_size"], vision_heads, "vision_heads", source)),
        text=TowerConfig(**text, hidden_act=activation, eos_token_id=ARGMAX_POOLING_EOS_ID,
                         num_attention_heads=_heads(text["hidden_size"], text_heads,
                                                    "text_heads", source)),
        projection_dim=vision["projection_dim"],
    )


# ----------------------------------------------------------------------------- renaming


def _name_tables(vision_layers: int, text_layers: int
                 ) -> tuple[dict[str, str], dict[str, tuple[str, str, str]]]:
    """OpenAI name -> HF name of each renamed tensor, and of each fused [q; k; v] projection."""
    names = {f"visual.{k}": f"vision_model.{v}" for k, v in _VISION.items()}
    names.update({k: f"text_model.{v}" for k, v in _TEXT.items()})
    names["logit_scale"] = "logit_scale"
    fused = {}
    for (openai, hf), layers in zip(_TOWERS, (vision_layers, text_layers), strict=True):
        for i in range(layers):
            for part, hf_part in _BLOCK.items():
                for leaf in ("weight", "bias"):
                    names[f"{openai}.{i}.{part}.{leaf}"] = f"{hf}.{i}.{hf_part}.{leaf}"
            for leaf in ("weight", "bias"):
                fused[f"{openai}.{i}.attn.in_proj_{leaf}"] = tuple(
                    f"{hf}.{i}.self_attn.{p}_proj.{leaf}" for p in "qkv")
    return names, fused


def _float32(value: Any) -> np.ndarray:
    if not isinstance(value, np.ndarray):  # a torch tensor, possibly float16 / bfloat16
        value = value.detach().float().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def openai_to_hf(state: dict, source: Any) -> dict[str, np.ndarray]:
    """OpenAI-layout CLIP state dict -> HF CLIPModel state dict (float32 NumPy)."""
    names, fused = _name_tables(_layer_count(state, _TOWERS[0][0]),
                                _layer_count(state, _TOWERS[1][0]))
    expected = [*names, *fused, *_PROJECTIONS]
    missing = [key for key in expected if key not in state]
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {missing[:5]}; expected a ViT CLIP in "
                              "OpenAI layout")
    unexpected = sorted(k for k in state if k not in set(expected) and not _NOT_PARAMS.search(k))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            "; expected a ViT CLIP in OpenAI layout (open_clip variants with other blocks, "
            "poolers or projections are not supported)")
    out = {hf: _float32(state[openai]) for openai, hf in names.items()}
    for openai, hf_keys in fused.items():
        value = _float32(state[openai])
        if value.shape[0] % 3:
            raise CheckpointError(f"{source}: key {openai!r} has shape {value.shape}; expected "
                                  "3 x width rows (q, k and v)")
        out.update(zip(hf_keys, np.split(value, 3), strict=True))
    for openai, hf in _PROJECTIONS.items():
        out[hf] = np.ascontiguousarray(_float32(state[openai]).T)
    return out


def hf_to_openai(state: dict[str, np.ndarray], config: CLIPConfig) -> dict[str, np.ndarray]:
    """HF CLIPModel state dict -> OpenAI-layout CLIP state dict."""
    names, fused = _name_tables(config.vision.num_hidden_layers, config.text.num_hidden_layers)
    out = {openai: state[hf] for openai, hf in names.items()}
    out.update({openai: np.concatenate([state[k] for k in hf_keys])
                for openai, hf_keys in fused.items()})
    out.update({openai: np.ascontiguousarray(state[hf].T) for openai, hf in _PROJECTIONS.items()})
    return out


def to_params(state: dict, config: CLIPConfig, source: Any) -> dict:
    return convert.state_dict_to_params(openai_to_hf(state, source), config, source)


# ----------------------------------------------------------------------------- exporting


def openai_state_dict(params: dict, config: CLIPConfig, visual: str = "image_tower"
                      ) -> dict[str, np.ndarray]:
    """An OpenAI-layout CLIP state dict: ``visual`` as its image tower, the text tower and
    logit_scale."""
    clip = {"image_tower": params[visual], "text_tower": params["text_tower"],
            "logit_scale": params["logit_scale"]}
    return hf_to_openai(convert.params_to_state_dict(clip, "clip"), config)


def release_state_dict(params: dict, config: CLIPConfig) -> dict[str, np.ndarray]:
    """The release's "checkpoint" entry: encoder_k. with the event tower, encoder_q. and
    foundation_model. with the image tower, each a full CLIP, so the release's loader (encoder_k.
    keys into a CLIP) and its fine-tuning script (a strict load of all three) both accept it."""
    event = openai_state_dict(params, config, "event_tower")
    image = openai_state_dict(params, config, "image_tower")
    out = {EVENT_PREFIX + k: v for k, v in event.items()}
    for prefix in (IMAGE_PREFIX, FOUNDATION_PREFIX):
        out.update({prefix + k: v for k, v in image.items()})
    return out


def loader_notes(config: CLIPConfig) -> list[str]:
    """Where OpenAI's build_model (and open_clip's loader of OpenAI files) would build this
    model differently: they take width // 64 heads, quick_gelu and argmax text pooling."""
    notes = []
    for name, tower in (("vision", config.vision), ("text", config.text)):
        if tower.num_attention_heads * OPENAI_HEAD_WIDTH != tower.hidden_size:
            notes.append(f"the {name} tower has {tower.num_attention_heads} heads; OpenAI's "
                         f"loader builds {tower.hidden_size // OPENAI_HEAD_WIDTH}")
    if config.vision.hidden_act != "quick_gelu":
        notes.append(f"the activation is {config.vision.hidden_act}; OpenAI's loader uses "
                     "quick_gelu (open_clip: quick_gelu=False)")
    text = config.text
    if text.eos_token_id not in (ARGMAX_POOLING_EOS_ID, text.vocab_size - 1):
        notes.append(f"text pooling is at token id {text.eos_token_id}; OpenAI's loader pools at "
                     "the largest id")
    return notes


