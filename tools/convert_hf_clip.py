r"""Convert an HF CLIP dir (config.json + model.safetensors / pytorch_model.bin) to an evclip
checkpoint dir (evclip.json + Orbax params/ + tokenizer files).

The event tower starts as a copy of the image tower (the method's initialisation). Every key and
shape is checked against config.json; a bad checkpoint prints the file and key and exits 1.
Output is written to a hidden temp dir beside --out and renamed into place, so a failure leaves
no partial dir. A ViT-L/14 (1.7 GB model.safetensors) takes 35-55 s on 2 shared CPU cores
and writes 2.7 GB (the event tower is stored beside the image tower).

  python tools/convert_hf_clip.py --hf_dir /ckpt/clip-vit-large-patch14 --out /ckpt/evclip-l14
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from evclip_jax import convert

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF CLIPModel dir (config.json + weights).")
_OUT = flags.DEFINE_string("out", None, "evclip checkpoint dir to write.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")


def num_params(tree) -> int:
    """Number of scalars in a pytree of arrays."""
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def dir_size(path: str | Path) -> int:
    """Total bytes of the files under ``path`` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def log_line(line: str) -> None:
    print(line, flush=True)


def convert_hf_clip(hf_dir: str, out: str, overwrite: bool = False,
                    log: Callable[[str], None] = log_line) -> dict:
    """HF CLIP dir -> evclip checkpoint dir, logging each step; returns a summary dict.

    The same steps as ``convert.load_hf_clip`` followed by ``convert.save_evclip``, split so the
    progress lines can say how long each took.
    """
    start = time.perf_counter()
    hf_path = Path(hf_dir)
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite)")
    log(f"reading {hf_path}")
    config = convert.load_hf_config(hf_path)
    v, t = config.vision, config.text
    log(f"config: vision {v.hidden_size} wide x {v.num_hidden_layers} layers, patch "
        f"{v.patch_size}, image {v.image_size}; text {t.hidden_size} wide x "
        f"{t.num_hidden_layers} layers; projection {config.projection_dim}")
    state, source = convert.read_hf_state_dict(hf_path)
    # A sharded checkpoint's source is its index; its size is that of the shards.
    size = (sum(dir_size(f) for f in hf_path.glob("*.safetensors"))
            if source.name.endswith(".index.json") else dir_size(source))
    log(f"read {source} ({human_bytes(size)}, {len(state)} tensors) "
        f"in {time.perf_counter() - start:.1f} s")

    tick = time.perf_counter()
    params = convert.state_dict_to_params(state, config, source)
    del state
    clip_count = (num_params(params["image_tower"]) + num_params(params["text_tower"])
                  + num_params(params["logit_scale"]))
    event_count = num_params(params["event_tower"])
    log(f"converted: {clip_count:,} CLIP params (image tower "
        f"{num_params(params['image_tower']):,}, text tower "
        f"{num_params(params['text_tower']):,}) + event tower copy {event_count:,} "
        f"in {time.perf_counter() - tick:.1f} s")

    tick = time.perf_counter()
    log(f"writing {out}")
    convert.save_evclip(params, config, out, tokenizer_dir=hf_path, overwrite=overwrite)
    tokenizer = [name for name in convert.TOKENIZER_FILES if (Path(out) / name).is_file()]
    log(f"wrote {out}: params/ {human_bytes(dir_size(Path(out) / 'params'))}, evclip.json"
        + (f", tokenizer ({', '.join(tokenizer)})" if tokenizer else ", no tokenizer files")
        + f" in {time.perf_counter() - tick:.1f} s")
    return {"params": clip_count, "event_tower_params": event_count, "out": str(out),
            "seconds": time.perf_counter() - start}


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep Orbax's INFO lines out of the progress
    try:
        s = convert_hf_clip(_HF_DIR.value, _OUT.value, _OVERWRITE.value)
    except (convert.CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {s['params']:,} params (+ {s['event_tower_params']:,} event tower) -> "
          f"{s['out']} in {s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["hf_dir", "out"])
    app.run(main)
