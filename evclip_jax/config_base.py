"""The config every experiment starts from: each field is read by the trainer or evaluators.

Experiment files in configs/ call ``base_config()`` and change what differs. Defaults follow
the paper and METHOD.md; each release deviation is a named field with a comment.
"""

from __future__ import annotations

import math

import ml_collections

from evclip_jax.sharding import BATCH_AXES, DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, over all hosts and devices
    c.num_epochs = 200  # release default
    c.num_train_steps = 0  # > 0 overrides num_epochs
    c.log_every_steps = 50

    # Device mesh (data, fsdp, tensor); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = [(k, list(v) if isinstance(v, tuple) else v) for k, v in DEFAULT_RULES]
    assert c.sharding_rules[0] == ("batch", list(BATCH_AXES))

    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # HF CLIP dir or evclip checkpoint dir (tools/convert_hf_clip.py)
    c.model.allow_random_init = False  # True: a random CLIP built from model.vision/model.text
    c.model.vision = ml_collections.ConfigDict()  # TowerConfig fields, for random init only
    c.model.text = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype; params, loss and optimizer stay float32
    c.model.attention_impl = ""  # "" (XLA picks), "xla" or "cudnn" (fused, GPU, bf16)
    c.model.remat = False  # rematerialise each transformer block (memory for compute)

    # L = ct_weight L_ct + zs_weight L_zs + kl_weight L_kl (+ pred_weight L_pred).
    c.loss = ml_collections.ConfigDict()
    c.loss.ct_weight = 1.0
    c.loss.zs_weight = 0.1  # alpha
    c.loss.kl_weight = 1.0
    c.loss.pred_weight = 0.0
    c.loss.tau_ct_init = 1.0  # paper: learnable, init 1
    c.loss.ct_release = False  # release: tau 0.02 fixed, x2tau, no gradient to the event tower
    c.loss.logit_scale_init = math.log(1 / 0.07)
    c.loss.zs_temperature = 2.0
    c.loss.zs_form = "zscl"  # "zscl" (paper Prop. 1) | "release" | "label" (Eq. 3 literal)
    c.loss.kl_temperature = 0.01
    c.loss.sinkhorn_iters = 3
    c.loss.pred_form = "ce"  # "ce" (paper Eq. 6) | "cosine" (release)

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1e-6  # x global_batch / 256
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.03
    c.optim.warmup_epochs = 40.0
    c.optim.warmup_steps = 0  # > 0 overrides warmup_epochs
    c.optim.grad_clip_norm = 0.0  # 0: no clipping

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # TFRecord shards + <split>.manifest.json
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.prompt = "a photo of a {label}"
    c.data.paired_aug = True  # one geometric transform for event and image; release: False
    # Release augmentation (METHOD.md); time_flip is a no-op on Eq. 1 frames (they sum over t).
    c.data.augment = ml_collections.ConfigDict(
        {"enabled": True, "shift_px": 20, "crop_scale": (0.45, 1.0),
         "crop_ratio": (3 / 4, 4 / 3), "hflip": True, "time_flip": True})
    c.data.skip_bad_records = False  # True: skip and count corrupt records instead of failing
    c.data.teacher_emb = False  # read precomputed image embeddings instead of the image tower
    c.data.synthetic = ml_collections.ConfigDict(
        {"enabled": False, "num_classes": 4, "per_class": 32, "seed": 0,
         "splits": {"train": 0.75, "test": 0.25}, "num_shards": 2})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoint = ""  # --mode eval: a training workdir, evclip dir or HF dir
    c.eval.every_steps = 0  # 0: only at the end
    c.eval.at_end = True
    c.eval.evals = "zeroshot,retrieval"
    c.eval.batch_size = 256
    c.eval.rank_against = "all"  # N-ImageNet release: all 100 prompts | "heldout"
    c.eval.heldout_classes = ""  # e.g. "80-99"; "" = every class of the eval split
    c.eval.fewshot_shots = (1, 2, 5)
    c.eval.fewshot_seeds = 3
    c.eval.knn_k = 0  # > 0: EZSR k-NN translation against the image embeddings

    c.debug = ml_collections.ConfigDict()
    c.debug.log_data_order = False  # append each step's labels to workdir/data_order.jsonl
    return c


# Named variants for ``--config configs/x.py:variant1,variant2``; each states its source.
VARIANTS = {
    # The public release's forms: L_ct with tau 0.02 and no gradient to the event tower,
    # L_zs with the reversed second term on unnormalised features, independent crops.
    "release": {"loss.ct_release": True, "loss.zs_form": "release", "data.paired_aug": False},
    # GPU/TPU speed: bf16 compute with float32 params, loss and optimizer state.
    "bf16": {"model.dtype": "bfloat16"},
    # Fused attention on NVIDIA GPUs (needs bf16).
    "cudnn": {"model.dtype": "bfloat16", "model.attention_impl": "cudnn"},
    # Frozen image tower replaced by precomputed embeddings stored in the records.
    "teacher_emb": {"data.teacher_emb": True},
    # Zero-shot ranking against the 20 held-out prompts instead of all 100 (N-ImageNet).
    "heldout_ranking": {"eval.rank_against": "heldout"},
}


def apply_variants(config: ml_collections.ConfigDict, arg: str | None) -> None:
    """Applies the comma-separated VARIANTS named in ``arg`` (a config file's argument)."""
    for name in filter(None, (arg or "").split(",")):
        if name not in VARIANTS:
            raise ValueError(f"config argument {name!r}: unknown variant; expected one of "
                             f"{sorted(VARIANTS)}")
        for path, value in VARIANTS[name].items():
            node = config
            *parents, leaf = path.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value


def nimagenet_pretraining(arg: str | None = None) -> ml_collections.ConfigDict:
    """Paper pre-training on N-ImageNet mini: classes 0-79 with paired ImageNet images, zero-shot
    on the held-out classes 80-99 (METHOD.md). The backbone comes from model.checkpoint."""
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
