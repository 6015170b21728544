"""The step that tools/bench_train_step.py times is the trainer's step, on the tiny model: two
steps of each give the same losses and params."""

import jax
import numpy as np
from absl import flags

from evclip_jax import objectives, step, trainer


def test_bench_step_equals_trainer_step(load_tool):
    bench = load_tool("bench_train_step")
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # the tool's defaults (batch size of "tiny": 8)
    devices = jax.devices()[:2]
    cfg, s, batch = bench.build_jax_step("tiny", 8, {"model.dtype": "float32"}, devices=devices)

    # The same run set up as the trainer does: random CLIP from the config, class prompts of
    # data.prompt, step.setup.
    config = bench.bench_config(cfg.batch_size)
    tiny = bench.MODELS["tiny"]
    config.model.allow_random_init = True
    config.model.vision.update(tiny["vision"], projection_dim=tiny["projection_dim"])
    config.model.text.update(tiny["text"], projection_dim=tiny["projection_dim"])
    towers = step.make_towers(config, trainer.model_config(config))
    assert towers.config == bench.clip_config("tiny")
    params = jax.device_get(towers.init(jax.random.key(config.seed)))
    classes = trainer.class_inputs(config, objectives.get(config.objective), towers, params,
                                   None, bench.class_names())
    mesh = s.classes.sharding.mesh
    ours = step.setup(config, towers, params, classes, mesh,
                      total_steps=config.num_train_steps, warmup_steps=config.optim.warmup_steps)

    results = []
    for setup in (s, ours):
        with jax.set_mesh(mesh):
            for _ in range(2):  # the first step runs at lr 0 (warm-up start)
                state, metrics = setup.step_fn(setup.state, setup.frozen, setup.classes, batch)
                setup.state = state
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p_bench, m_bench), (p_ours, m_ours) = results
    assert set(m_bench) == set(m_ours) and {"loss_ct", "loss_zs", "loss_kl"} <= set(m_ours)
    # Equal to float32 rounding: the bench makes its params with a jitted init on the device.
    for key in m_ours:
        np.testing.assert_allclose(m_bench[key], m_ours[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(p_bench), jax.tree.leaves(p_ours), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    before = jax.device_get(towers.init(jax.random.key(config.seed))["event_tower"])
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(p_ours["event_tower"]), strict=True))
