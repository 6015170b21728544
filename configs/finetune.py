"""Fine-tune a pretrained event tower with L_pred on one dataset's classes (paper Eq. 6).

``model.checkpoint`` is the pretraining workdir (or an evclip / HF dir). The dataset is chosen by
the argument, which also picks the prompt of METHOD.md:

    python -m evclip_jax.main --config configs/finetune.py:ncaltech101 --workdir /runs/ft_nc \
        --config.model.checkpoint=/runs/vitl14 --config.data.dir=/data/ncaltech_tfr

Few-shot (N in {1, 2, 5} per class, several seeds) fine-tunes through the same train step during
evaluation:

    python -m evclip_jax.main --mode eval --config configs/finetune.py:ncaltech101 \
        --workdir /runs/fs_nc --config.eval.checkpoint=/runs/vitl14 \
        --config.data.dir=/data/ncaltech_tfr --config.eval.evals=fewshot,fewshot_finetune

Variants after the dataset: ``cosine`` (the release's cosine-embedding L_pred), ``bf16``.
"""

from evclip_jax.config_base import apply_variants, base_config
from evclip_jax.evaluate.zeroshot import DATASET_TEMPLATES


def get_config(arg="nimagenet"):
    dataset, _, variants = (arg or "nimagenet").partition(",")
    if dataset not in DATASET_TEMPLATES:
        raise ValueError(f"configs/finetune.py: dataset {dataset!r}; expected one of "
                         f"{sorted(DATASET_TEMPLATES)}")
    c = base_config()
    c.loss.ct_weight = c.loss.zs_weight = c.loss.kl_weight = 0.0
    c.loss.pred_weight = 1.0
    c.optim.base_lr = 5e-6  # release fine-tuning lr, x global_batch / 256
    c.num_epochs = 100
    c.optim.warmup_epochs = 10.0
    c.data.prompt = DATASET_TEMPLATES[dataset][0]
    c.eval.evals = "zeroshot,fewshot"
    names = [v for v in variants.split(",") if v]
    if "cosine" in names:
        names.remove("cosine")
        c.loss.pred_form = "cosine"
    apply_variants(c, ",".join(names))
    return c
