"""The evclip pretraining step written in PyTorch, as the baseline for tools/bench_train_step.py.

Same model and maths as ``evclip_jax.train.make_train_step``: a trainable event tower and a
frozen image tower (HF ``CLIPVisionModelWithProjection``, one the deep copy of the other, the
frozen one in eval mode under ``torch.no_grad``), class text embeddings precomputed,
L = ct_weight L_ct + zs_weight L_zs + kl_weight L_kl (METHOD.md "Losses"; L_ct with learnable
tau, L_zs in the ZSCL form with learnable logit scale, L_kl with a log-domain Sinkhorn), the
loss maths in float32, AdamW with weight decay on Linear weights only, warm-up + cosine lr,
and the global gradient norm as a metric. Written as a PyTorch user would for speed: bf16
autocast, SDPA attention, TF32 matmuls, fused AdamW, optionally ``torch.compile``.

Imported by tools/bench_train_step.py (its worker process runs ``bench``); not an entry point.
"""

from __future__ import annotations

import copy
import math
import time
from types import SimpleNamespace


def _distill(teacher, student, T: float):
    """T^2 * mean over rows of CE(student / T, softmax(teacher / T)), teacher without grad."""
    import torch

    target = torch.softmax(teacher.detach() / T, dim=-1)
    return T**2 * (-(target * torch.log_softmax(student / T, dim=-1)).sum(-1)).mean()


def _log_sinkhorn(S, iters: int):
    """log of the released Sinkhorn of S [B, K] (see evclip_jax.losses._log_sinkhorn)."""
    import torch

    n_b, n_k = S.shape
    log_a = S.T
    log_a = log_a - torch.logsumexp(log_a.reshape(-1), dim=0)
    for _ in range(iters):
        log_a = log_a - torch.logsumexp(log_a, dim=1, keepdim=True) - math.log(n_k)
        log_a = log_a - torch.logsumexp(log_a, dim=0, keepdim=True) - math.log(n_b)
    return (log_a + math.log(n_b)).T


def step_losses(e_raw, v_raw, t, log_tau_ct, logit_scale, lc: SimpleNamespace):
    """(total, (L_ct, L_zs, L_kl)) in float32, as evclip_jax.train.make_loss_fn computes them
    for zs_form="zscl" and ct_release=False (the evclip objective)."""
    import torch
    import torch.nn.functional as F

    e_raw, v_raw = e_raw.float(), v_raw.float().detach()
    e = e_raw / e_raw.norm(dim=-1, keepdim=True)
    v = v_raw / v_raw.norm(dim=-1, keepdim=True)
    t = t.float().detach()
    n = e.shape[0]
    target = torch.arange(n, device=e.device)
    loss_ct = F.cross_entropy(e @ v.T / log_tau_ct.exp(), target)
    s = logit_scale.exp()
    ref, cur = s * (v @ t.T), s * (e @ t.T)
    T = lc.zs_temperature
    loss_zs = _distill(ref, cur, T) + _distill(ref.T, cur.T, T)
    log_q = torch.log_softmax(v @ e.T / lc.kl_temperature, dim=-1)
    with torch.no_grad():
        log_p = _log_sinkhorn(v @ v.T / lc.kl_temperature, lc.sinkhorn_iters)
    p = log_p.exp()
    loss_kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum() / n
    total = lc.ct_weight * loss_ct + lc.zs_weight * loss_zs + lc.kl_weight * loss_kl
    return total, (loss_ct, loss_zs, loss_kl)


def _lr_lambda(warmup: int, total: int):
    """optax.warmup_cosine_decay_schedule(0, 1, warmup, total, end_value=0) as a factor."""
    def f(step: int) -> float:
        if step < warmup:
            return step / warmup
        frac = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def bench(vision_config: dict, cfg: SimpleNamespace, mode: str, steps: int, repeats: int,
          warmup: int, num_classes: int = 100, compile_mode: str = "default") -> dict:
    """Times the step; mode "eager" or "compile". Returns timings and the last loss."""
    import torch
    import transformers

    use_cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if use_cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    torch.manual_seed(0)

    hf_config = transformers.CLIPVisionConfig(**vision_config)
    with dev:
        event_tower = transformers.CLIPVisionModelWithProjection._from_config(
            hf_config, attn_implementation="sdpa")
    event_tower.train()
    image_tower = copy.deepcopy(event_tower).eval().requires_grad_(False)
    lc = cfg.loss
    log_tau_ct = torch.nn.Parameter(torch.tensor(math.log(lc.tau_ct_init), device=dev))
    logit_scale = torch.nn.Parameter(torch.tensor(lc.logit_scale_init, device=dev))

    # Decay as evclip_jax.train._decays: Linear weights, not biases/LayerNorms/embeddings.
    decay, no_decay = [], []
    for module in event_tower.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if isinstance(module, torch.nn.Linear) and name == "weight"
             else no_decay).append(p)
    no_decay += [log_tau_ct, logit_scale]
    o = cfg.optim
    peak_lr = o.base_lr * cfg.batch_size / 256
    fused = use_cuda
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr, betas=(o.b1, o.b2), fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, 10_000))
    trainable = decay + no_decay

    b, c, size = cfg.batch_size, vision_config["num_channels"], vision_config["image_size"]
    gen = torch.Generator(device=dev).manual_seed(1)
    events = torch.rand(b, c, size, size, device=dev, generator=gen) * 2 - 1
    images = torch.randn(b, c, size, size, device=dev, generator=gen)
    text = torch.randn(num_classes, vision_config["projection_dim"], device=dev, generator=gen)
    text = text / text.norm(dim=-1, keepdim=True)
    amp_device = "cuda" if use_cuda else "cpu"

    def loss_fn(events, images, text):
        with torch.autocast(amp_device, dtype=torch.bfloat16):
            e_raw = event_tower(pixel_values=events).image_embeds
            with torch.no_grad():
                v_raw = image_tower(pixel_values=images).image_embeds
        with torch.autocast(amp_device, enabled=False):
            return step_losses(e_raw, v_raw, text, log_tau_ct, logit_scale, lc)

    forward = loss_fn
    if mode == "compile":
        kwargs = {} if compile_mode == "default" else {"mode": compile_mode}
        forward = torch.compile(loss_fn, **kwargs)
    elif mode != "eager":
        raise ValueError(f"mode={mode!r}; expected 'eager' or 'compile'")

    def step():
        loss, terms = forward(events, images, text)
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), grad_norm

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    step()
    sync()
    first_s = time.perf_counter() - t0  # includes torch.compile's tracing and compilation
    for _ in range(warmup):
        step()
    sync()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss, grad_norm = step()
        sync()
        times.append((time.perf_counter() - t0) / steps)
    loss = float(loss)
    if not math.isfinite(loss):
        raise FloatingPointError(f"torch {mode}: non-finite loss {loss}")
    return {
        "step_s": sorted(times)[len(times) // 2],
        "step_s_all": times,
        "first_step_s": first_s,
        "loss": loss,
        "grad_norm": float(grad_norm),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if use_cuda else None,
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "device": torch.cuda.get_device_name() if use_cuda else "cpu",
    }
