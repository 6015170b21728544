"""Conversion between HF CLIP checkpoints and evclip_jax params, both ways.

The Flax parameter tree mirrors the HF state dict, so a key maps by renaming ``layers_3`` to
``layers.3`` and the leaf names (kernel/scale/embedding -> weight), and a value by a transpose:
Dense kernels are [in, out] in Flax and [out, in] in PyTorch; the patch conv is [kh, kw, in, out]
in Flax and [out, in, kh, kw] in PyTorch. Safetensors are read and written with NumPy, so neither
direction needs torch; only ``pytorch_model.bin`` does.

An evclip checkpoint dir holds ``evclip.json`` (the HF CLIP config plus a format tag), ``params/``
(an Orbax checkpoint of {image_tower, event_tower, text_tower, logit_scale}) and, when the
source had one, the tokenizer files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from evclip_jax.models.clip import CLIPConfig
from evclip_jax.models.towers import Towers

EVCLIP_FORMAT = "evclip_jax"
EVCLIP_VERSION = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
# Buffers some HF checkpoints carry that are not parameters.
_IGNORED_KEYS = re.compile(r"(^|\.)position_ids$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its config."""


# ----------------------------------------------------------------------------- key mapping


def _hf_key(path: tuple[str, ...]) -> str:
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path]
    if parts[-1] in ("kernel", "scale", "embedding"):
        parts[-1] = "weight"
    return ".".join(parts)


def _to_hf_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        # Conv [kh, kw, in, out] -> [out, in, kh, kw]; Dense [in, out] -> [out, in].
        return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    return value


def _from_hf_value(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return value


def _flatten(tree: dict) -> dict[tuple[str, ...], object]:
    """{path: leaf}; list positions (Orbax metadata of optimizer states) count as keys too."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in leaves}


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = leaf
    return tree


def _tower_keys(abstract: dict, tower: str) -> dict[str, tuple[tuple[str, ...], tuple]]:
    """HF key -> (Flax path inside the tower, Flax shape) for one tower."""
    return {_hf_key(path): (path, tuple(leaf.shape))
            for path, leaf in _flatten(abstract[tower]).items()}


# ----------------------------------------------------------------------------- reading HF


def _config_errors() -> tuple[type[Exception], ...]:
    """What an invalid CLIP config raises: transformers 5 validates configs through
    huggingface_hub's strict dataclasses, whose errors are not ValueErrors."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # older huggingface_hub (transformers 4)
        return (TypeError, ValueError)
    return (TypeError, ValueError, StrictDataclassError)


def load_hf_config(hf_dir: str | os.PathLike) -> CLIPConfig:
    """Reads ``config.json`` of an HF CLIP dir."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; expected an HF CLIP config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object (an HF CLIP config)")
    if raw.get("model_type", "clip") != "clip" or "vision_config" not in raw:
        raise CheckpointError(
            f"{path}: model_type={raw.get('model_type')!r}; expected a full CLIPModel config "
            "with text_config and vision_config"
        )
    try:
        return CLIPConfig.from_hf_dict(raw)
    except _config_errors() as e:
        raise CheckpointError(f"{path}: {e}") from e


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, read with NumPy (no torch, no pickle), tensor by
    tensor under a progress bar with an ETA (a ViT-L/14 file is about 1.7 GB)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            return {k: f.get_tensor(k) for k in tqdm(
                keys, desc=f"reading {Path(path).name}", unit="tensor", leave=False,
                disable=len(keys) < 2)}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e


def read_hf_state_dict(hf_dir: str | os.PathLike) -> tuple[dict[str, np.ndarray], Path]:
    """The state dict of an HF dir as float32 NumPy arrays, and the file it came from.

    Reads ``model.safetensors``, a sharded ``model.safetensors.index.json``, or (with torch
    installed) ``pytorch_model.bin``.
    """
    hf_dir = Path(hf_dir)
    single = hf_dir / "model.safetensors"
    index = hf_dir / "model.safetensors.index.json"
    torch_bin = hf_dir / "pytorch_model.bin"
    if single.is_file():
        state, source = read_safetensors(single), single
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: expected a JSON object with 'weight_map'") from e
        state, source = {}, index
        for shard in shards:
            state.update(read_safetensors(hf_dir / shard))
    elif torch_bin.is_file():
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(
                f"{torch_bin}: reading pytorch_model.bin needs torch "
                "(pip install 'evclip_jax[torch]'), or convert it to model.safetensors"
            ) from e
        try:
            raw = torch.load(torch_bin, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for a bad pickle
            raise CheckpointError(f"{torch_bin}: cannot read ({e})") from e
        state, source = {k: v.float().numpy() for k, v in raw.items()}, torch_bin
    else:
        raise CheckpointError(
            f"{hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    state = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    check_finite(state, source)
    return state, source


def state_dict_to_params(state: dict[str, np.ndarray], config: CLIPConfig,
                         source: str | os.PathLike = "<state dict>") -> dict:
    """HF CLIPModel state dict -> {image_tower, event_tower, text_tower, logit_scale}.

    Every expected key must be present with the shape the config implies, and no other key may
    be (``position_ids`` buffers aside); the error names the file, the key and both shapes.
    """
    abstract = Towers(config).abstract_params()
    out: dict = {}
    expected_keys: set[str] = {"logit_scale"}
    for tower in ("image_tower", "text_tower"):
        flat = {}
        for key, (path, shape) in _tower_keys(abstract, tower).items():
            expected_keys.add(key)
            if key not in state:
                raise CheckpointError(f"{source}: missing key {key!r} (expected shape {shape})")
            value = _from_hf_value(path, state[key])
            if value.shape != shape:
                hf_shape = _to_hf_value(path, np.empty(shape, np.float32)).shape
                raise CheckpointError(
                    f"{source}: key {key!r} has shape {tuple(state[key].shape)}; the config "
                    f"expects {hf_shape}"
                )
            flat[path] = np.ascontiguousarray(value)
        out[tower] = _unflatten(flat)
    unexpected = sorted(k for k in state if k not in expected_keys and not _IGNORED_KEYS.search(k))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
            " not in the CLIPModel this config describes"
        )
    if "logit_scale" not in state:
        raise CheckpointError(f"{source}: missing key 'logit_scale' (expected shape ())")
    if np.shape(state["logit_scale"]) not in ((), (1,)):
        raise CheckpointError(
            f"{source}: key 'logit_scale' has shape {np.shape(state['logit_scale'])}; expected ()"
        )
    out["logit_scale"] = np.float32(np.reshape(state["logit_scale"], ()))
    # The event tower starts as a copy of the image tower (the method's initialisation).
    out["event_tower"] = jax.tree.map(np.copy, out["image_tower"])
    return out


def load_hf_clip(hf_dir: str | os.PathLike) -> tuple[CLIPConfig, dict]:
    """Config and params of an HF CLIP dir; the event tower is a copy of the image tower."""
    config = load_hf_config(hf_dir)
    state, source = read_hf_state_dict(hf_dir)
    return config, state_dict_to_params(state, config, source)


# ----------------------------------------------------------------------------- writing HF


def params_to_state_dict(params: dict, tower: str = "clip") -> dict[str, np.ndarray]:
    """Params -> HF state dict. ``tower``: "clip" (CLIPModel), "event" or "image"
    (CLIPVisionModelWithProjection: the chosen tower under the vision names)."""
    if tower == "clip":
        towers = ("image_tower", "text_tower")
    elif tower in ("event", "image"):
        towers = (f"{tower}_tower",)
    else:
        raise ValueError(f"tower={tower!r}; expected 'event', 'image' or 'clip'")
    state = {}
    for name in towers:
        for path, leaf in _flatten(params[name]).items():
            state[_hf_key(path)] = np.ascontiguousarray(
                _to_hf_value(path, np.asarray(leaf, dtype=np.float32)))
    if tower == "clip":
        state["logit_scale"] = np.asarray(params["logit_scale"], dtype=np.float32).reshape(())
    return state


def hf_config_dict(config: CLIPConfig, tower: str = "clip") -> dict:
    """``config.json`` content for ``tower`` ("clip" -> CLIPModel, else the vision model)."""
    full = config.to_hf_dict()
    if tower == "clip":
        full["architectures"] = ["CLIPModel"]
        return full
    vision = dict(full["vision_config"])
    vision.update(projection_dim=config.projection_dim, model_type="clip_vision_model",
                  architectures=["CLIPVisionModelWithProjection"])
    return vision


class _AtomicDir:
    """Writes into a hidden temp dir beside ``out_dir`` and renames it into place on success,
    so an error leaves no partial output."""

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not self.overwrite:
            raise FileExistsError(f"{self.out_dir}: exists and is not empty (pass overwrite)")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0700 mode would become the output dir's, unreadable to
        # others sharing the checkpoint; mkdir applies the umask like any other dir.
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self.tmp, self.out_dir)
        return False


def _copy_tokenizer(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def save_hf(params: dict, config: CLIPConfig, out_dir: str | os.PathLike, tower: str = "clip",
            tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Writes an HF dir (config.json + model.safetensors) that transformers loads:
    ``CLIPModel`` for tower="clip", ``CLIPVisionModelWithProjection`` for "event"/"image"."""
    from safetensors.numpy import save_file

    state = params_to_state_dict(params, tower)
    cfg = hf_config_dict(config, tower)
    with _AtomicDir(out_dir, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if tower == "clip":
            _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp)
    return Path(out_dir)


# ----------------------------------------------------------------------------- evclip dirs


def is_evclip_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "evclip.json").is_file()


def local_checkpointer():
    """An Orbax checkpointer of this process alone. Evclip dirs hold host NumPy trees that one
    process writes and each reads; Orbax's default would wait for every process of a
    multi-process run at each save and restore."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def save_evclip(params: dict, config: CLIPConfig, out_dir: str | os.PathLike,
                tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Writes an evclip checkpoint dir: evclip.json + Orbax ``params/`` (+ tokenizer files)."""
    with _AtomicDir(out_dir, overwrite) as tmp:
        meta = {"format": EVCLIP_FORMAT, "version": EVCLIP_VERSION,
                "clip_config": config.to_hf_dict()}
        (tmp / "evclip.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        with local_checkpointer() as ckptr:
            ckptr.save(tmp.absolute() / "params", jax.tree.map(np.asarray, params))
        _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp)
    return Path(out_dir)


def load_evclip_config(path: str | os.PathLike) -> CLIPConfig:
    meta_path = Path(path) / "evclip.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: cannot read ({e})") from e
    if (not isinstance(meta, dict) or meta.get("format") != EVCLIP_FORMAT
            or not isinstance(meta.get("clip_config"), dict)):
        raise CheckpointError(
            f"{meta_path}: expected {{'format': '{EVCLIP_FORMAT}', 'clip_config': ...}}")
    try:
        return CLIPConfig.from_hf_dict(meta["clip_config"])
    except _config_errors() as e:
        raise CheckpointError(f"{meta_path}: {e}") from e


def check_tree_matches(found: dict, expected: dict, source: str | os.PathLike) -> None:
    """Raises CheckpointError naming the first key whose presence or shape differs."""
    f_flat = {"/".join(p): tuple(np.shape(v) if not hasattr(v, "shape") else v.shape)
              for p, v in _flatten(found).items()}
    e_flat = {"/".join(p): tuple(v.shape) for p, v in _flatten(expected).items()}
    for key, shape in e_flat.items():
        if key not in f_flat:
            raise CheckpointError(f"{source}: missing key {key!r} (expected shape {shape})")
        if f_flat[key] != shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {f_flat[key]}; the config expects {shape}")
    extra = sorted(set(f_flat) - set(e_flat))
    if extra:
        raise CheckpointError(f"{source}: unexpected key(s) {extra[:5]}")


def check_finite(tree: dict, source: str | os.PathLike) -> None:
    """Raises CheckpointError naming the first key that holds a NaN or an infinity: a
    damaged checkpoint would otherwise train or evaluate on without a word."""
    flat = _flatten(tree)
    finite = jax.device_get([  # device arrays are checked where they live, then read at once
        np.isfinite(leaf).all() if isinstance(leaf, np.ndarray | np.generic)
        else jax.numpy.isfinite(leaf).all() for leaf in flat.values()])
    for path, ok in zip(flat, finite, strict=True):
        if not ok:
            raise CheckpointError(f"{source}: key {'/'.join(path)!r} holds NaN or infinite "
                                  "values")


def restore_checked(params_dir: str | os.PathLike, abstract: dict) -> dict:
    """Restores an Orbax pytree after checking its stored shapes against ``abstract``."""
    params_dir = Path(params_dir).absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{params_dir}: missing; expected an Orbax checkpoint dir")
    with local_checkpointer() as ckptr:
        try:
            meta = ckptr.metadata(params_dir)
        except Exception as e:  # Orbax raises assorted types for unreadable metadata
            raise CheckpointError(f"{params_dir}: unreadable Orbax checkpoint ({e})") from e
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        check_tree_matches(tree, abstract, params_dir)
        params = ckptr.restore(params_dir, abstract)
    check_finite(params, params_dir)
    return params


def load_evclip(path: str | os.PathLike) -> tuple[CLIPConfig, dict]:
    """Config and params of an evclip checkpoint dir, shapes checked against the config."""
    config = load_evclip_config(path)
    params = restore_checked(Path(path) / "params", Towers(config).abstract_params())
    return config, params
