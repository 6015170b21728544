"""A tiny pretraining run on the synthetic dataset, for the trainer's end-to-end tests."""

from evclip_jax.config_base import base_config


def get_config(arg=None):
    c = base_config()
    c.batch_size = 8
    c.num_train_steps = 12
    c.log_every_steps = 1
    c.model.allow_random_init = True
    c.model.vision.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 16, "patch_size": 8,
                           "projection_dim": 16})
    c.model.text.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "vocab_size": 64,
                         "max_position_embeddings": 8, "eos_token_id": 63,
                         "projection_dim": 16})
    c.optim.base_lr = 0.032
    c.optim.warmup_steps = 2
    c.data.synthetic.enabled = True
    c.data.synthetic.num_classes = 3
    c.data.synthetic.per_class = 8
    c.data.synthetic.num_shards = 1
    c.data.augment.shift_px = 2
    c.checkpoint.every_steps = 4
    c.eval.at_end = False
    c.debug.log_data_order = True
    return c
