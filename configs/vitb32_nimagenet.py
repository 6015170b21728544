"""Pretrain the event tower of CLIP ViT-B/32 on N-ImageNet mini (paper settings).

Pre-training uses classes 0-79 with their paired ImageNet images; zero-shot is evaluated on the
held-out classes 80-99 (METHOD.md). Set the two paths (the run refuses to start without them):

    python tools/convert_hf_clip.py --hf_dir /ckpt/clip-vit-base-patch32 --out /ckpt/vitb32
    python tools/build_tfrecords.py --layout nimagenet --event_root /data/N_Imagenet \
        --image_root /data/imagenet --split train --classes pretrain --out_dir /data/ni_tfr
    python tools/build_tfrecords.py --layout nimagenet --event_root /data/N_Imagenet \
        --split val --classes all --out_dir /data/ni_tfr
    python -m evclip_jax.main --config configs/vitb32_nimagenet.py --workdir /runs/vitb32 \
        --config.model.checkpoint=/ckpt/vitb32 --config.data.dir=/data/ni_tfr

Variants: ``configs/vitb32_nimagenet.py:release,bf16`` (see config_base.VARIANTS).
"""

from evclip_jax.config_base import apply_variants, base_config


def get_config(arg=None):
    c = base_config()
    c.batch_size = 256
    c.num_epochs = 200
    c.optim.base_lr = 1e-6  # x global_batch / 256
    c.optim.warmup_epochs = 40.0
    c.data.train_split = "train"
    c.data.eval_split = "val"
    c.data.prompt = "a photo of a {label}"
    c.eval.heldout_classes = "80-99"
    c.eval.rank_against = "all"  # the release ranks against all 100 prompts
    c.checkpoint.every_steps = 2000
    apply_variants(c, arg)
    return c
