"""Demo: pretrain a tiny random CLIP's event tower on the built-in synthetic event dataset.

Needs no download: the dataset (4 classes of drawn shapes, moved into events) is generated in
<workdir>/data, and the CLIP is randomly initialised from the sizes below.

    python -m evclip_jax.main --config configs/demo.py --workdir /tmp/evclip_demo

Expected: about 1 minute on 2 CPU cores; writes summary.json, TensorBoard logs, Orbax
checkpoints and an eval report in the workdir.
"""

from evclip_jax.config_base import base_config

TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
               "projection_dim": 32}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 16,
             "eos_token_id": 999, "projection_dim": 32}


def get_config(arg=None):
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
    if arg:
        for item in arg.split(","):
            key, value = item.split("=")
            if key == "steps":
                c.num_train_steps = int(value)
            else:
                raise ValueError(f"configs/demo.py: unknown argument {key!r}; expected steps=N")
    return c
