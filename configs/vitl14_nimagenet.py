"""Pretrain the event tower of CLIP ViT-L/14 on N-ImageNet mini (paper settings).

Pre-training uses classes 0-79 with their paired ImageNet images; zero-shot is evaluated on the
held-out classes 80-99 (METHOD.md). Set the two paths (the run refuses to start without them):

    python tools/convert_hf_clip.py --hf_dir /ckpt/clip-vit-large-patch14 --out /ckpt/vitl14
    python tools/build_tfrecords.py --layout nimagenet --event_root /data/N_Imagenet \
        --image_root /data/imagenet --split train --classes pretrain --out_dir /data/ni_tfr
    python tools/build_tfrecords.py --layout nimagenet --event_root /data/N_Imagenet \
        --split val --classes all --out_dir /data/ni_tfr
    python -m evclip_jax.main --config configs/vitl14_nimagenet.py --workdir /runs/vitl14 \
        --config.model.checkpoint=/ckpt/vitl14 --config.data.dir=/data/ni_tfr

Variants: ``configs/vitl14_nimagenet.py:release,bf16`` (see config_base.VARIANTS).
"""

from evclip_jax.config_base import nimagenet_pretraining


def get_config(arg=None):
    c = nimagenet_pretraining(arg)
    # 24 layers at batch 256: keep the matmul and (cuDNN) attention outputs, recompute the
    # LayerNorms and the activation (bf16 on an H200, batch 512: 70.7 GiB at 96% of the speed
    # of keeping everything, which needs 104.8 GiB; README "Speed").
    c.model.remat = "matmuls_attention"
    return c
