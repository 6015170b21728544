r"""Export a tower of any model path (EventCLIP.from_pretrained) for PyTorch: as an HF dir, or
as a checkpoint file in OpenAI layout.

--format hf (an HF dir):
--tower event | image -> ``CLIPVisionModelWithProjection`` (config.json with projection_dim +
model.safetensors): ``transformers.CLIPVisionModelWithProjection.from_pretrained(out)
(pixel_values=x).image_embeds`` equals ``EventCLIP.encode_events`` / ``encode_images`` on the same
input (NCHW there, NHWC here). Event input is the event-tower input ((E - 0.5) * 2, 3 channels).
--tower clip -> ``CLIPModel`` with the image tower as its vision model, plus tokenizer files.
--format openai (a .pt/.pth/.bin/.safetensors file): a CLIP state dict in OpenAI layout whose
image tower is --tower (event, or image/clip: the image tower), with the text tower; OpenAI's
clip (``build_model``) and open_clip (``build_model_from_openai_state_dict``) load it.
--format release (a .pt/.pth/.bin file): the paper's release layout, {"checkpoint": encoder_k.
(event tower), encoder_q. and foundation_model. (image tower)}, which the release's code loads.
Written to a temp dir or file beside --out and renamed into place, so a failure leaves nothing.

  python tools/export_to_pytorch.py --checkpoint /ckpt/evclip-l14 --out /ckpt/event-l14-hf \
      --tower event
  python tools/export_to_pytorch.py --checkpoint /runs/vitb32 --format release \
      --out /out/vitb.pt
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from evclip_jax import EventCLIP, checkpoints, convert, openai_clip

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Training workdir, evclip checkpoint dir (evclip.json), HF CLIP dir "
    "(config.json) or OpenAI-layout checkpoint file.")
_OUT = flags.DEFINE_string("out", None, "HF dir (--format hf) or checkpoint file to write.")
_FORMAT = flags.DEFINE_enum(
    "format", "hf", ["hf", "openai", "release"],
    "hf: an HF dir; openai: an OpenAI-layout CLIP state dict file; release: the paper's release "
    "layout (event tower).")
_TOWER = flags.DEFINE_enum(
    "tower", "event", ["event", "image", "clip"],
    "--format hf: event|image: CLIPVisionModelWithProjection of that tower; clip: CLIPModel "
    "(image + text). --format openai: the image tower of the CLIP written (image = clip). "
    "--format release: event.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")

_HF_CLASS = {"event": "CLIPVisionModelWithProjection", "image": "CLIPVisionModelWithProjection",
             "clip": "CLIPModel"}
_FILE_LAYOUT = {"openai": "OpenAI-layout CLIP state dict", "release": "release checkpoint"}


def log_line(line: str) -> None:
    print(line, flush=True)


def num_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def load_model(checkpoint: str) -> EventCLIP:
    """The one place a checkpoint is opened, so every kind EventCLIP reads is exported alike."""
    return EventCLIP.from_pretrained(checkpoint)


def export_tower(checkpoint: str, out: str, tower: str = "event", overwrite: bool = False,
                 log: Callable[[str], None] = log_line, fmt: str = "hf") -> dict:
    """Loads ``checkpoint`` and writes ``tower`` in format ``fmt`` ("hf": an HF dir; "openai" /
    "release": a checkpoint file); returns a summary dict."""
    start = time.perf_counter()
    out_path = Path(out)
    if fmt == "hf" and out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite)")
    if fmt != "hf" and out_path.exists() and not overwrite:
        raise FileExistsError(f"{out}: exists (pass --overwrite)")
    kind = checkpoints.KINDS[checkpoints.model_kind(checkpoint, "--checkpoint")]
    log(f"loading {checkpoint} ({kind})")
    model = load_model(checkpoint)
    if fmt == "hf":
        names = (("image_tower", "text_tower", "logit_scale") if tower == "clip"
                 else (f"{tower}_tower",))
    else:  # a full CLIP with the chosen image tower, or the release's three
        names = ("event_tower" if tower == "event" else "image_tower", "text_tower",
                 "logit_scale")
    count = sum(num_params(model.params[name]) for name in names)
    v = model.config.vision
    log(f"loaded in {time.perf_counter() - start:.1f} s: vision {v.hidden_size} wide x "
        f"{v.num_hidden_layers} layers, patch {v.patch_size}, image {v.image_size}, "
        f"projection {model.config.projection_dim}; {tower} export has {count:,} params")

    tick = time.perf_counter()
    if fmt == "hf":
        log(f"writing {tower} -> {out} as {_HF_CLASS[tower]}")
        model.save_pretrained_hf(out, tower=tower, overwrite=overwrite)
        weights = Path(out) / "model.safetensors"
        log(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and config.json "
            f"in {time.perf_counter() - tick:.1f} s")
        written = _HF_CLASS[tower]
    else:
        for note in openai_clip.loader_notes(model.config):
            log(f"note: {note}")
        log(f"writing {tower} -> {out} as {_FILE_LAYOUT[fmt]}")
        model.save_pretrained_openai(out, tower=tower, layout=fmt, overwrite=overwrite)
        log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB) "
            f"in {time.perf_counter() - tick:.1f} s")
        written = _FILE_LAYOUT[fmt]
    summary = {"tower": tower, "params": count, "written": written, "out": str(out),
               "seconds": time.perf_counter() - start}
    if fmt == "hf":
        summary["hf_class"] = written
    return summary


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep Orbax's INFO lines out of the progress
    try:
        s = export_tower(_CHECKPOINT.value, _OUT.value, _TOWER.value, _OVERWRITE.value,
                         fmt=_FORMAT.value)
    except (convert.CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {s['tower']} tower ({s['params']:,} params) -> {s['out']} "
          f"({s['written']}) in {s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "out"])
    app.run(main)
