"""HF <-> Flax conversion: bit-identical round trips, every source format, bad checkpoints that
must raise CheckpointError naming the file and key, atomic writes, and tools/convert_hf_clip.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from hf_fixtures import make_tiny_hf_clip

from evclip_jax import checkpoints, convert

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_clip(tmp_path_factory.mktemp("hf") / "tiny", seed=3, with_tokenizer=True)


@pytest.fixture
def hf_copy(hf_dir, tmp_path) -> Path:
    """A private copy of the tiny HF dir, for tests that damage it."""
    return Path(shutil.copytree(hf_dir, tmp_path / "copy"))


def _raw_state(hf_dir: Path) -> dict[str, np.ndarray]:
    """The safetensors file as written by transformers, read independently of convert."""
    return safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))


def _assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype == np.float32, key
        assert np.array_equal(a[key], b[key]), key


def _assert_same_tree(a: dict, b: dict) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y))


def _leaves_with_paths(tree: dict) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- round trips


def test_hf_flax_hf_state_dict_is_bit_identical(hf_dir):
    state, source = convert.read_hf_state_dict(hf_dir)
    assert source == hf_dir / "model.safetensors"
    config = convert.load_hf_config(hf_dir)
    params = convert.state_dict_to_params(state, config, source)
    _assert_same_state(convert.params_to_state_dict(params, "clip"), _raw_state(hf_dir))


def test_transposes_follow_the_layouts(hf_dir):
    """Dense [out, in] -> kernel [in, out]; conv [out, in, kh, kw] -> [kh, kw, in, out]."""
    raw = _raw_state(hf_dir)
    _, params = convert.load_hf_clip(hf_dir)
    vision = params["image_tower"]["vision_model"]
    q = vision["encoder"]["layers_1"]["self_attn"]["q_proj"]
    np.testing.assert_array_equal(
        q["kernel"], raw["vision_model.encoder.layers.1.self_attn.q_proj.weight"].T)
    np.testing.assert_array_equal(
        q["bias"], raw["vision_model.encoder.layers.1.self_attn.q_proj.bias"])
    conv = raw["vision_model.embeddings.patch_embedding.weight"]
    kernel = vision["embeddings"]["patch_embedding"]["kernel"]
    for o, i, h, w in [(0, 0, 0, 0), (3, 2, 5, 1), (31, 1, 2, 4)]:
        assert kernel[h, w, i, o] == conv[o, i, h, w]
    np.testing.assert_array_equal(
        params["text_tower"]["text_projection"]["kernel"], raw["text_projection.weight"].T)
    assert params["logit_scale"] == raw["logit_scale"]


def test_event_tower_is_an_independent_copy_of_the_image_tower(hf_dir):
    _, params = convert.load_hf_clip(hf_dir)
    image, event = _leaves_with_paths(params["image_tower"]), \
        _leaves_with_paths(params["event_tower"])
    assert image.keys() == event.keys()
    for key in image:
        assert np.array_equal(image[key], event[key]), key
        assert not np.shares_memory(image[key], event[key]), key


def test_save_hf_clip_round_trip(hf_dir, tmp_path):
    config, params = convert.load_hf_clip(hf_dir)
    out = convert.save_hf(params, config, tmp_path / "out", tower="clip", tokenizer_dir=hf_dir)
    _assert_same_state(_raw_state(out), _raw_state(hf_dir))
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()

    ref = transformers.CLIPModel.from_pretrained(str(hf_dir)).eval()
    ours = transformers.CLIPModel.from_pretrained(str(out)).eval()
    for (k, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    pixels = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 30, 30))).float()
    ids = torch.tensor([[519, 320, 518, 520, 520] + [520] * 7, [519, 66, 64, 339, 520] + [7] * 7])
    with torch.no_grad():
        a, b = ref(input_ids=ids, pixel_values=pixels), ours(input_ids=ids, pixel_values=pixels)
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_pytorch_model_bin_source_loads_the_same_params(hf_dir, tmp_path):
    # transformers 5 only writes safetensors; a pickled state dict is what older releases wrote
    # as pytorch_model.bin (save_pretrained(..., safe_serialization=False)).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(hf_dir / "config.json", bin_dir / "config.json")
    model = transformers.CLIPModel.from_pretrained(str(hf_dir))
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    state, source = convert.read_hf_state_dict(bin_dir)
    assert source == bin_dir / "pytorch_model.bin"
    _assert_same_tree(convert.load_hf_clip(bin_dir)[1], convert.load_hf_clip(hf_dir)[1])


def test_sharded_safetensors_source_loads_the_same_params(hf_dir, tmp_path):
    model = transformers.CLIPModel.from_pretrained(str(hf_dir))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    _assert_same_tree(convert.load_hf_clip(tmp_path / "sharded")[1],
                      convert.load_hf_clip(hf_dir)[1])


def test_position_ids_buffers_are_accepted(hf_copy):
    state = _raw_state(hf_copy)
    state["text_model.embeddings.position_ids"] = np.arange(12, dtype=np.int64)[None]
    state["vision_model.embeddings.position_ids"] = np.arange(26, dtype=np.int64)[None]
    safetensors.numpy.save_file(state, str(hf_copy / "model.safetensors"))
    _, params = convert.load_hf_clip(hf_copy)
    _assert_same_state(convert.params_to_state_dict(params),
                       {k: v for k, v in state.items() if not k.endswith("position_ids")})


def test_evclip_dir_round_trip(hf_dir, tmp_path):
    config, params = convert.load_hf_clip(hf_dir)
    # A trained event tower differs from the image tower; both must survive separately.
    params["event_tower"] = jax.tree.map(lambda x: x + np.float32(0.125), params["event_tower"])
    out = convert.save_evclip(params, config, tmp_path / "ev", tokenizer_dir=hf_dir)
    assert convert.is_evclip_dir(out)
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    config2, params2 = convert.load_evclip(out)
    assert config2 == config
    _assert_same_tree(params2, params)
    assert not np.array_equal(
        params2["event_tower"]["visual_projection"]["kernel"],
        params2["image_tower"]["visual_projection"]["kernel"])
    # checkpoints.load_model dispatches on evclip.json / config.json.
    _assert_same_tree(checkpoints.load_model(out)[1], params)
    _assert_same_tree(checkpoints.load_model(hf_dir)[1], convert.load_hf_clip(hf_dir)[1])


# ----------------------------------------------------------------------------- bad input


def _load_error(path: Path) -> str:
    with pytest.raises(convert.CheckpointError) as info:
        convert.load_hf_clip(path)
    return str(info.value)


def test_truncated_safetensors(hf_copy):
    weights = hf_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert str(weights) in _load_error(hf_copy)


@pytest.mark.parametrize("key", ["text_model.encoder.layers.0.mlp.fc1.bias",
                                 "vision_model.embeddings.class_embedding", "logit_scale"])
def test_missing_key(hf_copy, key):
    state = _raw_state(hf_copy)
    del state[key]
    safetensors.numpy.save_file(state, str(hf_copy / "model.safetensors"))
    message = _load_error(hf_copy)
    assert str(hf_copy / "model.safetensors") in message and repr(key) in message


@pytest.mark.parametrize("key,shape", [
    ("vision_model.encoder.layers.1.self_attn.k_proj.weight", (32, 31)),
    ("text_model.encoder.layers.0.mlp.fc1.weight", (24, 50)),  # stored [in, out] by mistake
    ("vision_model.embeddings.patch_embedding.weight", (32, 108)),  # conv kernel flattened
    ("text_model.embeddings.token_embedding.weight", (520, 24)),
])
def test_wrong_shape(hf_copy, key, shape):
    state = _raw_state(hf_copy)
    expected = state[key].shape
    state[key] = np.zeros(shape, np.float32)
    safetensors.numpy.save_file(state, str(hf_copy / "model.safetensors"))
    message = _load_error(hf_copy)
    assert str(hf_copy / "model.safetensors") in message and repr(key) in message
    assert str(tuple(shape)) in message and str(tuple(expected)) in message


def test_unexpected_extra_key(hf_copy):
    state = _raw_state(hf_copy)
    state["vision_model.extra_head.weight"] = np.zeros((3, 3), np.float32)
    safetensors.numpy.save_file(state, str(hf_copy / "model.safetensors"))
    message = _load_error(hf_copy)
    assert str(hf_copy / "model.safetensors") in message
    assert "vision_model.extra_head.weight" in message


def test_config_that_does_not_match_the_weights(hf_copy):
    config_path = hf_copy / "config.json"
    raw = json.loads(config_path.read_text())
    raw["vision_config"]["hidden_size"] = 48  # still divisible by the 4 heads
    config_path.write_text(json.dumps(raw))
    message = _load_error(hf_copy)
    assert str(hf_copy / "model.safetensors") in message and "vision_model." in message
    assert "(32,)" in message and "(48,)" in message


def test_bad_config_json(hf_copy):
    (hf_copy / "config.json").write_text("{not json")
    assert str(hf_copy / "config.json") in _load_error(hf_copy)
    (hf_copy / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert str(hf_copy / "config.json") in _load_error(hf_copy)
    (hf_copy / "config.json").write_text("[]")
    assert str(hf_copy / "config.json") in _load_error(hf_copy)
    raw = {"model_type": "clip", "text_config": {},
           "vision_config": {"hidden_size": 32, "num_attention_heads": 5}}
    (hf_copy / "config.json").write_text(json.dumps(raw))
    message = _load_error(hf_copy)
    assert str(hf_copy / "config.json") in message and "attention heads" in message


def test_dir_without_weights_or_config(tmp_path):
    with pytest.raises(convert.CheckpointError, match=re.escape(str(tmp_path))):
        checkpoints.load_model(tmp_path)
    shutil.copy(make_tiny_hf_clip(tmp_path / "src") / "config.json", tmp_path / "config.json")
    with pytest.raises(convert.CheckpointError, match="model.safetensors"):
        convert.load_hf_clip(tmp_path)


def test_evclip_params_that_do_not_match_evclip_json(hf_dir, tmp_path):
    config, params = convert.load_hf_clip(hf_dir)
    out = convert.save_evclip(params, config, tmp_path / "ev")
    meta = json.loads((out / "evclip.json").read_text())
    meta["clip_config"]["text_config"]["intermediate_size"] = 51
    (out / "evclip.json").write_text(json.dumps(meta))
    with pytest.raises(convert.CheckpointError) as info:
        convert.load_evclip(out)
    message = str(info.value)
    assert str(out / "params") in message
    assert "text_tower/text_model/encoder/layers_0/mlp/fc1" in message
    assert "51" in message and "50" in message


def test_corrupt_evclip_json(hf_dir, tmp_path):
    config, params = convert.load_hf_clip(hf_dir)
    out = convert.save_evclip(params, config, tmp_path / "ev")
    meta = json.loads((out / "evclip.json").read_text())
    meta["clip_config"]["vision_config"]["num_attention_heads"] = 5  # does not divide 32
    for text in ("[]", "{", json.dumps({"format": "other"}), json.dumps(meta)):
        (out / "evclip.json").write_text(text)
        with pytest.raises(convert.CheckpointError, match=re.escape(str(out / "evclip.json"))):
            convert.load_evclip(out)


# ----------------------------------------------------------------------------- atomic writes


def _leftovers(out: Path) -> list[str]:
    """The out dir and any hidden temp dir the writer left beside it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.lstrip(".").startswith(out.name))


def test_output_dir_has_ordinary_permissions(hf_dir, tmp_path):
    """The temp dir is renamed into place, so its mode must be a normal dir's, not 0700."""
    config, params = convert.load_hf_clip(hf_dir)
    out = convert.save_hf(params, config, tmp_path / "out", tower="image")
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_failed_save_hf_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    config, params = convert.load_hf_clip(hf_dir)
    out = tmp_path / "out"

    def half_written(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        convert.save_hf(params, config, out, tower="clip", tokenizer_dir=hf_dir)
    assert _leftovers(out) == []


def test_save_hf_with_a_missing_tower_leaves_nothing(hf_dir, tmp_path):
    config, params = convert.load_hf_clip(hf_dir)
    del params["text_tower"]
    out = tmp_path / "out"
    with pytest.raises(KeyError, match="text_tower"):
        convert.save_hf(params, config, out, tower="clip")
    assert _leftovers(out) == []


def test_failed_overwrite_keeps_the_old_dir(hf_dir, tmp_path, monkeypatch):
    config, params = convert.load_hf_clip(hf_dir)
    out = convert.save_hf(params, config, tmp_path / "out", tower="image")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        convert.save_hf(params, config, out, tower="image")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", fail)
    with pytest.raises(OSError):
        convert.save_hf(params, config, out, tower="clip", overwrite=True)
    assert _leftovers(out) == ["out"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_failed_save_evclip_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    config, params = convert.load_hf_clip(hf_dir)
    out = tmp_path / "ev"

    def fail(self, directory, *args, **kwargs):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "partial").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        convert.save_evclip(params, config, out, tokenizer_dir=hf_dir)
    assert _leftovers(out) == []


# ----------------------------------------------------------------------------- the tool


def _run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert_hf_clip.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XLA_FLAGS": ""})


def test_convert_tool(hf_dir, tmp_path):
    out = tmp_path / "evclip"
    run = _run_tool("--hf_dir", str(hf_dir), "--out", str(out))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert any(line.startswith("reading") for line in lines)
    assert any(line.startswith("converted") for line in lines)
    assert any(line.startswith("wrote") and " KB" in line for line in lines)
    config, params = convert.load_hf_clip(hf_dir)
    count = sum(np.size(x) for k in ("image_tower", "text_tower", "logit_scale")
                for x in jax.tree.leaves(params[k]))
    assert lines[-1].startswith(f"done: {count:,} params") and str(out) in lines[-1]
    assert lines[-1].rstrip().endswith(" s")

    config2, params2 = convert.load_evclip(out)
    assert config2 == config
    _assert_same_tree(params2, params)
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (hf_dir / name).read_bytes()


def test_convert_tool_errors_exit_1_without_traceback(hf_copy, tmp_path):
    # A config.json that is not JSON fails before transformers is imported: a quick subprocess.
    # The messages for bad weights are those of convert, tested above.
    (hf_copy / "config.json").write_text("{not json")
    run = _run_tool("--hf_dir", str(hf_copy), "--out", str(tmp_path / "evclip"))
    assert run.returncode == 1
    assert "Traceback" not in run.stderr + run.stdout
    assert run.stderr.startswith("error: ") and str(hf_copy / "config.json") in run.stderr
    assert _leftovers(tmp_path / "evclip") == []

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    run = _run_tool("--hf_dir", str(hf_copy), "--out", str(tmp_path / "taken"))
    assert run.returncode == 1 and "--overwrite" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["file"]
