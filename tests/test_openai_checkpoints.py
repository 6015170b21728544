"""Checkpoint files in OpenAI layout against open_clip, the independent reference: open_clip
models built from config and saved as state dicts, open_clip's wrappers, the paper's release
layout, JIT archives, the export back to OpenAI layout (loaded by open_clip's own OpenAI loader),
the tools, config.model.checkpoint, and the no-pickle rule.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from hf_fixtures import make_tiny_hf_clip, rel_err
from openai_fixtures import build_open_clip, image_features, open_clip, text_features, tokenize

from evclip_jax import EventCLIP, checkpoint_files, convert, openai_clip, text, trainer
from evclip_jax.checkpoint_files import FileOptions
from evclip_jax.config_base import base_config
from evclip_jax.models.towers import Towers

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5
CONTEXT = 16  # build_open_clip's text context length
TEXTS = ["a photo of a tench, Tinca tinca", "The digit 7", "", "hello world! " * 10]


def _pixels(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, size, size, 3)).astype(np.float32)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_params(a: dict, b: dict) -> None:
    flat_a, flat_b = (dict(jax.tree_util.tree_leaves_with_path(t)) for t in (a, b))
    assert flat_a.keys() == flat_b.keys()
    for key, value in flat_a.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat_b[key]), err_msg=str(key))


def _assert_matches(model: EventCLIP, image_ref, text_ref, event_ref=None, seed: int = 0):
    """Image, text (tokenized by open_clip) and event embeddings equal the references'."""
    x = _pixels(seed)
    assert rel_err(model.encode_images(x), image_features(image_ref, x)) <= RTOL
    ids = tokenize(TEXTS, CONTEXT)
    np.testing.assert_array_equal(model.tokenize(TEXTS), ids)
    assert rel_err(model.encode_text(TEXTS), text_features(text_ref, ids)) <= RTOL
    # [B, H, W, 3] event frames are the event tower's input as they are.
    assert rel_err(model.encode_events(x), image_features(event_ref or image_ref, x)) <= RTOL


@pytest.fixture(scope="module")
def reference():
    return build_open_clip(seed=0)


@pytest.fixture(scope="module")
def event_reference():
    """Another CLIP of the same architecture: the trained event encoder of a release file."""
    return build_open_clip(seed=1)


@pytest.fixture(scope="module")
def state_file(reference, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("openai") / "clip.pt"
    torch.save(_state(reference), path)
    return path


@pytest.fixture(scope="module")
def model(state_file) -> EventCLIP:
    return EventCLIP.from_pretrained(state_file)


@pytest.fixture(scope="module")
def release_file(reference, event_reference, tmp_path_factory) -> Path:
    """What the release's trainer saves: its module's state dict under "checkpoint"."""
    path = tmp_path_factory.mktemp("release") / "vitb.pt"
    clip, event = _state(reference), _state(event_reference)
    state = {f"encoder_q.{k}": v for k, v in clip.items()}
    state.update({f"encoder_k.{k}": v for k, v in event.items()})
    state.update({f"foundation_model.{k}": v for k, v in clip.items()})
    optimizer = {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-6}]}
    torch.save({"checkpoint": state, "optimizer": optimizer}, path)
    return path


@pytest.fixture(scope="module")
def release_model(release_file) -> EventCLIP:
    return EventCLIP.from_pretrained(release_file)


# ----------------------------------------------------------------------------- reading


def test_open_clip_state_dict_matches_open_clip(model, reference):
    v, t = model.config.vision, model.config.text
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size,
            v.image_size, v.intermediate_size) == (128, 2, 2, 8, 32, 512)
    assert (t.hidden_size, t.num_attention_heads, t.vocab_size, t.max_position_embeddings,
            t.eos_token_id) == (64, 1, 49408, CONTEXT, 2)
    assert v.hidden_act == t.hidden_act == "quick_gelu" and model.config.projection_dim == 16
    assert float(model.logit_scale) == pytest.approx(reference.logit_scale.item())
    _assert_matches(model, reference, reference)


def test_wrappers_prefixes_and_safetensors_give_the_same_params(model, reference, tmp_path):
    from safetensors.torch import save_file

    state = _state(reference)
    wrapped = tmp_path / "epoch_3.pth"  # open_clip's training checkpoint, saved under DDP
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v
                                                          for k, v in state.items()}}, wrapped)
    single = tmp_path / "open_clip_model.safetensors"
    save_file(state, str(single))
    half = tmp_path / "fp16.bin"  # OpenAI's files hold float16 weights
    torch.save({k: v.half() for k, v in state.items()}, half)
    openai = tmp_path / "openai.pt"  # the attributes OpenAI's JIT models keep in state_dict()
    torch.save({**state, "input_resolution": torch.tensor(32), "context_length":
                torch.tensor(CONTEXT), "vocab_size": torch.tensor(49408)}, openai)
    for path in (wrapped, single, openai):
        _assert_same_params(EventCLIP.from_pretrained(path).params, model.params)
    x = _pixels(1)
    assert rel_err(EventCLIP.from_pretrained(half).encode_images(x),
                   image_features(reference, x)) < 1e-2


def test_release_checkpoint(release_model, reference, event_reference):
    _assert_matches(release_model, reference, reference, event_reference, seed=2)


def test_release_checkpoint_with_the_clip_from_a_second_path(release_file, state_file,
                                                            release_model, tmp_path):
    full = torch.load(release_file, weights_only=True)["checkpoint"]
    event_only = tmp_path / "event_only.pt"
    torch.save({"checkpoint": {k: v for k, v in full.items() if k.startswith("encoder_k.")}},
               event_only)
    with pytest.raises(convert.CheckpointError, match=f"{event_only}.*no encoder_q.*clip_path"):
        EventCLIP.from_pretrained(event_only)
    model = EventCLIP.from_pretrained(event_only, FileOptions(clip_path=str(state_file)))
    _assert_same_params(model.params, release_model.params)  # checked against open_clip above

    other = make_tiny_hf_clip(tmp_path / "other_hf", seed=1)  # another architecture
    with pytest.raises(convert.CheckpointError, match=r"encoder_k\.\): the event tower has"):
        EventCLIP.from_pretrained(event_only, FileOptions(clip_path=str(other)))
    with pytest.raises(convert.CheckpointError, match="applies only to the release"):
        EventCLIP.from_pretrained(state_file, FileOptions(clip_path=str(state_file)))


def test_heads_and_activation_options(tmp_path):
    # open_clip's GELU models (quick_gelu=False) with 32-wide heads: 3 vision, 2 text heads.
    reference = build_open_clip(seed=2, quick_gelu=False, vision={"width": 96, "head_width": 32},
                                text={"heads": 2})
    path = tmp_path / "gelu.pt"
    torch.save(_state(reference), path)
    with pytest.raises(convert.CheckpointError, match=f"{path}: width 96 .*vision_heads"):
        EventCLIP.from_pretrained(path)
    with pytest.raises(convert.CheckpointError, match="vision_heads=5 does not divide"):
        EventCLIP.from_pretrained(path, FileOptions(vision_heads=5))
    with pytest.raises(ValueError, match="activation='relu'"):
        FileOptions(activation="relu")
    right = EventCLIP.from_pretrained(
        path, FileOptions(vision_heads=3, text_heads=2, activation="gelu"))
    assert right.config.text.hidden_act == "gelu"
    assert openai_clip.loader_notes(right.config) == [
        "the vision tower has 3 heads; OpenAI's loader builds 1",
        "the text tower has 2 heads; OpenAI's loader builds 1",
        "the activation is gelu; OpenAI's loader uses quick_gelu (open_clip: quick_gelu=False)"]
    _assert_matches(right, reference, reference)
    # The same options as config fields (config.model.checkpoint_file) for the trainer.
    config = base_config()
    config.model.checkpoint = str(path)
    config.model.checkpoint_file.update(vision_heads=3, text_heads=2, activation="gelu")
    assert trainer.model_config(config) == right.config


def test_jit_archive_needs_the_trust_flag(reference, model, tmp_path):
    path = tmp_path / "ViT-B-32.pt"  # what OpenAI's clip package downloads: TorchScript
    images, ids = torch.zeros(1, 3, 32, 32), torch.from_numpy(tokenize(["a"], CONTEXT))
    torch.jit.save(torch.jit.trace(reference, (images, ids), check_trace=False), path)
    with pytest.raises(convert.CheckpointError, match=f"{path}: a TorchScript.*trust_jit"):
        EventCLIP.from_pretrained(path)
    trusted = EventCLIP.from_pretrained(path, FileOptions(trust_jit=True))
    _assert_same_params(trusted.params, model.params)


# ----------------------------------------------------------------------------- no pickles


class _Exploit:
    """Unpickling it without weights_only would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_plain_state_dicts_load_with_weights_only(reference, tmp_path):
    state = _state(reference)
    marker = tmp_path / "pwned"
    for name, extra in (("exploit.pt", _Exploit(marker)),
                        ("args.pt", argparse.Namespace(lr=1e-6))):
        path = tmp_path / name
        torch.save({"state_dict": state, "args": extra}, path)
        with pytest.raises(convert.CheckpointError, match=rf"{path}: refused by "
                           r"torch\.load\(weights_only=True\)"):
            EventCLIP.from_pretrained(path)
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func), {k.arg: k.value for k in node.keywords}


def test_no_unsafe_loads_in_the_package():
    """No torch.load without weights_only=True, no np.load with allow_pickle=True, no pickle
    loads, and torch.jit.load only behind checkpoint_files' trust flag."""
    files = sorted([*(REPO / "evclip_jax").rglob("*.py"), *(REPO / "tools").glob("*.py")])
    found = {"torch.load": 0, "torch.jit.load": 0}
    for path in files:
        for node, func, kw in _calls(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if func == "torch.load":
                found[func] += 1
                value = kw.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, where
            elif func.endswith("jit.load"):
                found["torch.jit.load"] += 1
                assert path.name == "checkpoint_files.py", where
            elif func in ("np.load", "numpy.load"):
                value = kw.get("allow_pickle")
                assert value is None or (isinstance(value, ast.Constant)
                                         and value.value is False), where
            assert not re.fullmatch(r"(c?[pP]ickle|dill|joblib)\.loads?", func), where
    assert found["torch.load"] >= 2 and found["torch.jit.load"] == 1  # the scan sees them


# ----------------------------------------------------------------------------- bad files


def test_bad_files_name_the_file_and_what_was_expected(reference, tmp_path):
    state = _state(reference)
    cases = {
        "resnet.pt": ({"visual.layer1.0.conv1.weight": torch.zeros(4, 3, 1, 1),
                       **{k: v for k, v in state.items() if not k.startswith("visual.")}},
                      r"missing key 'visual\.conv1\.weight'.*ResNet"),
        "siglip.pt": ({**state, "logit_bias": torch.zeros(1)},
                      r"unexpected key\(s\) \['logit_bias'\]"),
        "no_block.pt": ({k: v for k, v in state.items()
                         if not k.startswith("transformer.resblocks.0.attn.out_proj")},
                        r"missing key\(s\) \['transformer\.resblocks\.0\.attn\.out_proj"),
        "list.pt": ([1, 2], "holds a list; expected a state dict"),
        "pytorch_model.bin": ({"vision_model.embeddings.class_embedding": torch.zeros(4)},
                              "an HF CLIP state dict; give the HF dir"),
        "queue.pt": ({"checkpoint": {"encoder_k.x": torch.zeros(1), "queue": torch.zeros(1)}},
                     r"key 'queue' in a release checkpoint"),
        "nan.pt": ({**state, "ln_final.weight": torch.full_like(state["ln_final.weight"],
                                                                float("nan"))},
                   r"key 'text_tower/text_model/final_layer_norm/scale' holds NaN or infinite"),
    }
    for name, (content, message) in cases.items():
        torch.save(content, tmp_path / name)
        with pytest.raises(convert.CheckpointError, match=f"{tmp_path / name}: .*{message}"):
            EventCLIP.from_pretrained(tmp_path / name)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((tmp_path / "siglip.pt").read_bytes()[:1000])
    with pytest.raises(convert.CheckpointError, match=f"{truncated}: cannot read"):
        EventCLIP.from_pretrained(truncated)
    other = tmp_path / "model.ckpt"
    other.write_bytes(b"x")
    with pytest.raises(convert.CheckpointError, match=r"neither.*\.pt, \.pth, \.bin"):
        EventCLIP.from_pretrained(other)


# ----------------------------------------------------------------------------- export


def _open_clip_from_openai_file(path: Path):
    """open_clip's loader of OpenAI files: the architecture from the shapes, the weights
    loaded strictly (again in float32: its loader casts to float16 first)."""
    state = dict(torch.load(path, weights_only=True))
    loaded = open_clip().model.build_model_from_openai_state_dict(dict(state), cast_dtype=None)
    loaded.float().load_state_dict(state)
    return loaded.eval()


def test_openai_export_reloads_into_open_clip(release_model, reference, event_reference,
                                              tmp_path):
    event_file = release_model.save_pretrained_openai(tmp_path / "event.pt", tower="event")
    event = _open_clip_from_openai_file(event_file)
    x = _pixels(5)
    assert rel_err(image_features(event, x), release_model.encode_events(x)) <= RTOL
    ids = tokenize(TEXTS, CONTEXT)
    assert rel_err(text_features(event, ids), release_model.encode_text(ids)) <= RTOL
    # The state dict is open_clip's own, exactly: the event CLIP's image tower, the CLIP's
    # text tower and logit_scale.
    want = {k: v for k, v in _state(reference).items() if not k.startswith("visual.")}
    want.update({k: v for k, v in _state(event_reference).items() if k.startswith("visual.")})
    assert set(want) == set(event.state_dict())
    for key, value in want.items():
        np.testing.assert_allclose(event.state_dict()[key].numpy(), value.numpy(), rtol=0,
                                   atol=0, err_msg=key)
    image_file = release_model.save_pretrained_openai(tmp_path / "image.safetensors",
                                                      tower="image")
    _assert_same_params(EventCLIP.from_pretrained(image_file).params["image_tower"],
                        release_model.params["image_tower"])
    with pytest.raises(FileExistsError, match="overwrite"):
        release_model.save_pretrained_openai(event_file)


def test_release_export_loads_as_the_release_loads_it(release_model, event_reference, tmp_path):
    out = release_model.save_pretrained_openai(tmp_path / "vitb.pt", layout="release")
    checkpoint = torch.load(out, weights_only=True)["checkpoint"]
    prefixes = {key.split(".", 1)[0] for key in checkpoint}
    assert prefixes == {"encoder_q", "encoder_k", "foundation_model"}
    # The release's README: encoder_k. keys, prefix removed, strictly into a CLIP.
    clip = build_open_clip(seed=9)
    clip.load_state_dict({k.replace("encoder_k.", ""): v for k, v in checkpoint.items()
                          if "encoder_k" in k})
    x = _pixels(6)
    assert rel_err(image_features(clip.eval(), x), image_features(event_reference, x)) <= RTOL
    _assert_same_params(EventCLIP.from_pretrained(out).params, release_model.params)
    with pytest.raises(ValueError, match="ending in .pt, .pth, .bin"):
        release_model.save_pretrained_openai(tmp_path / "x.safetensors", layout="release")


# ----------------------------------------------------------------------------- tools, config


def test_export_tool_writes_openai_layout(release_file, release_model, tmp_path):
    out = tmp_path / "exported.pt"
    run = subprocess.run(
        [sys.executable, "tools/export_to_pytorch.py", "--checkpoint", str(release_file),
         "--out", str(out), "--format", "openai"], cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, "XLA_FLAGS": ""})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == f"loading {release_file} (OpenAI-layout checkpoint file)"
    assert lines[-1].startswith("done: event tower") and "OpenAI-layout CLIP" in lines[-1]
    _assert_same_params(EventCLIP.from_pretrained(out).params["image_tower"],
                        release_model.params["event_tower"])


def test_convert_tool_and_config_accept_files(load_tool, release_file, state_file,
                                              release_model, tmp_path):
    tool = load_tool("convert_hf_clip")
    converted, lines = tmp_path / "evclip", []
    summary = tool.convert_clip(str(release_file), str(converted), log=lines.append)
    assert lines[0] == f"reading {release_file} (OpenAI-layout checkpoint file)"
    assert summary["out"] == str(converted) and any("no tokenizer files" in x for x in lines)
    _, params = convert.load_evclip(converted)
    _assert_same_params(params, release_model.params)
    hf_dir = make_tiny_hf_clip(tmp_path / "hf", seed=0, with_tokenizer=True)
    tool.convert_clip(str(state_file), str(converted), overwrite=True,
                      tokenizer_dir=str(hf_dir), log=lines.append)
    assert (converted / "vocab.json").read_bytes() == (hf_dir / "vocab.json").read_bytes()
    with pytest.raises(convert.CheckpointError, match="--tokenizer_dir: .* holds none of"):
        tool.convert_clip(str(state_file), str(converted), overwrite=True,
                          tokenizer_dir=str(tmp_path), log=lines.append)

    # config.model.checkpoint: the trainer's architecture and its workdir/init.
    config = base_config()
    config.model.checkpoint = str(release_file)
    clip_config = trainer.model_config(config)
    assert clip_config == release_model.config
    assert checkpoint_files.load_file_config(state_file) == clip_config
    init_dir = trainer.write_init_dir(config, tmp_path / "workdir", Towers(clip_config))
    _, params = convert.load_evclip(init_dir)
    _assert_same_params(params, release_model.params)


def test_without_open_clip_the_error_says_how_to_tokenize(release_model, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "open_clip" else real(name, *a))
    text.open_clip_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"this model: no tokenizer files.*open_clip is "
                           r"not installed.*evclip_jax\[openclip\]"):
            release_model.tokenize(["a cat"])
    finally:
        monkeypatch.undo()
        text.open_clip_tokenizer.cache_clear()
    assert release_model.tokenize(["a cat"]).shape == (1, CONTEXT)
