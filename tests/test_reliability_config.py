"""Settings are refused before any compute, naming the field (issue 11: bad cases 3, 4 and 9,
the settings refused late or unclearly, a config file that does not exist)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evclip_jax import config_base, run_guard, trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "configs"))
import tiny  # noqa: E402

sys.path.pop(0)


def _config(**fields):
    """The tiny test config with dotted ``fields`` set ("data__prompt" for data.prompt)."""
    c = tiny.get_config()
    for name, value in fields.items():
        node, *path = name.split("__")
        target = c
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return c


@pytest.mark.parametrize("fields,named", [
    ({"batch_size": 0}, "config.batch_size=0"),
    ({"batch_size": -8}, "config.batch_size=-8"),
    ({"num_train_steps": -1}, "config.num_train_steps=-1"),
    ({"num_train_steps": 0, "num_epochs": 0}, "config.num_epochs=0"),
    ({"log_every_steps": 0}, "config.log_every_steps=0"),
    ({"checkpoint__every_steps": 0}, "config.checkpoint.every_steps=0"),
    ({"checkpoint__keep": 0}, "config.checkpoint.keep=0"),
    ({"model__dtype": "float8"}, "config.model.dtype='float8'"),
    ({"model__attention_impl": "flash"}, "config.model.attention_impl='flash'"),
    ({"model__attention_impl": "cudnn"}, "config.model.attention_impl='cudnn'"),
    ({"data__prompt": "a photo"}, "config.data.prompt='a photo'"),
    ({"data__caption_templates": ("a {label}", "a sketch")}, "config.data.caption_templates"),
    ({"data__max_bad_fraction": 1.0}, "config.data.max_bad_fraction=1.0"),
    ({"data__stall_timeout_s": 0.0}, "config.data.stall_timeout_s=0.0"),
    ({"loss__kl_temperature": 0.0}, "config.loss.kl_temperature=0.0"),
    ({"loss__zs_weight": -0.1}, "config.loss.zs_weight=-0.1"),
    ({"optim__base_lr": 0.0}, "config.optim.base_lr=0.0"),
    ({"optim__b2": 1.0}, "config.optim.b2=1.0"),
    ({"eval__every_steps": -1}, "config.eval.every_steps=-1"),
    ({"eval__batch_size": 0}, "config.eval.batch_size=0"),
    ({"eval__evals": "zeroshot,retreival"}, "config.eval.evals='zeroshot,retreival'"),
    ({"eval__rank_against": "some"}, "config.eval.rank_against='some'"),
    ({"data__augment__crop_scale": (0.0, 1.0)}, "config.data.augment.crop_scale"),
])
def test_bad_setting_refused_before_anything_is_written(tmp_path, fields, named):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        trainer.train_and_evaluate(_config(**fields), str(workdir))
    assert named in str(err.value)
    assert not workdir.exists()  # refused before the workdir, data or compute


def test_valid_settings_pass_and_zero_steps_mean_epochs():
    config_base.check_fields(config_base.base_config())
    trainer.check_config(_config(num_train_steps=0, num_epochs=2))


def test_trajectory_fields_compared_and_others_free():
    stored = json.loads(json.dumps(config_base.flatten(tiny.get_config())))
    changed = _config(batch_size=4, optim__base_lr=0.1, loss__zs_weight=0.5,
                      data__augment__crop_scale=(0.5, 1.0), model__dtype="bfloat16")
    assert config_base.trajectory_changes(stored, changed) == [
        "batch_size: 8 -> 4", "data.augment.crop_scale: [0.45, 1.0] -> [0.5, 1.0]",
        "loss.zs_weight: 0.1 -> 0.5", "model.dtype: 'float32' -> 'bfloat16'",
        "optim.base_lr: 0.032 -> 0.1"]
    free = _config(data__dir="/elsewhere", checkpoint__keep=9, eval__every_steps=3,
                   log_every_steps=7, data__stall_timeout_s=5.0, mesh__data=2)
    assert config_base.trajectory_changes(stored, free) == []


def test_changed_resume_refused_listing_fields_unless_allowed(tmp_path, caplog):
    """Bad case 9: the config is recorded at the first start; a resume that changes the
    trajectory is refused naming each field, and the record stays the original."""
    run_guard.record_config(tiny.get_config(), tmp_path, resuming=False, allow_change=False)
    record = tmp_path / run_guard.CONFIG_FILE
    original = record.read_text()
    assert json.loads(original)["optim.base_lr"] == 0.032
    changed = _config(batch_size=16, loss__kl_weight=0.0)
    with pytest.raises(run_guard.ConfigChangedError) as err:
        run_guard.record_config(changed, tmp_path, resuming=True, allow_change=False)
    message = str(err.value)
    assert str(record) in message and "--allow_config_change" in message
    assert "batch_size: 8 -> 16" in message and "loss.kl_weight: 1.0 -> 0.0" in message
    assert record.read_text() == original
    # Allowed: logged, and the new settings become the record.
    run_guard.record_config(changed, tmp_path, resuming=True, allow_change=True)
    assert "batch_size: 8 -> 16" in caplog.text
    assert json.loads(record.read_text())["batch_size"] == 16


def test_missing_config_file_named():
    out = subprocess.run([sys.executable, "-m", "evclip_jax.main",
                          "--config=configs/no_such_experiment.py", "--workdir=/tmp/unused"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "--config: configs/no_such_experiment.py does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_url_workdir_refused_before_anything_is_written(tmp_path):
    out = subprocess.run([sys.executable, "-m", "evclip_jax.main",
                          f"--config={REPO}/configs/demo.py", "--workdir=gs://bucket/runs/x"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode != 0
    assert "--workdir=gs://bucket/runs/x: expected a path" in out.stderr
    assert "/gcs/BUCKET" in out.stderr and "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []  # no local "gs:" dir
