"""Where models live on disk: the one dispatcher for any path a user gives, and the workdir.

A model path is one of:

* an HF CLIP dir (``config.json`` + safetensors / ``pytorch_model.bin``): the event tower is a
  copy of the image tower;
* an evclip checkpoint dir (``evclip.json`` + Orbax ``params/``, written by ``save_evclip``);
* a training workdir: ``init/`` (an evclip dir: the towers the run started from, stored once)
  and ``checkpoints/<step>/`` (Orbax: ``state`` = the trainable params and optimizer state,
  ``data`` = {"step"}). The trained towers of the latest (or a given) step replace the
  starting ones;
* a checkpoint FILE (.pt, .pth, .bin, .safetensors) in OpenAI layout: OpenAI's ``clip``,
  open_clip, or the paper's release (checkpoint_files.py); ``checkpoint_files.FileOptions`` says
  what its shapes do not.

``load_model`` turns any of them into (CLIPConfig, params, tokenizer dir); nothing else in the
package decides what kind of path it was given.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import flax
import jax
import numpy as np

from evclip_jax import checkpoint_files, convert
from evclip_jax.checkpoint_files import FileOptions
from evclip_jax.models.clip import CLIPConfig, Towers

INIT_DIR = "init"
CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "data")
KINDS = {"workdir": "training workdir", "evclip": "evclip checkpoint", "hf": "HF CLIP dir",
         "file": "OpenAI-layout checkpoint file"}
_EXPECTED_KINDS = ("a training workdir (init/ + checkpoints/), an evclip checkpoint dir "
                   "(evclip.json), an HF CLIP dir (config.json) or a checkpoint file ("
                   + ", ".join(checkpoint_files.SUFFIXES) + ")")


def model_kind(path: str | os.PathLike, field: str | None = None) -> str:
    """"workdir", "evclip", "hf" or "file"; CheckpointError naming the path (and the config
    field or flag ``field`` it came from) otherwise."""
    path = Path(path)
    if checkpoint_files.is_checkpoint_file(path):
        return "file"
    if convert.is_evclip_dir(path / INIT_DIR):
        return "workdir"
    if convert.is_evclip_dir(path):
        return "evclip"
    if (path / "config.json").is_file():
        return "hf"
    where = f"{field}: {path}" if field else str(path)
    if not path.exists():
        raise convert.CheckpointError(f"{where} does not exist; expected {_EXPECTED_KINDS}")
    raise convert.CheckpointError(f"{where} is neither a model dir nor a checkpoint file; "
                                  f"expected {_EXPECTED_KINDS}")


def load_model_config(path: str | os.PathLike, field: str | None = None,
                      options: FileOptions | None = None) -> CLIPConfig:
    """The CLIP architecture of any model path, without converting weights."""
    kind = model_kind(path, field)
    if kind == "file":
        options = options or FileOptions()
        clip_config = (load_model_config(options.clip_path, "clip_path", _clip_options(options))
                       if options.clip_path else None)
        return checkpoint_files.load_file_config(path, options, clip_config)
    if kind == "workdir":
        return convert.load_evclip_config(Path(path) / INIT_DIR)
    if kind == "evclip":
        return convert.load_evclip_config(path)
    return convert.load_hf_config(path)


def load_model(path: str | os.PathLike, field: str | None = None, step: int | None = None,
               options: FileOptions | None = None) -> tuple[CLIPConfig, dict, Path | None]:
    """(config, params {image_tower, event_tower, text_tower, logit_scale}, tokenizer dir) of
    any model path; a workdir gives its latest complete (or ``step``) checkpoint. A file has
    no tokenizer dir (None) unless its ``options.clip_path`` has one; ``options`` apply to
    files only."""
    path = Path(path)
    kind = model_kind(path, field)
    if kind == "file":
        options = options or FileOptions()
        clip, tok_dir = None, None
        if options.clip_path:
            clip_config, clip_params, tok_dir = load_model(options.clip_path, "clip_path",
                                                           options=_clip_options(options))
            clip = (clip_config, clip_params)
        config, params = checkpoint_files.load_file(path, options, clip)
        return config, params, tok_dir
    if kind == "hf":
        config, params = convert.load_hf_clip(path)
        return config, params, path
    if kind == "evclip":
        config, params = convert.load_evclip(path)
        return config, params, path
    config, params = convert.load_evclip(path / INIT_DIR)
    trained = restore_trained(path, config, step)
    params.update(trained)
    if "image_tower" in trained and "event_tower" not in trained:
        # A CLIP-objective run trains the image tower; the event tower starts as its copy.
        params["event_tower"] = jax.tree.map(np.copy, trained["image_tower"])
    return config, params, path / INIT_DIR


def _clip_options(options: FileOptions) -> FileOptions:
    """How to read clip_path: as ``options`` say, less clip_path itself."""
    return dataclasses.replace(options, clip_path=None)


# ----------------------------------------------------------------------------- the workdir


def is_workdir(path: str | os.PathLike) -> bool:
    return convert.is_evclip_dir(Path(path) / INIT_DIR)


def checkpoint_manager(workdir: str | os.PathLike, *, keep: int | None = None,
                       every_steps: int = 1, async_save: bool = False):
    """The Orbax manager of ``workdir/checkpoints`` (items "state" and "data")."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager((Path(workdir) / CHECKPOINT_DIR).absolute(), options=options,
                                 item_names=ITEMS)


def save_state(mngr, step: int, state, force: bool = False) -> bool:
    import orbax.checkpoint as ocp

    return mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"step": step})),
        force=force)


def restore_state(mngr, step: int, state):
    """(state, data) of ``step`` restored onto ``state``'s shapes and shardings; the stored
    shapes are checked first, and a mismatch names the step dir and key."""
    import orbax.checkpoint as ocp

    where = Path(mngr.directory) / str(step)
    meta = mngr.item_metadata(step)
    tree = getattr(meta, "state", None)
    if tree is not None:
        tree = getattr(tree, "tree", tree)
        convert.check_tree_matches(
            jax.tree.map(lambda m: np.empty(m.shape, np.uint8), tree,
                         is_leaf=lambda x: hasattr(x, "shape")),
            flax.serialization.to_state_dict(state), where)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]


def restore_trained(workdir: str | os.PathLike, config: CLIPConfig, step: int | None = None
                    ) -> dict:
    """The trained params of a workdir's checkpoint, onto one device, whatever mesh saved them:
    the towers it trained and ``logit_scale``, shapes checked against ``config``."""
    workdir = Path(workdir)
    step = latest_step(workdir) if step is None else step
    if step is None:
        raise convert.CheckpointError(f"{workdir / CHECKPOINT_DIR}: no complete checkpoint")
    state_dir = (workdir / CHECKPOINT_DIR / str(step) / "state").absolute()
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with convert.local_checkpointer() as ckptr:
        tree = ckptr.metadata(state_dir)
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                tree, is_leaf=lambda x: hasattr(x, "shape"))
        trained = ckptr.restore(state_dir, abstract)["params"]
    expected = Towers(config).abstract_params()
    keep = [k for k in expected if k in trained]
    convert.check_tree_matches({k: trained[k] for k in keep}, {k: expected[k] for k in keep},
                               state_dir)
    return {k: jax.device_get(trained[k]) for k in keep}


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The latest complete checkpoint step of a workdir (None when it has none)."""
    with checkpoint_manager(workdir) as mngr:
        return mngr.latest_step()
