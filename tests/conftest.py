"""Test session set-up: 8 fake CPU devices for sharding tests, before JAX is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def load_tool():
    """Imports tools/<name>.py in-process; its absl flags are removed again afterwards, so two
    tools that both define e.g. --out can be tested in one session."""
    from absl import flags

    added: list[str] = []

    def load(name: str):
        before = set(flags.FLAGS)
        spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        added.extend(set(flags.FLAGS) - before)
        return module

    yield load
    for name in added:
        delattr(flags.FLAGS, name)
