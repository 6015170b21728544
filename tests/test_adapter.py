"""The single-layer adapter (adapter.py): both fits recover a known linear map, and it is saved
and loaded with the model's dir.

References: the map that generated the targets, scikit-learn's LinearRegression, and a
held-out nearest-neighbour R@1 computed here in NumPy float64.
"""

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression

from evclip_jax import adapter as adapter_lib
from evclip_jax.config_base import base_config


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def exact_map():
    """600 unit CLIP-space vectors (16-d) mapped exactly into a 24-d space: y = x M + b."""
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((600, 16)))
    m, b = rng.standard_normal((16, 24)), rng.standard_normal(24)
    return x, m, b, x @ m + b


def heldout_r1(adapter, x, y):
    """Share of held-out sources whose nearest target (cosine) is their own pair."""
    sims = unit(adapter(x)) @ unit(y).T
    return float(np.mean(np.argmax(sims, axis=1) == np.arange(len(x))))


def test_lstsq_recovers_an_exact_map(exact_map):
    x, m, b, y = exact_map
    adapter = adapter_lib.fit_lstsq(x[:400], y[:400], bias=True)
    np.testing.assert_allclose(adapter.weight, m, atol=1e-6)
    np.testing.assert_allclose(adapter.bias, b, atol=1e-6)
    assert heldout_r1(adapter, x[400:], y[400:]) >= 0.95
    no_bias = adapter_lib.fit_lstsq(x[:400], x[:400] @ m, bias=False)
    assert no_bias.bias is None
    np.testing.assert_allclose(no_bias.weight, m, atol=1e-6)
    # Inputs are normalised before the map, so a rescaled source maps to the same point.
    np.testing.assert_allclose(adapter(3.0 * x[400:]), y[400:], atol=1e-5)


def test_lstsq_equals_sklearn_on_noisy_pairs():
    rng = np.random.default_rng(1)
    source = rng.standard_normal((200, 8)) * rng.uniform(0.5, 2.0, (200, 1))
    target = source @ rng.standard_normal((8, 5)) + rng.standard_normal((200, 5))
    adapter = adapter_lib.fit_lstsq(source, target, bias=True)
    ref = LinearRegression(fit_intercept=True).fit(unit(source), target)
    np.testing.assert_allclose(adapter.weight, ref.coef_.T, atol=1e-5)
    np.testing.assert_allclose(adapter.bias, ref.intercept_, atol=1e-5)


def test_contrastive_fit_retrieves_the_held_out_pairs(exact_map):
    x, _, _, y = exact_map
    untrained = adapter_lib.fit_contrastive(x[:400], y[:400], steps=1, lr=1e-9, batch_size=128)
    assert heldout_r1(untrained, x[400:], y[400:]) < 0.2  # a random start retrieves by chance
    adapter = adapter_lib.fit_contrastive(x[:400], y[:400], steps=150, batch_size=128, lr=1e-2,
                                          temperature=0.07, seed=0)
    assert adapter.fit == "contrastive" and adapter.weight.shape == (16, 24)
    assert heldout_r1(adapter, x[400:], y[400:]) >= 0.95


def test_adapter_is_saved_and_loaded_with_the_model_dir(exact_map, tmp_path):
    x, _, _, y = exact_map
    model_dir = tmp_path / "evclip"
    model_dir.mkdir()
    config = base_config()
    assert adapter_lib.adapter_for_model(config, model_dir, 16) is None  # none yet
    pairs = tmp_path / "pairs.npz"
    np.savez(pairs, source=x[:400], target=y[:400])
    config.adapter.pairs = str(pairs)
    fitted = adapter_lib.adapter_for_model(config, model_dir, 16)
    assert (model_dir / adapter_lib.ADAPTER_FILE).is_file()
    config.adapter.pairs = ""  # a later run reads it back from the model's dir
    loaded = adapter_lib.adapter_for_model(config, model_dir, 16)
    np.testing.assert_array_equal(loaded.weight, fitted.weight)
    np.testing.assert_array_equal(loaded.bias, fitted.bias)
    assert loaded.fit == "lstsq"
    np.testing.assert_array_equal(loaded(x[400:]), fitted(x[400:]))

    with pytest.raises(ValueError, match="adapter.npz: maps dim 16.*projection dim is 32"):
        adapter_lib.adapter_for_model(config, model_dir, 32)
    config.adapter.pairs = str(pairs)
    with pytest.raises(ValueError, match="pairs.npz: source has dim 16; expected.*32"):
        adapter_lib.adapter_for_model(config, model_dir, 32)


def test_bad_pairs_and_settings_are_refused(tmp_path):
    config = base_config()
    config.adapter.fit = "ridge"
    with pytest.raises(ValueError, match="config.adapter.fit='ridge'"):
        adapter_lib.check_adapter_config(config.adapter)
    config.adapter.fit = "contrastive"
    config.adapter.temperature = 0.0
    with pytest.raises(ValueError, match="config.adapter.temperature=0.0"):
        adapter_lib.check_adapter_config(config.adapter)
    config.adapter.temperature = 0.07
    config.adapter.pairs = str(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="config.adapter.pairs: .*missing.npz not found"):
        adapter_lib.check_adapter_config(config.adapter)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, source=np.ones((4, 3)), other=np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"wrong.npz lacks \['target'\]"):
        adapter_lib.load_pairs(wrong)
    np.savez(wrong, source=np.ones((4, 3)), target=np.ones((5, 2)))
    with pytest.raises(ValueError, match="wrong.npz: expected source .* same n"):
        adapter_lib.load_pairs(wrong)
    with pytest.raises(ValueError, match=r"expected embeddings \[n, 3\]"):
        adapter_lib.fit_lstsq(np.eye(3), np.eye(3))(np.ones((2, 4)))
