r"""Convert a CLIP checkpoint to an evclip checkpoint dir (evclip.json + Orbax params/ +
tokenizer files): an HF CLIP dir (--hf_dir: config.json + model.safetensors / pytorch_model.bin)
or a checkpoint FILE in OpenAI layout (--file: .pt/.pth/.bin/.safetensors from OpenAI's clip,
open_clip, or the paper's release).

The event tower starts as a copy of the image tower (the method's initialisation), except for a
release file, whose event tower is its trained encoder_k. and whose image and text towers are
its encoder_q.'s, or those of --clip (the matching CLIP, a file or an HF dir). A file's
architecture is read from its shapes; --vision_heads/--text_heads (default width / 64) and
--activation (default quick_gelu) say what shapes do not. TorchScript archives (OpenAI's JIT
models) run code when loaded and are read only with --trust_jit. Every key and shape is checked;
a bad checkpoint prints the file and key and exits 1. Output is written to a hidden temp dir
beside --out and renamed into place, so a failure leaves no partial dir. A ViT-L/14 (1.7 GB
model.safetensors) takes 35-55 s on 2 shared CPU cores and writes 2.7 GB (the event tower is
stored beside the image tower).

  python tools/convert_hf_clip.py --hf_dir /ckpt/clip-vit-large-patch14 --out /ckpt/evclip-l14
  python tools/convert_hf_clip.py --file /ckpt/vitb.pt --clip /ckpt/clip-vit-base-patch32 \
      --out /ckpt/release-b32
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from evclip_jax import checkpoints, convert
from evclip_jax.checkpoint_files import FileOptions
from evclip_jax.models.clip import CLIPConfig

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HF CLIPModel dir (config.json + weights).")
_FILE = flags.DEFINE_string(
    "file", None, "Checkpoint file in OpenAI layout (.pt, .pth, .bin, .safetensors): OpenAI "
    "clip, open_clip, or the paper's release ({'checkpoint': {'encoder_k.…': …}}).")
_CLIP = flags.DEFINE_string(
    "clip", None, "--file is a release checkpoint: the matching CLIP (OpenAI-layout file or HF "
    "dir) for the image and text towers, instead of its encoder_q.")
_TOKENIZER_DIR = flags.DEFINE_string(
    "tokenizer_dir", None, "Dir whose tokenizer files (vocab.json + merges.txt or "
    "tokenizer.json) to copy; default: --hf_dir, or --clip when it is an HF dir.")
_VISION_HEADS = flags.DEFINE_integer("vision_heads", None, "--file: vision heads (width / 64).")
_TEXT_HEADS = flags.DEFINE_integer("text_heads", None, "--file: text heads (width / 64).")
_ACTIVATION = flags.DEFINE_enum(
    "activation", "quick_gelu", ["quick_gelu", "gelu"],
    "--file: MLP activation; quick_gelu for OpenAI weights, gelu for open_clip's GELU models.")
_TRUST_JIT = flags.DEFINE_bool(
    "trust_jit", False, "--file may be a TorchScript archive; loading one runs its code.")
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


def log_config(config: CLIPConfig, log: Callable[[str], None]) -> None:
    v, t = config.vision, config.text
    log(f"config: vision {v.hidden_size} wide x {v.num_hidden_layers} layers, "
        f"{v.num_attention_heads} heads, patch {v.patch_size}, image {v.image_size}; text "
        f"{t.hidden_size} wide x {t.num_hidden_layers} layers, {t.num_attention_heads} heads; "
        f"{v.hidden_act}; projection {config.projection_dim}")


def read_hf_dir(hf_path: Path, log: Callable[[str], None]) -> tuple[CLIPConfig, dict]:
    """The steps of ``convert.load_hf_clip``, split so the progress lines can say how long
    each took."""
    start = time.perf_counter()
    config = convert.load_hf_config(hf_path)
    log_config(config, log)
    state, source = convert.read_hf_state_dict(hf_path)
    # A sharded checkpoint's source is its index; its size is that of the shards.
    size = (sum(dir_size(f) for f in hf_path.glob("*.safetensors"))
            if source.name.endswith(".index.json") else dir_size(source))
    log(f"read {source} ({human_bytes(size)}, {len(state)} tensors) "
        f"in {time.perf_counter() - start:.1f} s")
    tick = time.perf_counter()
    params = convert.state_dict_to_params(state, config, source)
    log(f"converted to Flax params in {time.perf_counter() - tick:.1f} s")
    return config, params


def convert_clip(source: str, out: str, overwrite: bool = False,
                 options: FileOptions | None = None, tokenizer_dir: str | None = None,
                 log: Callable[[str], None] = log_line) -> dict:
    """HF CLIP dir or checkpoint file -> evclip checkpoint dir, logging each step; returns a
    summary dict. ``options``: how to read a file (checkpoint_files.FileOptions)."""
    start = time.perf_counter()
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite)")
    kind = checkpoints.model_kind(source)
    if kind not in ("hf", "file"):
        raise convert.CheckpointError(f"{source}: a {checkpoints.KINDS[kind]}; expected an HF "
                                      "CLIP dir or a checkpoint file")
    log(f"reading {source} ({checkpoints.KINDS[kind]})")
    if kind == "hf":
        config, params = read_hf_dir(Path(source), log)
        tok_dir = Path(source)
    else:
        config, params, tok_dir = checkpoints.load_model(source, options=options)
        log_config(config, log)
        log(f"read and converted {human_bytes(dir_size(source))} in "
            f"{time.perf_counter() - start:.1f} s")
    if tokenizer_dir:
        tok_dir = Path(tokenizer_dir)
        if not any((tok_dir / name).is_file() for name in convert.TOKENIZER_FILES):
            raise convert.CheckpointError(f"--tokenizer_dir: {tok_dir} holds none of "
                                          f"{', '.join(convert.TOKENIZER_FILES)}")
    clip_count = (num_params(params["image_tower"]) + num_params(params["text_tower"])
                  + num_params(params["logit_scale"]))
    event_count = num_params(params["event_tower"])
    log(f"converted: {clip_count:,} CLIP params (image tower "
        f"{num_params(params['image_tower']):,}, text tower "
        f"{num_params(params['text_tower']):,}) + event tower {event_count:,}")

    tick = time.perf_counter()
    log(f"writing {out}")
    convert.save_evclip(params, config, out, tokenizer_dir=tok_dir, overwrite=overwrite)
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
    if (_HF_DIR.value is None) == (_FILE.value is None):
        raise app.UsageError("give one of --hf_dir (an HF CLIP dir) or --file (a checkpoint file)")
    if _HF_DIR.value and (_CLIP.value or _TRUST_JIT.value or _VISION_HEADS.value
                          or _TEXT_HEADS.value or _ACTIVATION.present):
        raise app.UsageError("--clip, --trust_jit, --vision_heads, --text_heads and --activation "
                             "apply to --file")
    try:
        options = FileOptions(clip_path=_CLIP.value, vision_heads=_VISION_HEADS.value,
                              text_heads=_TEXT_HEADS.value, activation=_ACTIVATION.value,
                              trust_jit=_TRUST_JIT.value)
        s = convert_clip(_HF_DIR.value or _FILE.value, _OUT.value, _OVERWRITE.value, options,
                         _TOKENIZER_DIR.value)
    except (convert.CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {s['params']:,} params (+ {s['event_tower_params']:,} event tower) -> "
          f"{s['out']} in {s['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["out"])
    app.run(main)
