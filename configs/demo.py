"""Demo: pretrain a tiny random CLIP's event tower on the built-in synthetic event dataset.

Needs no download: the dataset (4 classes of drawn shapes, moved into events) is generated in
<workdir>/data, and the CLIP is randomly initialised from the sizes below.

    python -m evclip_jax.main --config configs/demo.py --workdir /tmp/evclip_demo

Arguments: ``configs/demo.py:steps=N`` and any variant of config_base.VARIANTS (for example
``configs/demo.py:eventbind,steps=50``). Expected: about 1 minute on 2 CPU cores; writes
summary.json, TensorBoard logs, Orbax checkpoints and an eval report in the workdir.
"""

from evclip_jax.config_base import apply_variants, base_config, parse_arg

TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
               "projection_dim": 32}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 16,
             "eos_token_id": 999, "projection_dim": 32}


def get_config(arg=None):
    names, values = parse_arg(arg, "configs/demo.py", {"steps": "steps=N training steps"})
    c = base_config()
    c.batch_size = 16
    c.num_epochs = 60
    c.log_every_steps = 10
    c.model.allow_random_init = True
    c.model.vision.update(TINY_VISION)
    c.model.text.update(TINY_TEXT)
    c.optim.base_lr = 0.05  # x 16/256 = 3e-3: a random tiny tower learns within the demo
    c.optim.warmup_epochs = 1.0
    c.data.synthetic.enabled = True
    c.data.prompt = "a picture of a {label}"
    c.data.augment.shift_px = 3
    c.checkpoint.every_steps = 30
    c.eval.batch_size = 16
    c.eval.evals = "zeroshot,retrieval,fewshot"
    c.eval.fewshot_shots = (1, 2, 5)
    if "steps" in values:
        c.num_train_steps = int(values["steps"])
    apply_variants(c, names)
    return c
