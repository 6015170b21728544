"""Demo: the closed world, end to end, with nothing downloaded (METHOD.md "Closed-world
protocol").

A synthetic world of 12 drawn object classes (4 of them unseen by the event tower) is built in
<workdir>/world; a tiny CLIP teacher is trained on the images and captions of every class
(<workdir>/teacher, an HF CLIP dir in teacher/hf); its image tower is distilled into the event
tower with the paper's loss on the seen classes (<workdir>/distill), evaluated on held-out
seen-class events and on the unseen classes as it trains. <workdir>/report.md opens with the
table; summary.json holds the numbers.

    python -m evclip_jax.main --config configs/demo.py --workdir /tmp/evclip_demo

Arguments: ``configs/demo.py:steps=N`` (distillation steps), ``:frames`` (the world's events
as EventBind's T-frame records, which both event encoders take) and any variant of
config_base.VARIANTS (for example ``configs/demo.py:ezsr`` or ``:eventbind``). ``get_sweep()``
is the ablation of the paper's Fig. 4 on this world (launch/sweep.py runs it). The temporal
event encoder against the paper's, on one world and teacher, 3 seeds:

    python launch/sweep.py --config configs/demo.py:frames --workdir_root /tmp/evclip_frames \
        --grid model.event_encoder=vit,eventbind --grid seed=0,1,2

Expected: a few minutes on 2 CPU cores (a sweep job: a few minutes).
"""

from evclip_jax.config_base import apply_variants, base_config, parse_arg

TINY_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
               "projection_dim": 32}
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 1000, "max_position_embeddings": 16,
             "eos_token_id": 999, "projection_dim": 32}
CAPTIONS = ("a photo of a {label}", "a drawing of a {label}", "a {label} among clutter",
            "there is a {label} here", "{label}")


def get_config(arg=None):
    names, values = parse_arg(arg, "configs/demo.py", {
        "steps": "steps=N distillation steps",
        "frames": "frames: EventBind's T-frame records (data.representation 'eventbind')"})
    c = base_config()
    c.world.enabled = True
    c.model.allow_random_init = True  # the teacher starts from random weights
    c.model.vision.update(TINY_VISION)
    c.model.text.update(TINY_TEXT)
    c.data.prompt = "a photo of a {label}"
    c.data.caption_templates = CAPTIONS
    c.data.augment.shift_px = 3
    c.data.augment.crop_scale = (0.8, 1.0)  # a 32 px world: keep most of the object

    # Distillation: the event tower, from the teacher's image tower, on the seen classes.
    c.batch_size = 32
    c.num_train_steps = int(values.get("steps", 300))
    c.log_every_steps = 25
    c.optim.base_lr = 0.002  # x 32/256: the tower starts from a trained teacher
    c.optim.warmup_steps = 20
    c.checkpoint.every_steps = 100
    c.eval.every_steps = 50
    c.eval.batch_size = 32
    c.eval.fewshot_shots = (1, 5)
    unseen = {int(i) for i in c.world.unseen_classes.split(",")}
    seen = ",".join(str(i) for i in range(c.world.num_classes) if i not in unseen)
    c.eval.views = {
        # Held-out instances of the seen classes, ranked against every class's prompt.
        "seen": {"split": "test", "classes": seen, "rank_against": "all",
                 "evals": "zeroshot,retrieval"},
        # Every instance of the unseen classes, ranked against the unseen prompts; few-shot
        # support drawn from the same split, the rest are the queries.
        "unseen": {"split": "unseen", "classes": c.world.unseen_classes,
                   "rank_against": "heldout", "evals": "zeroshot,fewshot",
                   "support_split": "unseen"},
    }
    if "frames" in names:
        c.data.representation = "eventbind"  # data.num_frames polarity-coloured frames
    apply_variants(c, names)
    return c


# The ablation of the paper's Fig. 4 on this world: each job distils the same teacher on the
# same world with a different objective; 3 seeds each (data order, augmentation).
SWEEP_JOBS = {
    "full": {},  # L_ct + 0.1 L_zs + L_kl (the paper)
    "no_ct": {"loss.ct_weight": 0.0},
    "no_zs": {"loss.zs_weight": 0.0},
    "no_kl": {"loss.kl_weight": 0.0},
    "ct_only": {"loss.zs_weight": 0.0, "loss.kl_weight": 0.0},  # InfoNCE alone
    "release": {"loss.ct_release": True, "loss.zs_form": "release", "data.paired_aug": False},
    "ezsr": {"objective": "ezsr"},
    "ezsr_knn": {"objective": "ezsr", "eval.knn_k": 10},  # + k-NN translation at eval
    "eventbind": {"objective": "eventbind"},  # HTCA, on this world's Eq. 1 frames
}
SWEEP_SEEDS = (0, 1, 2)


def get_sweep():
    """[(job, {config field: value})]: every job of SWEEP_JOBS with every seed."""
    return [(f"{job}/seed{seed}", {**overrides, "seed": seed})
            for job, overrides in SWEEP_JOBS.items() for seed in SWEEP_SEEDS]
