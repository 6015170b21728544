"""open_clip as the reference for OpenAI-layout checkpoints, without torchvision.

open_clip's package ``__init__`` imports torchvision for its image transforms, and its
``utils.py`` imports ``torchvision.ops.misc.FrozenBatchNorm2d`` (used only to freeze ResNet
batch norms). torchvision has no build for our CPU torch, and the ViT CLIP code that builds,
runs and loads the models (``open_clip.model``, ``open_clip.transformer``,
``open_clip.tokenizer``) never calls it. So the installed package is imported under a private
name without running its ``__init__``, with a placeholder ``torchvision.ops.misc`` present only
while its modules import; the placeholder raises if anything ever uses it. The computation is
open_clip's own, unmodified.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

import numpy as np

PACKAGE = "_open_clip_reference"


class _NoFrozenBatchNorm2d:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision's FrozenBatchNorm2d is not available here")


@functools.cache
def open_clip() -> types.SimpleNamespace:
    """open_clip's ``model`` and ``tokenizer`` modules (the installed package)."""
    # transformers (imported by open_clip.hf_model) asks whether torchvision exists; import it
    # first so it never sees the placeholder.
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401
    from transformers.modeling_outputs import BaseModelOutput  # noqa: F401

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("open_clip is not installed; run tools/setup.sh")
    location = next(iter(spec.submodule_search_locations))
    package_spec = importlib.util.spec_from_file_location(
        PACKAGE, f"{location}/__init__.py", submodule_search_locations=[location])
    sys.modules[PACKAGE] = importlib.util.module_from_spec(package_spec)
    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    placeholder = {name: types.ModuleType(name) for name in names}
    placeholder["torchvision.ops.misc"].FrozenBatchNorm2d = _NoFrozenBatchNorm2d
    if importlib.util.find_spec("torchvision") is None:
        sys.modules.update(placeholder)
    try:
        model = importlib.import_module(f"{PACKAGE}.model")
        tokenizer = importlib.import_module(f"{PACKAGE}.tokenizer")
    finally:
        for name in names:
            if sys.modules.get(name) is placeholder[name]:
                del sys.modules[name]
    return types.SimpleNamespace(model=model, tokenizer=tokenizer)


def build_open_clip(seed: int, embed_dim: int = 16, quick_gelu: bool = True,
                    vision: dict | None = None, text: dict | None = None):
    """A random open_clip ``CLIP`` built from config, float32, eval mode, with every parameter
    but logit_scale perturbed (open_clip starts biases at 0 and LayerNorms at (1, 0), which
    would hide a dropped or swapped bias or norm)."""
    import torch

    oc = open_clip().model
    torch.manual_seed(seed)
    vision_cfg = oc.CLIPVisionCfg(**{"layers": 2, "width": 128, "patch_size": 8,
                                     "image_size": 32, **(vision or {})})
    text_cfg = oc.CLIPTextCfg(**{"layers": 2, "width": 64, "heads": 1, "context_length": 16,
                                 **(text or {})})
    model = oc.CLIP(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "logit_scale":
                p.add_(torch.randn_like(p) * 0.02)
    return model


def tokenize(texts: list[str], context_length: int) -> np.ndarray:
    """open_clip's tokenizer."""
    return open_clip().tokenizer.SimpleTokenizer()(texts, context_length=context_length).numpy()


def image_features(model, pixels_nhwc: np.ndarray) -> np.ndarray:
    """open_clip ``encode_image`` of NHWC input (transposed to NCHW for torch)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(np.asarray(pixels_nhwc, np.float32)
                                              .transpose(0, 3, 1, 2)))
    with torch.no_grad():
        return model.encode_image(x).numpy()


def text_features(model, ids: np.ndarray) -> np.ndarray:
    """open_clip ``encode_text`` of token ids [B, L]."""
    import torch

    with torch.no_grad():
        return model.encode_text(torch.from_numpy(np.asarray(ids, np.int64))).numpy()
