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

Variants after the dataset (config_base.VARIANTS): ``cosine`` (the release's cosine-embedding
L_pred), ``bf16``, ...
"""

from evclip_jax.config_base import apply_variants, base_config, parse_arg
from evclip_jax.evaluate.zeroshot import DATASET_TEMPLATES


def get_config(arg="nimagenet"):
    names, _ = parse_arg(arg or "nimagenet", "configs/finetune.py",
                         {d: "dataset" for d in DATASET_TEMPLATES})
    datasets = [n for n in names if n in DATASET_TEMPLATES]
    if len(datasets) > 1:
        raise ValueError(f"configs/finetune.py: several datasets {datasets}; expected one of "
                         f"{sorted(DATASET_TEMPLATES)}")
    dataset = datasets[0] if datasets else "nimagenet"
    c = base_config()
    c.objective = "finetune"
    c.optim.base_lr = 5e-6  # release fine-tuning lr, x global_batch / 256
    c.num_epochs = 100
    c.optim.warmup_epochs = 10.0
    c.data.prompt = DATASET_TEMPLATES[dataset][0]
    c.eval.evals = "zeroshot,fewshot"
    apply_variants(c, names)
    return c
