"""tools/write_teacher_embeddings.py: each record's teacher_emb is the image tower's embedding of
its paired image (computed here through EventCLIP on the PNG decoded by PIL), every other feature
and the record order are unchanged, training with data.teacher_emb reads the result, and a
failed or refused run leaves the split as it was."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

tf = pytest.importorskip("tensorflow")

from event_fixtures import random_events  # noqa: E402

from evclip_jax import EventCLIP, checkpoints, convert, embed, step  # noqa: E402
from evclip_jax.config_base import base_config  # noqa: E402
from evclip_jax.data import records  # noqa: E402
from evclip_jax.events.io import write_events  # noqa: E402
from evclip_jax.models.clip import CLIPConfig, TowerConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
S = 16
SENSOR = (20, 24)
CLASSES = ["disc", "square", "cross"]
# The tiny model of tests/configs/tiny.py.
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 2, "image_size": S, "patch_size": 8, "projection_dim": 16}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 64, "max_position_embeddings": 8,
        "eos_token_id": 63, "projection_dim": 16}


@pytest.fixture(scope="module")
def tool(load_tool):
    module = load_tool("write_teacher_embeddings")
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny CLIP saved as an evclip checkpoint dir."""
    clip = CLIPConfig(vision=TowerConfig(**VISION), text=TowerConfig(**TEXT), projection_dim=16)
    init = jax.jit(step.make_towers(base_config(), clip).init)
    params = jax.device_get(init(jax.random.key(3)))
    return convert.save_evclip(params, clip, tmp_path_factory.mktemp("model") / "tiny")


def _write_split(root: Path, split: str, n: int, num_shards: int, images: bool = True,
                 seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        write_events(str(root / f"{split}{i}.npz"), random_events(rng, 200, SENSOR))
        image = None
        if images:
            image = str(root / f"{split}{i}.png")
            Image.fromarray(rng.integers(0, 256, (S + 4, S, 3), np.uint8)).save(image)
        items.append(records.PairedItem(str(root / f"{split}{i}.npz"), image, i % 3))
    out = root / "records"
    records.write_tfrecords(items, out, class_names=CLASSES, out_size=S, sensor_size=SENSOR,
                            window_k=100, num_shards=num_shards, split=split, seed=seed,
                            progress=False)
    return out


def _snapshot(data_dir: Path, split: str) -> tuple[dict, dict[str, list[bytes]]]:
    """(manifest, {shard: its serialized records in order})."""
    manifest = json.loads(Path(records.manifest_path(data_dir, split)).read_text())
    shards = {name: [r.numpy() for r in tf.data.TFRecordDataset(str(data_dir / name))]
              for name in manifest["shards"]}
    return manifest, shards


def _features(serialized: bytes) -> dict:
    return dict(tf.train.Example.FromString(serialized).features.feature)


def test_embeddings_written_other_features_kept_and_training_reads_them(tool, model_dir,
                                                                         tmp_path):
    root = tmp_path / "src"
    data_dir = _write_split(root, "train", 11, num_shards=3)
    _write_split(root, "test", 5, num_shards=1, seed=1)
    before = {split: _snapshot(data_dir, split) for split in ("train", "test")}

    # Every split of the folder; 4 images per step, rounded up to the 8 (fake CPU) devices,
    # so that 11 records take a full and a padded batch.
    flags.FLAGS.data_dir, flags.FLAGS.checkpoint = str(data_dir), str(model_dir)
    flags.FLAGS.split, flags.FLAGS.batch_size = [], 4
    tool.main([])

    reference = EventCLIP.from_pretrained(model_dir)
    for split, (old_manifest, old_shards) in before.items():
        manifest, shards = _snapshot(data_dir, split)
        assert manifest == {**old_manifest, "teacher_emb_dim": 16}
        assert list(shards) == list(old_shards)
        old = [r for name in old_shards for r in old_shards[name]]
        new = [r for name in shards for r in shards[name]]
        assert len(new) == len(old) == old_manifest["num_examples"]
        gray, stored = [], []
        for old_record, new_record in zip(old, new, strict=True):
            old_f, new_f = _features(old_record), _features(new_record)
            assert "teacher_emb" not in old_f
            stored.append(np.asarray(new_f.pop("teacher_emb").float_list.value, np.float32))
            assert new_f == old_f
            gray.append(np.asarray(Image.open(io.BytesIO(old_f["image"].bytes_list.value[0]))))
        expected = reference.encode_images(embed.images_to_tower_input(np.stack(gray)))
        np.testing.assert_allclose(np.stack(stored), np.asarray(expected), rtol=1e-5,
                                   atol=1e-6)
    assert not list(data_dir.glob("*.partial"))

    # The trainer reads them: a short run of the tiny config on these records with the model.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu")
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "evclip_jax.main", f"--config={REPO / 'tests/configs/tiny.py'}",
         f"--workdir={workdir}", "--mode=train", f"--config.data.dir={data_dir}",
         "--config.data.synthetic.enabled=False", "--config.data.teacher_emb=True",
         f"--config.model.checkpoint={model_dir}", "--config.num_train_steps=2",
         "--config.checkpoint.every_steps=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    assert (workdir / "checkpoints" / "2").is_dir()


def test_refusals_and_a_failed_run_leave_the_split_unchanged(tool, model_dir, tmp_path):
    clip, params, _ = checkpoints.load_model(model_dir)
    devices = jax.devices()[:2]
    embed_images = tool.make_image_embedder(clip, params["image_tower"], devices)

    events_only = _write_split(tmp_path / "a", "test", 3, num_shards=1, images=False)
    with pytest.raises(ValueError, match=r"test\.manifest\.json: the records have no paired"):
        tool.write_split(str(events_only), "test", embed_images, batch_size=2, image_size=S,
                         progress=False)

    data_dir = _write_split(tmp_path / "b", "train", 7, num_shards=2)
    before = _snapshot(data_dir, "train")
    with pytest.raises(ValueError, match=r"train\.manifest\.json: the records' images are 16 "
                                         r"px; the model's image tower takes 32 px"):
        tool.write_split(str(data_dir), "train", embed_images, batch_size=2, image_size=32,
                         progress=False)

    calls = []

    def fails_on_the_third_batch(gray):
        calls.append(len(gray))
        if len(calls) == 3:  # the second shard's first batch: the first shard is written
            raise RuntimeError("device lost")
        return embed_images(gray)

    with pytest.raises(RuntimeError, match="device lost"):
        tool.write_split(str(data_dir), "train", fails_on_the_third_batch, batch_size=2,
                         image_size=S, progress=False)
    assert calls == [2, 2, 2]
    assert _snapshot(data_dir, "train") == before
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(
        ["train.manifest.json", *before[0]["shards"]])

    with pytest.raises(ValueError, match="--data_dir=.*: no <split>.manifest.json in it"):
        tool.split_names(str(tmp_path))
