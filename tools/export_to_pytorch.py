r"""Export a tower of an evclip checkpoint (or HF CLIP dir) as an HF dir that PyTorch loads.

--tower event | image -> ``CLIPVisionModelWithProjection`` (config.json with projection_dim +
model.safetensors): ``transformers.CLIPVisionModelWithProjection.from_pretrained(out)
(pixel_values=x).image_embeds`` equals ``EventCLIP.encode_events`` / ``encode_images`` on the same
input (NCHW there, NHWC here). Event input is the event-tower input ((E - 0.5) * 2, 3 channels).
--tower clip -> ``CLIPModel`` with the image tower as its vision model, plus tokenizer files.
Written to a hidden temp dir beside --out and renamed into place, so a failure leaves nothing.

  python tools/export_to_pytorch.py --checkpoint /ckpt/evclip-l14 --out /ckpt/event-l14-hf \
      --tower event
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from evclip_jax import EventCLIP, checkpoints, convert

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "evclip checkpoint dir (evclip.json) or HF CLIP dir (config.json).")
_OUT = flags.DEFINE_string("out", None, "HF dir to write.")
_TOWER = flags.DEFINE_enum(
    "tower", "event", ["event", "image", "clip"],
    "event|image: CLIPVisionModelWithProjection of that tower; clip: CLIPModel (image + text).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")

_HF_CLASS = {"event": "CLIPVisionModelWithProjection", "image": "CLIPVisionModelWithProjection",
             "clip": "CLIPModel"}


def log_line(line: str) -> None:
    print(line, flush=True)


def num_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def load_model(checkpoint: str) -> EventCLIP:
    """The one place a checkpoint is opened, so every kind EventCLIP reads is exported alike."""
    return EventCLIP.from_pretrained(checkpoint)


def export_tower(checkpoint: str, out: str, tower: str = "event", overwrite: bool = False,
                 log: Callable[[str], None] = log_line) -> dict:
    """Loads ``checkpoint`` and writes ``tower`` as an HF dir; returns a summary dict."""
    start = time.perf_counter()
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite)")
    kind = checkpoints.KINDS[checkpoints.model_kind(checkpoint, "--checkpoint")]
    log(f"loading {checkpoint} ({kind})")
    model = load_model(checkpoint)
    names = ("image_tower", "text_tower", "logit_scale") if tower == "clip" else (f"{tower}_tower",)
    count = sum(num_params(model.params[name]) for name in names)
    v = model.config.vision
    log(f"loaded in {time.perf_counter() - start:.1f} s: vision {v.hidden_size} wide x "
        f"{v.num_hidden_layers} layers, patch {v.patch_size}, image {v.image_size}, "
        f"projection {model.config.projection_dim}; {tower} export has {count:,} params")

    tick = time.perf_counter()
    log(f"writing {tower} -> {out} as {_HF_CLASS[tower]}")
    model.save_pretrained_hf(out, tower=tower, overwrite=overwrite)
    weights = Path(out) / "model.safetensors"
    log(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and config.json "
        f"in {time.perf_counter() - tick:.1f} s")
    return {"tower": tower, "params": count, "hf_class": _HF_CLASS[tower], "out": str(out),
            "seconds": time.perf_counter() - start}


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep Orbax's INFO lines out of the progress
    try:
        s = export_tower(_CHECKPOINT.value, _OUT.value, _TOWER.value, _OVERWRITE.value)
    except (convert.CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {s['tower']} tower ({s['params']:,} params) -> {s['out']} "
          f"({s['hf_class']}) in {s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["checkpoint", "out"])
    app.run(main)
