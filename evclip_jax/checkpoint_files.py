"""Checkpoint FILES (.pt, .pth, .bin, .safetensors) in OpenAI layout: read without running
pickled code, turned into evclip params, and written back (openai_clip holds the layout).

Reading runs no pickled code: ``torch.load(weights_only=True)`` for pickled state dicts, NumPy for
safetensors, and a TorchScript archive (OpenAI ``clip``'s JIT models) only when the caller says it
trusts the file. open_clip's ``{"state_dict": ...}`` wrappers, DDP's ``module.`` prefixes and the
paper's release (``{"checkpoint": {"encoder_k.…", "encoder_q.…", ...}}``) are unwrapped.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from evclip_jax import convert, openai_clip
from evclip_jax.convert import CheckpointError
from evclip_jax.models.clip import CLIPConfig
from evclip_jax.openai_clip import EVENT_PREFIX, IMAGE_PREFIX

SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclasses.dataclass(frozen=True)
class FileOptions:
    """What the shapes of an OpenAI-layout file do not say."""

    # Image and text towers for a release file without encoder_q. keys (an OpenAI-layout file
    # or an HF CLIP / evclip dir); the event tower stays encoder_k.'s.
    clip_path: str | None = None
    # Attention heads; None: OpenAI's width // 64. open_clip models with another head width
    # (e.g. ViT-H/14's vision tower: 1280 wide, 16 heads) need them.
    vision_heads: int | None = None
    text_heads: int | None = None
    # OpenAI trained with quick_gelu; open_clip models named without "-quickgelu" use "gelu".
    activation: str = "quick_gelu"
    # A TorchScript archive runs its code when loaded: only for a file the user trusts.
    trust_jit: bool = False

    def __post_init__(self):
        if self.activation not in openai_clip.ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; expected one of "
                             f"{openai_clip.ACTIVATIONS}")
        for name in ("vision_heads", "text_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}; expected a positive number of heads or None")


def options_from_config(section) -> FileOptions:
    """FileOptions of a config section (``config.model.checkpoint_file``); "" and 0 mean unset."""
    return FileOptions(clip_path=section.clip_path or None,
                       vision_heads=section.vision_heads or None,
                       text_heads=section.text_heads or None,
                       activation=section.activation, trust_jit=bool(section.trust_jit))


# ----------------------------------------------------------------------------- reading files


def is_checkpoint_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in SUFFIXES


def read_file(path: str | os.PathLike, trust_jit: bool = False) -> dict[str, Any]:
    """The tensors of a checkpoint file by name, as stored (torch tensors or NumPy arrays).

    Unwraps open_clip's ``{"state_dict": ...}`` and the release's ``{"checkpoint": ...}`` and
    drops DDP's ``module.`` prefixes.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise CheckpointError(f"{path}: expected a checkpoint file ending in {', '.join(SUFFIXES)}")
    raw = (convert.read_safetensors(path) if path.suffix.lower() == ".safetensors"
           else _torch_load(path, trust_jit))
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(raw).__name__}; expected a state dict (a dict of tensors)")
    for wrapper in ("state_dict", "checkpoint"):
        if isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
            break
    state = {}
    for key, value in raw.items():
        if not hasattr(value, "shape"):
            raise CheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}; expected a state dict of "
                "tensors, at the top level or under 'state_dict' or 'checkpoint'")
        state[key.removeprefix("module.")] = value
    return state


def _torch_load(path: Path, trust_jit: bool):
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"{path}: reading a PyTorch file needs torch (pip install 'evclip_jax[torch]'); or "
            "save its state dict as .safetensors") from e
    is_zip = zipfile.is_zipfile(path)
    if is_zip and _is_torchscript(path):
        if not trust_jit:
            raise CheckpointError(
                f"{path}: a TorchScript (JIT) archive, as OpenAI's clip package ships; loading "
                "one runs its code. Pass trust_jit=True (--trust_jit) only for a file from a "
                "source you trust, or save its state_dict() as a plain file where you trust it")
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as e:  # TorchScript raises assorted types for a bad archive
            raise CheckpointError(f"{path}: cannot load the TorchScript archive ({e})") from e
    try:
        # mmap (zip files only): a tensor is read when converted, so the release's three CLIP
        # copies are never all in memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True), which unpickles only tensors and "
            f"plain containers ({reason}). Re-save its state dict (tensors only) where you trust "
            "the file") from e
    except Exception as e:  # torch raises several unrelated types for a corrupt file
        raise CheckpointError(f"{path}: cannot read as a PyTorch file ({e})") from e


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save archives hold <name>/constants.pkl; torch.save zips do not."""
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


# ----------------------------------------------------------------------------- loading


def _infer_config(state: dict, source: Any, options: FileOptions) -> CLIPConfig:
    return openai_clip.infer_config(state, source, options.vision_heads, options.text_heads,
                                    options.activation)


def _refuse_clip_path(path: Path, options: FileOptions, clip_given: bool) -> None:
    if clip_given:
        raise CheckpointError(
            f"{path}: a CLIP state dict; clip_path={options.clip_path} applies only to the "
            "release's event checkpoints ({'checkpoint': {'encoder_k.…': …}})")


def _image_state(groups: dict[str, dict], path: Path) -> dict:
    """The release's encoder_q. CLIP, whose image and text towers the file provides."""
    if not groups[IMAGE_PREFIX]:
        raise CheckpointError(
            f"{path}: a release checkpoint with {EVENT_PREFIX} keys but no {IMAGE_PREFIX} keys; "
            "give the matching CLIP (an OpenAI-layout file or an HF CLIP dir) as clip_path "
            "(--clip)")
    return groups[IMAGE_PREFIX]


def load_file_config(path: str | os.PathLike, options: FileOptions = FileOptions(),
                     clip_config: CLIPConfig | None = None) -> CLIPConfig:
    """The CLIP architecture of a checkpoint file (``clip_config``: that of clip_path)."""
    path = Path(path)
    state = read_file(path, options.trust_jit)
    groups = openai_clip.release_groups(state, path)
    if groups is None:
        _refuse_clip_path(path, options, clip_config is not None)
        return _infer_config(state, path, options)
    if clip_config is not None:
        return clip_config
    return _infer_config(_image_state(groups, path), f"{path} ({IMAGE_PREFIX})", options)


def load_file(path: str | os.PathLike, options: FileOptions = FileOptions(),
              clip: tuple[CLIPConfig, dict] | None = None) -> tuple[CLIPConfig, dict]:
    """Config and params {image_tower, event_tower, text_tower, logit_scale} of a file.

    A CLIP state dict: the event tower is a copy of the image tower. A release checkpoint: the
    event tower is encoder_k.'s image tower; the other towers and logit_scale are ``clip``'s
    (config and params of ``options.clip_path``) when given, else encoder_q.'s.
    """
    path = Path(path)
    state = read_file(path, options.trust_jit)
    groups = openai_clip.release_groups(state, path)
    if groups is None:
        _refuse_clip_path(path, options, clip is not None)
        config = _infer_config(state, path, options)
        params = openai_clip.to_params(state, config, path)
        convert.check_finite(params, path)  # NaN weights are refused by key, as for a model dir
        return config, params
    if clip is not None:
        (config, params), where = (clip[0], dict(clip[1])), options.clip_path
    else:
        where = f"{path} ({IMAGE_PREFIX})"
        image_state = _image_state(groups, path)
        config = _infer_config(image_state, where, options)
        params = openai_clip.to_params(image_state, config, where)
    event_state, event_where = groups[EVENT_PREFIX], f"{path} ({EVENT_PREFIX})"
    sizes = openai_clip.vision_sizes(event_state, event_where)
    want = {k: getattr(config.vision, k) for k in sizes}
    if sizes != want:
        raise CheckpointError(f"{event_where}: the event tower has {sizes}; the CLIP of {where} "
                              f"has {want}")
    params["event_tower"] = openai_clip.to_params(event_state, config, event_where)["image_tower"]
    convert.check_finite(params, path)
    return config, params


# ----------------------------------------------------------------------------- writing


def save_file(params: dict, config: CLIPConfig, out: str | os.PathLike, tower: str = "event",
              layout: str = "openai", overwrite: bool = False) -> Path:
    """Writes ``out`` (.pt/.pth/.bin with torch, or .safetensors for layout "openai").

    layout "openai": a CLIP state dict whose image tower is ``tower`` ("event", or "image" /
    "clip" for the image tower). layout "release": ``{"checkpoint": release_state_dict}``.
    Written to a temp file beside ``out`` and renamed into place.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES or (layout == "release" and suffix == ".safetensors"):
        allowed = SUFFIXES if layout == "openai" else SUFFIXES[:3]
        raise ValueError(f"{out}: expected a file name ending in {', '.join(allowed)} for "
                         f"layout {layout!r}")
    if layout == "openai":
        if tower not in ("event", "image", "clip"):
            raise ValueError(f"tower={tower!r}; expected 'event', 'image' or 'clip'")
        state = openai_clip.openai_state_dict(
            params, config, "event_tower" if tower == "event" else "image_tower")
    elif layout == "release":
        if tower != "event":
            raise ValueError(f"tower={tower!r}; the release layout holds the event tower "
                             "(tower='event')")
        state = openai_clip.release_state_dict(params, config)
    else:
        raise ValueError(f"layout={layout!r}; expected 'openai' or 'release'")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        if suffix == ".safetensors":
            from safetensors.numpy import save_file as save_safetensors

            save_safetensors(state, str(tmp), metadata={"format": "pt"})
        else:
            import torch

            # np.array copies: torch wants writable arrays, and JAX's are read-only.
            tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
            torch.save({"checkpoint": tensors} if layout == "release" else tensors, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
