"""Where models live on disk: the one dispatcher for any path a user gives, and the workdir.

A model path is one of:

* an HF CLIP dir (``config.json`` + safetensors / ``pytorch_model.bin``): the event tower is a
  copy of the image tower;
* an evclip checkpoint dir (``evclip.json`` + Orbax ``params/``, written by ``save_evclip``);
* a training workdir: ``init/`` (an evclip dir: the towers the run started from, stored once)
  and ``checkpoints/<step>/`` (Orbax: ``state`` = the trainable params and optimizer state,
  ``data`` = {"step", "train"}). The trained towers of the latest (or a given) step replace the
  starting ones;
* a checkpoint FILE (.pt, .pth, .bin, .safetensors) in OpenAI layout: OpenAI's ``clip``,
  open_clip, or the paper's release (checkpoint_files.py); ``checkpoint_files.FileOptions`` says
  what its shapes do not.

``load_model`` turns any of them into (CLIPConfig, params, tokenizer dir); nothing else in the
package decides what kind of path it was given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

import flax
import jax
import numpy as np

from evclip_jax import checkpoint_files, convert
from evclip_jax.checkpoint_files import FileOptions
from evclip_jax.models.clip import CLIPConfig
from evclip_jax.models.towers import Towers

INIT_DIR = "init"
CHECKPOINT_DIR = "checkpoints"
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


class CheckpointSaveError(RuntimeError):
    """Writing a step checkpoint failed (a full disk, a lost mount); the complete ones written
    before it are untouched."""


def checkpoint_manager(workdir: str | os.PathLike, *, keep: int | None = None,
                       every_steps: int = 1, async_save: bool = False):
    """The Orbax manager of ``workdir/checkpoints``: items "state" (the TrainState) and "data"
    ({"step", "train": the last logged training metrics}). The item handlers are given, so the
    stored shapes can be read (``item_metadata``) and checked before a restore."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps,
        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(
        (Path(workdir) / CHECKPOINT_DIR).absolute(), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})


def save_state(mngr, step: int, state, train: dict | None = None) -> None:
    """Starts saving ``state`` as ``step`` (in the background with async_save). A failure,
    of this save or of an earlier one still running, raises CheckpointSaveError."""
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave({"step": step, "train": train or {}}))
    try:
        mngr.save(step, args=args, force=True)
    except Exception as e:  # Orbax re-raises whatever its writer threads met
        raise _save_failed(mngr, e) from None


def wait_for_saves(mngr) -> None:
    """Blocks until background saves are complete; CheckpointSaveError if one failed."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # as in save_state
        raise _save_failed(mngr, e) from None


def _save_failed(mngr, error: Exception) -> CheckpointSaveError:
    """One line: the step dir that was being written, the cause, the newest complete step."""
    directory = Path(mngr.directory)
    # The step being written: Orbax's message names its temporary dir; else the oldest one.
    named = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(error))
    partial = sorted(int(p.name.split(".")[0]) for p in directory.glob("*.orbax-checkpoint-tmp*"))
    step = named.group(1) if named else (partial[0] if partial else None)
    where = directory / str(step) if step is not None else directory
    text = _first_line(error)
    code = re.search(r"os_error_code='?(\d+)", text)
    cause = f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})" if code else text
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    kept = directory / str(max(steps)) if steps else "none"
    return CheckpointSaveError(f"{where}: saving the checkpoint failed: {cause}. The newest "
                               f"complete checkpoint is {kept}")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _restore_step(mngr, step: int, state):
    """(state, data) of one step, checked: every item present, the stored shapes those of
    ``state`` (the model's), every value finite. CheckpointError naming the step dir and key."""
    import orbax.checkpoint as ocp

    where = Path(mngr.directory) / str(step)
    try:
        meta = mngr.item_metadata(step)
    except Exception as e:  # Orbax raises assorted types for unreadable metadata
        raise convert.CheckpointError(f"{where}: unreadable ({_first_line(e)})") from e
    tree = meta["state"] if meta is not None and "state" in meta.keys() else None
    if tree is None:
        raise convert.CheckpointError(f"{where / 'state'}: missing or unreadable")
    tree = getattr(tree, "tree", tree)
    convert.check_tree_matches(
        jax.tree.map(lambda m: np.empty(m.shape, np.uint8), tree,
                     is_leaf=lambda x: hasattr(x, "shape")),
        flax.serialization.to_state_dict(state), where / "state")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    try:
        out = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # TensorStore and Orbax errors of a truncated or missing file
        raise convert.CheckpointError(f"{where}: cannot be read ({_first_line(e)})") from e
    data = out["data"]
    if not isinstance(data, dict) or "step" not in data:
        raise convert.CheckpointError(f"{where / 'data'}: missing or without 'step'")
    convert.check_finite(flax.serialization.to_state_dict(out["state"]), where / "state")
    return out["state"], data


def restore_latest(mngr, state):
    """(state, data) of the newest checkpoint that restores onto ``state``'s shapes and
    shardings; None when there is none.

    A step that does not restore (truncated file, missing item, shapes of another model,
    non-finite values) is reported with a warning and the previous complete step is tried;
    once one restores, the failed newer ones are moved aside to ``<step>.damaged`` (kept, not
    deleted) so that the resumed run can write those steps again. CheckpointError naming the
    newest step dir and key when no step restores.
    """
    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored = _restore_step(mngr, step, state)
        except convert.CheckpointError as e:
            logging.warning("checkpoint step %d is unusable: %s; trying the previous one",
                            step, e)
            failed.append((step, e))
            continue
        if failed:
            _move_aside(mngr, [s for s, _ in failed])
            logging.warning("resuming from %s, the newest complete checkpoint",
                            Path(mngr.directory) / str(step))
        return restored
    if failed:
        more = f" (and {len(failed) - 1} older step(s))" if len(failed) > 1 else ""
        raise convert.CheckpointError(f"no checkpoint in {mngr.directory} restores: "
                                      f"{failed[0][1]}{more}")
    return None


def _move_aside(mngr, steps: list[int]) -> None:
    """Renames step dirs to ``<step>.damaged`` (process 0), out of Orbax's sight."""
    from jax.experimental import multihost_utils

    directory = Path(mngr.directory)
    if jax.process_index() == 0:
        for step in steps:
            target = directory / f"{step}.damaged"
            n = 1
            while target.exists():
                target, n = directory / f"{step}.damaged{n}", n + 1
            os.rename(directory / str(step), target)
            logging.warning("moved the unusable checkpoint %s aside to %s",
                            directory / str(step), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("evclip_jax: damaged checkpoints moved aside")
    mngr.reload()


def restore_trained(workdir: str | os.PathLike, config: CLIPConfig, step: int | None = None
                    ) -> dict:
    """The trained params of a workdir's checkpoint, onto one device, whatever mesh saved them:
    the towers it trained and ``logit_scale``, shapes checked against ``config``, values
    finite. ``step`` None: the newest step that reads, with a warning for each newer one that
    does not; CheckpointError naming the step dir and key otherwise."""
    workdir = Path(workdir)
    steps = [step] if step is not None else _complete_steps(workdir)[::-1]
    if not steps:
        raise convert.CheckpointError(f"{workdir / CHECKPOINT_DIR}: no complete checkpoint")
    for candidate in steps[:-1]:
        try:
            return _read_trained(workdir / CHECKPOINT_DIR / str(candidate) / "state", config)
        except convert.CheckpointError as e:
            logging.warning("checkpoint step %d is unusable: %s; reading the previous one",
                            candidate, e)
    return _read_trained(workdir / CHECKPOINT_DIR / str(steps[-1]) / "state", config)


def _read_trained(state_dir: Path, config: CLIPConfig) -> dict:
    state_dir = state_dir.absolute()
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with convert.local_checkpointer() as ckptr:
        try:
            tree = ckptr.metadata(state_dir)
        except Exception as e:  # Orbax and TensorStore errors of a damaged dir
            raise convert.CheckpointError(f"{state_dir}: cannot be read ({_first_line(e)})"
                                          ) from e
        tree = getattr(getattr(tree, "item_metadata", tree), "tree", tree)
        if not isinstance(tree, dict):  # Orbax logs why and hands back the step's metadata
            raise convert.CheckpointError(f"{state_dir}: cannot be read (its array metadata "
                                          "is missing or damaged)")
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                tree, is_leaf=lambda x: hasattr(x, "shape"))
        try:
            trained = ckptr.restore(state_dir, abstract)["params"]
        except Exception as e:  # as above
            raise convert.CheckpointError(f"{state_dir}: cannot be read ({_first_line(e)})"
                                          ) from e
    expected = Towers(config).abstract_params()
    keep = [k for k in expected if k in trained]
    convert.check_tree_matches({k: trained[k] for k in keep}, {k: expected[k] for k in keep},
                               state_dir)
    trained = {k: jax.device_get(trained[k]) for k in keep}
    convert.check_finite(trained, state_dir)
    return trained


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The latest complete checkpoint step of a workdir (None when it has none)."""
    steps = _complete_steps(workdir)
    return steps[-1] if steps else None


def _complete_steps(workdir: str | os.PathLike) -> list[int]:
    """The complete checkpoint steps of a workdir, ascending; creates nothing."""
    if not (Path(workdir) / CHECKPOINT_DIR).is_dir():
        return []
    with checkpoint_manager(workdir) as mngr:
        return sorted(mngr.all_steps())
