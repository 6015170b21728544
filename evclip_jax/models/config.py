"""The sizes of a CLIP model: HF's CLIP{Vision,Text}Config fields (TowerConfig) and both
towers with what an event CLIP adds (CLIPConfig), read from and written to HF config dicts."""

from __future__ import annotations

import dataclasses

import jax

# Activation names used in HF CLIP configs.
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    """Transformer sizes of one tower; the fields and defaults follow HF CLIP{Vision,Text}Config."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    projection_dim: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # Vision only.
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    # Text only.
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; expected one of "
                f"{sorted(ACTIVATIONS)}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Both towers of a CLIP model plus the initial logit scale, and what an event CLIP adds.

    The additions have no field in HF's CLIPModel; the defaults are the paper's model:
    ``event_encoder`` "vit" (the image tower's architecture) or "eventbind" (E-CLIP/EventBind's
    temporal encoder over ``num_frames`` frames with ``event_prompts`` prompt tokens per block,
    models/eventbind.py); ``text_prompts`` "handcrafted" (the class prompts as written) or
    "hybrid" (EventBind's learned context and content prompts, models/eventbind.py).
    """

    vision: TowerConfig
    text: TowerConfig
    projection_dim: int
    logit_scale_init_value: float = 2.6592
    event_encoder: str = "vit"
    num_frames: int = 1
    event_prompts: int = 0
    text_prompts: str = "handcrafted"

    def __post_init__(self):
        if self.event_encoder not in EVENT_ENCODERS:
            raise ValueError(f"event_encoder={self.event_encoder!r}: expected one of "
                             f"{EVENT_ENCODERS}")
        if self.text_prompts not in TEXT_PROMPTS:
            raise ValueError(f"text_prompts={self.text_prompts!r}: expected one of "
                             f"{TEXT_PROMPTS}")
        if self.num_frames < 1 or self.event_prompts < 0:
            raise ValueError(f"num_frames={self.num_frames}, event_prompts="
                             f"{self.event_prompts}: expected >= 1 and >= 0")

    def additions(self) -> dict:
        """The event-CLIP fields that differ from their defaults (evclip.json stores them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name in _ADDITIONS and getattr(self, f.name) != f.default}

    @classmethod
    def from_hf_dict(cls, config: dict) -> CLIPConfig:
        """Builds the config from an HF ``config.json`` dict, with HF's own defaults."""
        import transformers

        hf = transformers.CLIPConfig.from_dict(config)
        fields = {f.name for f in dataclasses.fields(TowerConfig)}

        def tower(sub) -> TowerConfig:
            values = {k: getattr(sub, k) for k in fields if hasattr(sub, k)}
            values["projection_dim"] = hf.projection_dim
            return TowerConfig(**values)

        additions = config.get(ADDITIONS_KEY) or {}
        unknown = sorted(set(additions) - set(_ADDITIONS))
        if unknown:
            raise ValueError(f"{ADDITIONS_KEY}: unknown field(s) {unknown}; expected some of "
                             f"{list(_ADDITIONS)}")
        return cls(
            vision=tower(hf.vision_config),
            text=tower(hf.text_config),
            projection_dim=hf.projection_dim,
            logit_scale_init_value=hf.logit_scale_init_value,
            **additions,
        )

    def to_hf_dict(self) -> dict:
        """The HF ``CLIPConfig`` dict for this model (what ``config.json`` holds); the event-CLIP
        additions that differ from their defaults go under ``ADDITIONS_KEY``."""
        import transformers

        vision_keys = ("hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "layer_norm_eps", "hidden_act", "image_size",
                       "patch_size", "num_channels", "projection_dim")
        text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "layer_norm_eps", "hidden_act", "vocab_size",
                     "max_position_embeddings", "eos_token_id", "projection_dim")
        text = {k: getattr(self.text, k) for k in text_keys}
        if self.text.vocab_size <= 49406:
            # HF's default bos id (49406) lies outside a small test vocabulary.
            text["bos_token_id"] = min(self.text.vocab_size - 1, self.text.eos_token_id)
        hf = transformers.CLIPConfig(
            text_config=text,
            vision_config={k: getattr(self.vision, k) for k in vision_keys},
            projection_dim=self.projection_dim,
            logit_scale_init_value=self.logit_scale_init_value,
        )
        out = hf.to_dict()
        if self.additions():
            out[ADDITIONS_KEY] = self.additions()
        return out


EVENT_ENCODERS = ("vit", "eventbind")
TEXT_PROMPTS = ("handcrafted", "hybrid")
_ADDITIONS = ("event_encoder", "num_frames", "event_prompts", "text_prompts")
# The key of the HF config dict under which CLIPConfig.to_hf_dict stores the additions.
ADDITIONS_KEY = "evclip_additions"
