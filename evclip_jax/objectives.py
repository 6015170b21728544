"""Training objectives: what each trains, what stays frozen, and its loss (``config.objective``).

=============  ======================  ==================  ======================================
objective      trainable               frozen              loss (METHOD.md "Losses")
=============  ======================  ==================  ======================================
``evclip``     event tower             image, text towers  ct L_ct + zs L_zs + kl L_kl (the paper)
``ezsr``       event tower             image, text towers  mod L_mod (EZSR, L1/L2) + ct L_ct
``eventbind``  event tower (+ prompts)  image, text towers  L_htca (E-CLIP/EventBind, 3 terms)
``finetune``   event tower             (none in the step)  L_pred (paper Eq. 6 or release cosine)
``clip``       image and text towers   (no event tower)    CLIP's symmetric contrastive loss
=============  ======================  ==================  ======================================

Frozen towers are a separate argument of the loss that is never differentiated, and their
outputs enter under stop_gradient; they keep no optimizer state. The trainable temperatures
are scalars beside the towers: ``log_tau_ct`` (L_ct, paper: learnable, init 1) and
``logit_scale`` (s = exp(logit_scale) of L_zs, L_pred, L_htca and CLIP, init log(1/0.07)).

The loss function is ``loss_fn(params, frozen, classes, batch, step) -> (L, {term: value})``.
``classes`` is what the objective knows of the classes: the normalised class text embeddings
[M, D] of the frozen text tower, or for ``clip`` the class captions' token ids [M, K, L]
(K caption templates; each example's template is drawn from (seed, step, row)). A model with
hybrid text prompts (``model.text_prompts``, eventbind objective only) trains its prompt
learner ``text_prompts`` beside the event tower; its ``classes`` are the class prompts' token
ids and context positions (prompts.prompt_inputs) and the class text is computed in the step.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from evclip_jax import losses, prompts
from evclip_jax.embed import embed_text, embed_vision, l2_normalize

TOWERS = ("image_tower", "event_tower", "text_tower")


@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    trainable: tuple[str, ...]  # towers that get gradients and optimizer state
    frozen: tuple[str, ...]  # towers the loss reads but never differentiates
    scalars: tuple[str, ...]  # trainable temperatures
    uses_class_text: bool = True  # classes = class text embeddings (else caption token ids)


_EVENT = ("event_tower",)
_TEACHERS = ("image_tower", "text_tower")
OBJECTIVES = {
    "evclip": Objective("evclip", _EVENT, _TEACHERS, ("log_tau_ct", "logit_scale")),
    "ezsr": Objective("ezsr", _EVENT, _TEACHERS, ("log_tau_ct",)),
    "eventbind": Objective("eventbind", _EVENT, _TEACHERS, ("logit_scale",)),
    "finetune": Objective("finetune", _EVENT, (), ("logit_scale",)),
    "clip": Objective("clip", ("image_tower", "text_tower"), (), ("logit_scale",),
                      uses_class_text=False),
}


def get(name: str, field: str = "config.objective") -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"{field}={name!r}: expected one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def initial_trainable(objective: Objective, params: dict, loss_cfg) -> dict:
    """The trainable params of ``objective`` from model params and the loss config's inits
    (and the prompt learner of a model with hybrid prompts)."""
    inits = {"log_tau_ct": math.log(loss_cfg.tau_ct_init),
             "logit_scale": loss_cfg.logit_scale_init}
    out = {name: params[name] for name in objective.trainable}
    if "text_prompts" in params:
        if objective.name != "eventbind":
            raise ValueError(f"config.model.text_prompts='hybrid' trains through HTCA; "
                             f"config.objective={objective.name!r} expected 'eventbind'")
        out["text_prompts"] = params["text_prompts"]
    out.update({name: jnp.asarray(inits[name], jnp.float32) for name in objective.scalars})
    return out


def check_loss_config(objective: Objective, loss_cfg) -> None:
    """Refuses loss settings the objective cannot use, naming the field."""
    choices = {"zs_form": losses.ZS_FORMS, "pred_form": losses.PRED_FORMS,
               "mod_norm": losses.MOD_NORMS}
    for field, allowed in choices.items():
        if loss_cfg[field] not in allowed:
            raise ValueError(f"config.loss.{field}={loss_cfg[field]!r}: expected one of "
                             f"{allowed}")
    weights = {"evclip": ("ct_weight", "zs_weight", "kl_weight"),
               "ezsr": ("mod_weight", "ct_weight")}.get(objective.name, ())
    if weights and not any(loss_cfg[w] for w in weights):
        raise ValueError(f"config.loss: {', '.join(weights)} are all zero; objective "
                         f"{objective.name!r} would train on nothing")


def make_loss_fn(objective: Objective, towers, loss_cfg, seed: int = 0,
                 gathered: jax.sharding.Sharding | None = None):
    """The loss of ``objective`` over the global batch (see the module docstring).

    ``gathered``: a replicated sharding that the embeddings are constrained to before the loss
    (``config.loss.gather_embeddings``), so that every device computes the whole loss from
    [N, D] embeddings with no collective inside it; None leaves their placement to GSPMD.
    """
    vision, event, text = towers.vision, towers.event, towers.text
    lc = loss_cfg

    def gather(x):
        return x if gathered is None else jax.lax.with_sharding_constraint(x, gathered)

    def event_and_image(params, frozen, batch):
        """Unnormalised event and image embeddings; the image side is a frozen teacher."""
        e_raw = embed_vision(event, params["event_tower"], batch["events"])
        if "teacher_emb" in batch:
            v_raw = batch["teacher_emb"].astype(jnp.float32)
        else:
            v_raw = embed_vision(vision, frozen["image_tower"], batch["images"])
        return gather(e_raw), jax.lax.stop_gradient(gather(v_raw))

    def evclip(params, frozen, classes, batch, step):
        e_raw, v_raw = event_and_image(params, frozen, batch)
        e, v, t = l2_normalize(e_raw), l2_normalize(v_raw), jax.lax.stop_gradient(classes)
        terms = {}
        if lc.ct_weight:
            terms["loss_ct"] = (lc.ct_weight, losses.loss_ct(
                e, v, jnp.exp(params["log_tau_ct"]), release=lc.ct_release))
        if lc.zs_weight:
            # The release feeds unnormalised event and image features to L_zs.
            e_zs, v_zs = (e_raw, v_raw) if lc.zs_form == "release" else (e, v)
            terms["loss_zs"] = (lc.zs_weight, losses.loss_zs(
                e_zs, v_zs, t, params["logit_scale"], T=lc.zs_temperature, form=lc.zs_form,
                labels=batch["labels"]))
        if lc.kl_weight:
            terms["loss_kl"] = (lc.kl_weight, losses.loss_kl(
                e, v, temperature=lc.kl_temperature, sinkhorn_iters=lc.sinkhorn_iters))
        return terms

    def ezsr(params, frozen, classes, batch, step):
        e_raw, v_raw = event_and_image(params, frozen, batch)
        terms = {}
        if lc.mod_weight:
            terms["loss_mod"] = (lc.mod_weight, losses.loss_mod(e_raw, v_raw, norm=lc.mod_norm))
        if lc.ct_weight:
            terms["loss_ct"] = (lc.ct_weight, losses.loss_ct(
                l2_normalize(e_raw), l2_normalize(v_raw), jnp.exp(params["log_tau_ct"])))
        return terms

    def eventbind(params, frozen, classes, batch, step):
        e_raw, v_raw = event_and_image(params, frozen, batch)
        e, v, s = l2_normalize(e_raw), l2_normalize(v_raw), params["logit_scale"]
        if "text_prompts" not in params:
            return {"loss_htca": (1.0, losses.loss_htca(
                e, v, jax.lax.stop_gradient(classes), batch["labels"], s))}
        # Hybrid prompts: every event has its own class texts [M, D] (content prompts from its
        # embedding). L_ei is taken once over the batch; loss_htca of each single pair then
        # adds its L_et + L_it (with one pair its event-image term is exactly 0). The image is
        # scored against the event's texts, the frozen teacher side of L_it.
        t = prompts.class_text(towers, params["text_prompts"], frozen["text_tower"],
                               classes["ids"], classes["context"], e)
        per_pair = jax.vmap(lambda e1, v1, t1, y1: losses.loss_htca(
            e1[None], v1[None], t1, y1[None], s))(e, v, t, batch["labels"])
        return {"loss_htca": (1.0, losses.loss_clip(e, v, s) + jnp.mean(per_pair))}

    def finetune(params, frozen, classes, batch, step):
        e = l2_normalize(gather(embed_vision(event, params["event_tower"], batch["events"])))
        return {"loss_pred": (1.0, losses.loss_pred(
            e, jax.lax.stop_gradient(classes), batch["labels"], params["logit_scale"],
            form=lc.pred_form))}

    def clip(params, frozen, classes, batch, step):
        labels = batch["labels"]
        key = jax.random.fold_in(jax.random.key(seed), step)
        template = jax.random.randint(key, labels.shape, 0, classes.shape[1])
        ids = classes[labels, template]
        v = l2_normalize(gather(embed_vision(vision, params["image_tower"], batch["images"])))
        t = l2_normalize(gather(embed_text(text, params["text_tower"], ids)))
        return {"loss_clip": (1.0, losses.loss_clip(v, t, params["logit_scale"]))}

    terms_fn = {"evclip": evclip, "ezsr": ezsr, "eventbind": eventbind, "finetune": finetune,
                "clip": clip}[objective.name]

    def loss_fn(params, frozen, classes, batch, step):
        terms = terms_fn(params, frozen, classes, batch, step)
        total = sum(w * value for w, value in terms.values())
        return total, {k: value for k, (_, value) in terms.items()}

    return loss_fn
