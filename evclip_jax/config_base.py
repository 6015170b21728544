"""The config every experiment starts from: each field is read by the trainer or evaluators.

Experiment files in configs/ call ``base_config()`` and change what differs. Defaults follow
the paper and METHOD.md; each release deviation is a named field with a comment.
"""

from __future__ import annotations

import json
import math

import ml_collections

from evclip_jax.models.config import EVENT_ENCODERS, TEXT_PROMPTS
from evclip_jax.sharding import BATCH_AXES, DEFAULT_RULES


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 256  # global, over all hosts and devices
    c.num_epochs = 200  # release default
    c.num_train_steps = 0  # > 0 overrides num_epochs
    c.log_every_steps = 50
    # What trains and on which loss (objectives.py): "evclip" (the paper) | "ezsr" |
    # "eventbind" | "finetune" | "clip" (a CLIP teacher: image and text towers, no event tower).
    c.objective = "evclip"

    # Device mesh (data, fsdp, tensor); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = [(k, list(v) if isinstance(v, tuple) else v) for k, v in DEFAULT_RULES]
    assert c.sharding_rules[0] == ("batch", list(BATCH_AXES))

    c.model = ml_collections.ConfigDict()
    # Any model path: an HF CLIP dir, an evclip checkpoint dir, a training workdir, or a
    # checkpoint FILE in OpenAI layout (OpenAI clip, open_clip, the paper's release), read as
    # model.checkpoint_file says (checkpoint_files.FileOptions; "" / 0: not set).
    c.model.checkpoint = ""
    c.model.checkpoint_file = ml_collections.ConfigDict(
        {"clip_path": "", "vision_heads": 0, "text_heads": 0, "activation": "quick_gelu",
         "trust_jit": False})
    c.model.allow_random_init = False  # True: a random CLIP built from model.vision/model.text
    c.model.vision = ml_collections.ConfigDict()  # TowerConfig fields, for random init only
    c.model.text = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype; params, loss and optimizer stay float32
    c.model.attention_impl = ""  # "" (XLA picks), "xla" or "cudnn" (fused, GPU, bf16)
    # What each transformer block keeps for backward (models.clip.REMAT_POLICIES): "none",
    # "matmuls" (recompute LayerNorm, activation and attention), "matmuls_attention" (recompute
    # LayerNorm and activation; keeps cuDNN attention's outputs) or "full" (recompute the block).
    c.model.remat = "none"
    # The event tower: "vit" (the paper: the image tower's architecture; eventbind frames are
    # embedded one at a time and averaged) | "eventbind" (E-CLIP/EventBind's temporal encoder
    # over data.num_frames frames, models/eventbind.py; needs data.representation "eventbind").
    c.model.event_encoder = "vit"
    c.model.event_prompts = 16  # eventbind encoder: event prompt tokens per block (release: 16)
    # Class text: "handcrafted" (data.prompt as written) | "hybrid" (EventBind's learned context
    # and content prompts on data.prompt, prompts.py; trained by the eventbind objective).
    c.model.text_prompts = "handcrafted"

    # evclip: L = ct_weight L_ct + zs_weight L_zs + kl_weight L_kl;
    # ezsr: L = mod_weight L_mod + ct_weight L_ct (InfoNCE); eventbind: L_htca;
    # finetune: L_pred (pred_form); clip: CLIP's symmetric contrastive loss.
    c.loss = ml_collections.ConfigDict()
    c.loss.ct_weight = 1.0
    c.loss.zs_weight = 0.1  # alpha
    c.loss.kl_weight = 1.0
    c.loss.mod_weight = 1.0  # EZSR scalar-wise modulation
    c.loss.mod_norm = "l1"  # "l1" | "l2" (EZSR's two variants)
    c.loss.tau_ct_init = 1.0  # paper: learnable, init 1
    c.loss.ct_release = False  # release: tau 0.02 fixed, x2tau, no gradient to the event tower
    c.loss.logit_scale_init = math.log(1 / 0.07)  # s of L_zs, L_pred, L_htca and CLIP
    c.loss.zs_temperature = 2.0
    c.loss.zs_form = "zscl"  # "zscl" (paper Prop. 1) | "release" | "label" (Eq. 3 literal)
    c.loss.kl_temperature = 0.01
    c.loss.sinkhorn_iters = 3
    c.loss.pred_form = "ce"  # "ce" (paper Eq. 6) | "cosine" (release)
    # True: the [N, D] embeddings are gathered to every device, which computes the whole loss
    # with no collective inside it (faster on two H200s at N = 512); False: each device keeps
    # its rows, an [N / devices, N] slice of each logits matrix (for very large global batches).
    c.loss.gather_embeddings = True

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
    c.data.caption_templates = ()  # clip objective: captions = templates x class names
    # Event representation (embed.py): "evclip" (paper Eq. 1) | "eventclip" | "eventbind".
    c.data.representation = "evclip"
    c.data.num_frames = 3  # eventbind: T frames per example (synthetic data and the builder)
    c.data.paired_aug = True  # one geometric transform for event and image; release: False
    # Release augmentation (METHOD.md). The release's time flip is left out: Eq. 1 frames sum
    # over t, so it changes nothing.
    c.data.augment = ml_collections.ConfigDict(
        {"enabled": True, "shift_px": 20, "crop_scale": (0.45, 1.0),
         "crop_ratio": (3 / 4, 4 / 3), "hflip": True})
    c.data.skip_bad_records = False  # True: skip and count corrupt records instead of failing
    # With skip_bad_records: give up once more than this share of an epoch's records is bad
    # (an epoch of only bad records always stops the run).
    c.data.max_bad_fraction = 0.01
    # The run stops with an error when the input pipeline yields no batch for this long
    # (a vanished or unreadable data dir); the first batch fills the shuffle buffer.
    c.data.stall_timeout_s = 600.0
    c.data.teacher_emb = False  # read precomputed image embeddings instead of the image tower
    c.data.synthetic = ml_collections.ConfigDict(
        {"enabled": False, "num_classes": 4, "per_class": 32, "seed": 0,
         "splits": {"train": 0.75, "test": 0.25}, "num_shards": 2})

    # The closed world (closed_world.py): a synthetic world with unseen classes, a CLIP teacher
    # trained on it, then this config's run distils the teacher on the seen classes.
    c.world = ml_collections.ConfigDict()
    c.world.enabled = False
    c.world.dir = ""  # default <workdir>/world; shared by the jobs of a sweep
    c.world.teacher_dir = ""  # default <workdir>/teacher
    c.world.num_classes = 12
    c.world.unseen_classes = "2,5,8,11"  # class ids the event tower never trains on
    c.world.per_class = 150  # instances per class
    c.world.test_fraction = 0.25  # held-out instances per class
    c.world.seed = 0
    c.world.teacher = ml_collections.ConfigDict(
        {"steps": 4500, "batch_size": 32, "base_lr": 0.01, "warmup_steps": 50})

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3  # the newest complete checkpoints kept (>= 1)
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.checkpoint = ""  # --mode eval: a training workdir, evclip dir or HF dir (default:
    # --workdir)
    c.eval.every_steps = 0  # 0: only at the end
    c.eval.at_end = True
    c.eval.evals = "zeroshot,retrieval"
    c.eval.batch_size = 256
    c.eval.rank_against = "all"  # N-ImageNet release: all 100 prompts | "heldout"
    c.eval.heldout_classes = ""  # e.g. "80-99"; "" = every class of the eval split
    c.eval.fewshot_shots = (1, 2, 5)
    c.eval.fewshot_seeds = 3
    c.eval.finetune_steps = 50  # fewshot_finetune: full-batch L_pred steps per support set
    c.eval.knn_k = 0  # > 0: EZSR k-NN translation against the image embeddings
    c.eval.query = "events"  # "events": the event tower; "images": the image tower (a teacher)
    # Several evaluation sets in one run: name -> {split, classes, rank_against, evals,
    # support_split, query}, each defaulting to the fields above; metrics get "<name>/".
    c.eval.views = ml_collections.ConfigDict()
    # Video anomaly detection: <name>_frames.npz of tools/video_to_events.py, "dataset=path"
    # to pool files per dataset. The prompts are a project default, not the paper's.
    c.eval.anomaly_videos = ()
    c.eval.normal_prompts = ("a photo of a normal scene",)
    c.eval.abnormal_prompts = ("a photo of an abnormal event",)
    # Video anomaly sets as records (tools/video_to_events.py --format tfrecords): splits of
    # data.dir, labels 0 normal / 1 anomalous, one AUC each beside those of anomaly_videos.
    c.eval.anomaly_splits = ()
    # Five-modality retrieval (paper Sec. 4.4, evaluator "modalities"): event queries against
    # image and text keys from our towers and one "name=path" per modality the user brings:
    # .npz {embeddings [n, D], labels [n], optional class_names} or .npy + <stem>_labels.npy.
    c.eval.modalities = ()

    # The single linear layer from our CLIP space into the space of the user's modality files
    # (adapter.py; the paper's adapter to ImageBind). With pairs set, --mode eval fits it and
    # writes <model dir>/adapter.npz; later runs read it from there.
    c.adapter = ml_collections.ConfigDict()
    c.adapter.pairs = ""  # .npz: source [n, D] (our image embeddings), target [n, D']
    # The paper names the layer, not its fit: "lstsq" (closed form) | "contrastive" (InfoNCE).
    c.adapter.fit = "lstsq"
    c.adapter.bias = True
    c.adapter.steps = 500  # contrastive: Adam steps, pairs per batch, lr and temperature
    c.adapter.batch_size = 256
    c.adapter.lr = 1e-2
    c.adapter.temperature = 0.07

    # Multi-process runs (distributed.py): one process per TPU VM host or per GPU. Settings left
    # empty come from the cluster (SLURM, Cloud TPU, Open MPI, JAX_COORDINATOR_ADDRESS).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = "auto"  # "auto": when a cluster is detected | "on" | "off"
    c.distributed.coordinator_address = ""  # host:port of process 0
    c.distributed.num_processes = 0  # 0: from the cluster
    c.distributed.process_id = -1  # -1: from the cluster
    c.distributed.initialization_timeout_s = 300  # all processes must join within this
    c.distributed.heartbeat_timeout_s = 100  # a process silent this long is lost: all stop

    # A jax.profiler trace of training steps [start_step, start_step + num_steps) in
    # <workdir>/profile, by process 0: TensorBoard's profile plugin reads it, Perfetto
    # opens its perfetto_trace.json.gz. num_steps 0: no trace. Steps count from 0; start
    # after the first steps, which compile.
    c.profile = ml_collections.ConfigDict({"start_step": 5, "num_steps": 0})

    c.debug = ml_collections.ConfigDict()
    c.debug.log_data_order = False  # append each step's labels to workdir/data_order.jsonl
    return c


# Named variants for ``--config configs/x.py:variant1,variant2``; each states its source.
VARIANTS = {
    # The public release's forms: L_ct with tau 0.02 and no gradient to the event tower,
    # L_zs with the reversed second term on unnormalised features, independent crops.
    "release": {"loss.ct_release": True, "loss.zs_form": "release", "data.paired_aug": False},
    # EZSR: scalar-wise modulation (L1) plus InfoNCE, k-NN translation at evaluation.
    "ezsr": {"objective": "ezsr", "eval.knn_k": 10},
    # E-CLIP / EventBind: HTCA, its temporal encoder and hybrid prompts on its
    # polarity-coloured temporal frames.
    "eventbind": {"objective": "eventbind", "data.representation": "eventbind",
                  "model.event_encoder": "eventbind", "model.text_prompts": "hybrid"},
    # EventCLIP's polarity histogram as the event representation.
    "eventclip": {"data.representation": "eventclip"},
    # The release's cosine-embedding L_pred for fine-tuning.
    "cosine": {"loss.pred_form": "cosine"},
    # GPU/TPU speed: bf16 compute with float32 params, loss and optimizer state.
    "bf16": {"model.dtype": "bfloat16"},
    # Fused attention on NVIDIA GPUs (needs bf16).
    "cudnn": {"model.dtype": "bfloat16", "model.attention_impl": "cudnn"},
    # Frozen image tower replaced by precomputed embeddings stored in the records.
    "teacher_emb": {"data.teacher_emb": True},
    # Zero-shot ranking against the 20 held-out prompts instead of all 100 (N-ImageNet).
    "heldout_ranking": {"eval.rank_against": "heldout"},
}


def parse_arg(arg: str | None, where: str, keys: dict | None = None
              ) -> tuple[list[str], dict[str, str]]:
    """The one parser of a config file's argument ``--config file.py:a,b,key=value``.

    Returns (names, {key: value}); names are checked against VARIANTS plus the file's own
    ``keys`` (a {key or name: help} dict), so a typo is refused naming the file.
    """
    keys = keys or {}
    names, values = [], {}
    for item in filter(None, (p.strip() for p in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        known = key in keys if sep else (key in VARIANTS or key in keys)
        if not known:
            expected = sorted(VARIANTS) + [f"{k}=..." if "=" in h else k
                                           for k, h in keys.items()]
            raise ValueError(f"{where}: unknown config argument {item!r}; expected any of "
                             f"{', '.join(expected)}")
        if sep:
            values[key] = value
        else:
            names.append(key)
    return names, values


def apply_variants(config: ml_collections.ConfigDict, names: list[str]) -> None:
    """Sets the fields of each named VARIANT (names not in VARIANTS are the caller's)."""
    for name in names:
        for path, value in VARIANTS.get(name, {}).items():
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
    names, _ = parse_arg(arg, "configs/<backbone>_nimagenet.py")
    apply_variants(c, names)
    return c


# ----------------------------------------------------------------------------- checking

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("", "xla", "cudnn")

# Fields whose change alters what a resumed run computes (the data it reads, the model, the
# loss, the optimizer and its schedule); a resume that changes one is refused
# (run_guard.record_config).
# Paths, logging, checkpointing, evaluation and the device layout are free to change.
TRAJECTORY_FIELDS = ("seed", "batch_size", "num_epochs", "num_train_steps", "objective",
                     "model.vision.", "model.text.", "model.dtype", "model.event_encoder",
                     "model.event_prompts", "model.text_prompts", "loss.", "optim.", "data.")
TRAJECTORY_FREE = ("data.dir", "data.eval_split", "data.skip_bad_records",
                   "data.max_bad_fraction", "data.stall_timeout_s")


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses a field outside its domain, naming it, before anything is built or computed."""

    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            value = config
            for part in field.split("."):
                value = value[part]
            raise ValueError(f"config.{field}={value!r}: expected {expected}")

    need(config.batch_size >= 1, "batch_size", "a positive global batch size")
    need(config.num_train_steps >= 0, "num_train_steps", ">= 0 (0: use num_epochs)")
    need(config.num_epochs >= 1 or config.num_train_steps > 0, "num_epochs",
         ">= 1 when num_train_steps is 0")
    need(config.log_every_steps >= 1, "log_every_steps", ">= 1")
    need(config.model.dtype in DTYPES, "model.dtype", f"one of {DTYPES}")
    need(config.model.attention_impl in ATTENTION_IMPLS, "model.attention_impl",
         f"one of {ATTENTION_IMPLS}")
    need(config.model.attention_impl != "cudnn" or config.model.dtype != "float32",
         "model.attention_impl", "'' or 'xla' with model.dtype='float32' (cuDNN's fused "
         "attention takes bfloat16 or float16)")
    for field in ("ct_weight", "zs_weight", "kl_weight", "mod_weight"):
        need(config.loss[field] >= 0, f"loss.{field}", ">= 0")
    for field in ("tau_ct_init", "zs_temperature", "kl_temperature"):
        need(config.loss[field] > 0, f"loss.{field}", "> 0")
    need(config.loss.sinkhorn_iters >= 0, "loss.sinkhorn_iters", ">= 0")
    need(config.optim.base_lr > 0, "optim.base_lr", "> 0")
    need(0 <= config.optim.b1 < 1, "optim.b1", "in [0, 1)")
    need(0 <= config.optim.b2 < 1, "optim.b2", "in [0, 1)")
    for field in ("weight_decay", "warmup_epochs", "warmup_steps", "grad_clip_norm"):
        need(config.optim[field] >= 0, f"optim.{field}", ">= 0")
    need("{label}" in config.data.prompt, "data.prompt",
         "a template with a '{label}' placeholder (else every class shares one prompt)")
    for template in config.data.caption_templates:
        need("{label}" in template, "data.caption_templates",
             "templates that each hold a '{label}' placeholder")
    need(bool(config.data.train_split), "data.train_split", "a split name")
    need(config.data.num_frames >= 1, "data.num_frames", ">= 1")
    need(config.model.event_encoder in EVENT_ENCODERS, "model.event_encoder",
         f"one of {EVENT_ENCODERS}")
    need(config.model.event_encoder != "eventbind" or config.data.representation == "eventbind",
         "model.event_encoder", "'vit' unless data.representation='eventbind' (the temporal "
         "encoder takes that representation's T frames)")
    need(config.model.event_encoder != "eventbind" or config.model.attention_impl != "cudnn",
         "model.event_encoder", "'vit' with model.attention_impl='cudnn' (the temporal "
         "encoder's prompt attention is not padded for cuDNN)")
    need(config.model.event_prompts >= 0, "model.event_prompts", ">= 0")
    need(config.model.text_prompts in TEXT_PROMPTS, "model.text_prompts",
         f"one of {TEXT_PROMPTS}")
    need(config.model.text_prompts != "hybrid" or config.objective == "eventbind",
         "model.text_prompts", "'handcrafted' unless objective='eventbind' (HTCA trains the "
         "hybrid prompts)")
    need(0 <= config.data.max_bad_fraction < 1, "data.max_bad_fraction", "in [0, 1)")
    need(config.data.stall_timeout_s > 0, "data.stall_timeout_s", "> 0 seconds")
    need(config.checkpoint.every_steps >= 1, "checkpoint.every_steps", ">= 1")
    need(config.checkpoint.keep >= 1, "checkpoint.keep",
         ">= 1 (the newest complete checkpoints kept; 0 would delete every one)")
    need(config.eval.every_steps >= 0, "eval.every_steps", ">= 0 (0: only at the end)")
    need(config.eval.batch_size >= 1, "eval.batch_size", "a positive batch size")
    need(config.eval.knn_k >= 0, "eval.knn_k", ">= 0 (0: off)")


def flatten(config: ml_collections.ConfigDict | dict, prefix: str = "") -> dict:
    """{"a.b.c": value} of every leaf; tuples become lists, so the result is JSON as it is."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(flatten(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def trajectory_changes(stored: dict, config: ml_collections.ConfigDict) -> list[str]:
    """"field: stored -> now" for each trajectory field (TRAJECTORY_FIELDS) in which the flat
    ``stored`` config (``flatten``) and ``config`` differ."""
    current = json.loads(json.dumps(flatten(config), default=str))  # as config.json holds it

    def matters(name: str) -> bool:
        def among(fields: tuple[str, ...]) -> bool:
            return any(name == f or (f.endswith(".") and name.startswith(f)) for f in fields)

        return among(TRAJECTORY_FIELDS) and not among(TRAJECTORY_FREE)

    missing = "(absent)"
    return [f"{name}: {stored.get(name, missing)!r} -> {current.get(name, missing)!r}"
            for name in sorted(set(stored) | set(current))
            if matters(name) and stored.get(name, missing) != current.get(name, missing)]
