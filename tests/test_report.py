"""The report writes metrics.json, report.md and valid PNG plots for every plot kind."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from evclip_jax.evaluate.report import flatten_metrics, write_report
from evclip_jax.evaluate.zeroshot import zeroshot_metrics


def _plots_data():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(6, 4))
    labels = rng.integers(0, 6, 50)
    _, zs = zeroshot_metrics(text[labels] + rng.normal(size=(50, 4)), labels, text,
                             return_details=True)
    names = [f"class {i}" for i in zs["class_ids"]]
    return {
        "per_class_accuracy": {"ncaltech101 zero-shot": {
            "class_names": names, "accuracy": zs["per_class_accuracy"]}},
        "confusion_matrix": {
            "ncaltech101": {"class_names": names, "matrix": zs["confusion"]},
            "too_big": {"class_names": [str(i) for i in range(35)],
                        "matrix": np.eye(35, dtype=int)},
        },
        "fewshot": {"nmnist": {"shots": [1, 2, 5], "mean": [0.4, 0.55, 0.7],
                               "std": [0.05, 0.03, 0.01]}},
        "recall_at_k": {"event_to_image": {"ks": np.arange(1, 11),
                                           "recall": np.linspace(0.3, 0.9, 10)}},
        "roc": {"ucf_crime": {"scores": rng.normal(size=40), "labels": np.arange(40) % 2}},
    }


def test_write_report_files(tmp_path):
    metrics = {"ncaltech101": {"zeroshot": {"top1": 0.5, "top5": np.float32(0.75)},
                               "per_class": np.array([0.1, np.nan])},
               "ucf_crime": {"auc": 0.61, "num_instances": 40}}
    flat = write_report(metrics, tmp_path / "out", _plots_data())
    assert flat == {"ncaltech101/zeroshot/top1": 0.5, "ncaltech101/zeroshot/top5": 0.75,
                    "ucf_crime/auc": 0.61, "ucf_crime/num_instances": 40.0}
    assert flat == flatten_metrics(metrics)

    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["ncaltech101"]["zeroshot"]["top5"] == 0.75
    assert saved["ncaltech101"]["per_class"] == [0.1, None]  # NaN -> null (strict JSON)

    report = (tmp_path / "out" / "report.md").read_text()
    for name in flat:
        assert name in report
    referenced = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", report)
    assert sorted(referenced) == sorted([
        "per_class_accuracy_ncaltech101_zero-shot.png", "confusion_matrix_ncaltech101.png",
        "fewshot_nmnist.png", "recall_at_k_event_to_image.png", "roc_ucf_crime.png"])
    assert "too_big: confusion matrix 35x35 not drawn" in report
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(referenced)
    for name in referenced:
        path = tmp_path / "out" / name
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size[0] > 100 and image.size[1] > 100
            image.verify()


def test_write_report_without_plots_and_bad_kind(tmp_path):
    flat = write_report({"top1": 1.0}, tmp_path)
    assert flat == {"top1": 1.0}
    assert (tmp_path / "report.md").exists() and not list(tmp_path.glob("*.png"))
    with pytest.raises(ValueError, match="unknown plot kinds"):
        write_report({}, tmp_path, {"histogram": {}})
