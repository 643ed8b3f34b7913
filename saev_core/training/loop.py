"""The training loop: `train_saes` trains a sweep of SAEs in lock-step on one pass of the data
(`train_sae` is a sweep of one), checkpointing and resuming as it goes.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saev_core.sae.model import SAE
from saev_core.training.checkpoint import (
    _restore,
    _write_checkpoint,
    checkpoint_fingerprint,
    read_checkpoint_state,
    why_not_resume,
)
from saev_core.training.config import LogFn, TrainConfig, check_shared, noop_log
from saev_core.training.schedule import (
    _checked,
    _normalisation_of,
    geometric_median,
    lr_at,
    make_adam,
    resolve_device,
    sparsity_coeff_at,
    take_tokens,
    use_bf16,
)
from saev_core.training.state import _Member, _Running


def train_saes(
    make_batches: Callable[[int], Iterable[Tensor]],
    d_model: int,
    cfgs: Sequence[TrainConfig],
    logs: Sequence[LogFn] | None = None,
    progress: bool = True,
    n_steps: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool | Literal["auto"] = "auto",
    data: dict[str, Any] | None = None,
    norm_sample: Callable[[int], Any] | None = None,
) -> list[tuple[SAE, dict[str, Any]]]:
    """Train one SAE per config in lock-step on one pass of `make_batches`; returns (SAE, summary) each.

    `make_batches(epoch)` must return a fresh iterable of `x_bd` for that epoch, shuffled by the
    caller, the same batches for the same epoch. Epoch 0's iterable is read once first to fit
    the normalisation and b_dec (up to `norm_max_tokens` tokens), unless `norm_sample(n)` gives
    those n tokens [n, d] instead (the train stage: `loaders.sample_rows`, a sample of the whole
    shard set rather than of the first window's row groups). The cosine schedule needs the
    total step count: pass `n_steps`, or it is taken as n_epochs x len(epoch 0's iterable).
    Every step, for every SAE: forward (bf16 autocast if enabled), backward, drop the gradient
    parallel to decoder rows, clip, Adam step, renormalise decoder rows, update the
    tokens-since-fired counters that define dead latents.

    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` steps; `resume`
    True continues from it (error if it is missing or from other configs), 'auto' continues
    when one from the same configs and data exists, False starts afresh. `data` says what the
    batches are (the train stage passes the shard manifest's sha256, layer, token policy and
    split): a checkpoint of other data is never resumed. Whether it resumes, and if not why,
    is printed (`resuming from step 400 of 508`).
    """
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError("train_saes needs at least one TrainConfig")
    check_shared(cfgs)
    logs = list(logs) if logs is not None else [noop_log] * len(cfgs)
    if len(logs) != len(cfgs):
        raise ValueError(f"got {len(logs)} log callbacks for {len(cfgs)} configs")
    lead = cfgs[0]
    device = resolve_device(lead.device)
    bf16 = use_bf16(lead.precision, device)
    # Impossible configs (k > d_sae, bad prefixes) fail here, before any data is read.
    sae_cfgs = [c.sae_config(d_model) for c in cfgs]
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = checkpoint_fingerprint(d_model, cfgs, data)
    state = read_checkpoint_state(ckpt_dir) if ckpt_dir is not None and resume else None
    why = why_not_resume(state.get("fingerprint"), fingerprint) if state is not None else None
    if why is not None:
        if resume is True:
            raise ValueError(
                f"checkpoint {ckpt_dir} was written for other configs or data ({why}); "
                "delete it or pass resume=False"
            )
        print(f"{why}: starting over (checkpoint {ckpt_dir})")
        state = None
    if resume is True and state is None:
        raise ValueError(f"resume=True but there is no checkpoint in {checkpoint_dir}")

    members = []
    for cfg, sae_cfg, log in zip(cfgs, sae_cfgs, logs, strict=True):
        sae = SAE(sae_cfg, generator=torch.Generator().manual_seed(cfg.seed))
        sae.sparse_kernels = cfg.sparse_kernels
        members.append(_Member(cfg, sae, log))

    first: Iterable[Tensor] | None = None
    if state is None:
        batches0 = [norm_sample(lead.norm_max_tokens)] if norm_sample else make_batches(0)
        sample = take_tokens(batches0, lead.norm_max_tokens)
        if sample.shape[1] != d_model:
            raise ValueError(f"batches have width {sample.shape[1]}, but d_model={d_model}")
        mean_d, scale = _normalisation_of(sample)
        b_dec = None
        if any(c.b_dec_init == "geometric_median" for c in cfgs):
            # Weiszfeld is O(n) per iteration: 16k tokens pin the median well enough.
            b_dec = geometric_median(((sample[:16384] - mean_d.double()) * scale).float())
        for m in members:
            m.sae.set_normalisation(mean_d, scale)
            if m.cfg.b_dec_init == "geometric_median":
                with torch.no_grad():
                    m.sae.b_dec.copy_(b_dec)
        first = make_batches(0)
        if n_steps is None:
            try:
                per_epoch = len(first)  # type: ignore[arg-type]
            except TypeError:  # a generator: count one epoch, then ask for a fresh one
                per_epoch, first = sum(1 for _ in first), make_batches(0)
            n_steps = per_epoch * lead.n_epochs
        step, epoch0, skip, n_tokens = 0, 0, 0, 0
    else:
        if n_steps is not None and n_steps != state["n_steps"]:
            raise ValueError(f"n_steps={n_steps} but the checkpoint has {state['n_steps']}")
        n_steps = int(state["n_steps"])
        step, epoch0, skip = int(state["step"]), int(state["epoch"]), int(state["batch"])
        n_tokens = int(state["n_tokens"])
    if n_steps < 1:
        raise ValueError("make_batches produced no batches")
    for m in members:
        m.sae.to(device).train()
        # Adam's state must sit with the parameters; rebuild after the move.
        m.opt = make_adam(m.sae, lr_at(0, n_steps, m.cfg), device)
    if state is not None:
        _restore(ckpt_dir, members, device)  # type: ignore[arg-type]
        print(f"resuming from step {step} of {n_steps} (checkpoint {ckpt_dir})")
    resumed_from, tokens_before = step, n_tokens

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    t0 = time.perf_counter()
    bar = tqdm(total=n_steps, initial=step, desc="train SAE", disable=not progress, unit="step")
    for epoch in range(epoch0, lead.n_epochs):
        batches = first if (epoch == 0 and first is not None) else make_batches(epoch)
        for m in members:
            if epoch != epoch0 or skip == 0:
                m.running = _Running()
        for i_batch, x_bd in enumerate(batches):
            if epoch == epoch0 and i_batch < skip:
                continue  # trained on before the checkpoint: same order, so skip it
            x_bd = _checked(x_bd, d_model, device)
            for m in members:
                _train_step(m, x_bd, step, n_steps, autocast)
            n_tokens += x_bd.shape[0]
            for m in members:
                if step % m.cfg.log_every == 0 or step == n_steps - 1:
                    _report(m, step)
            bar.update(1)
            step += 1
            if ckpt_dir is not None and lead.checkpoint_every and step % lead.checkpoint_every == 0:
                position = {"step": step, "epoch": epoch, "batch": i_batch + 1}
                _write_checkpoint(
                    ckpt_dir,
                    members,
                    {
                        "fingerprint": fingerprint,
                        "n_steps": n_steps,
                        "n_tokens": n_tokens,
                        **position,
                    },
                )
        skip = 0
    bar.close()
    if step == 0:
        raise ValueError("make_batches produced no batches")
    seconds = time.perf_counter() - t0
    results = []
    for m in members:
        if m.logged != step - 1 and m.metrics:
            _report(m, step - 1)
        m.sae.eval()
        summary: dict[str, Any] = {
            "n_steps": step,
            "n_tokens": n_tokens,
            "d_model": d_model,
            "d_sae": m.sae.cfg.d_sae,
            "norm_scale": float(m.sae.norm_scale),
            "dead_frac": float(m.sae.dead_mask().float().mean()),
            "resumed_from_step": resumed_from,
            "train_seconds": seconds,
            "tokens_per_s": (n_tokens - tokens_before) / seconds if seconds > 0 else float("nan"),
            "bf16": bf16,
            **{f"last_epoch_{k}": v for k, v in m.running.means().items()},
        }
        results.append((m.sae, summary))
    return results


def _train_step(
    m: _Member, x_bd: Tensor, step: int, n_steps: int, autocast: contextlib.AbstractContextManager
) -> None:
    cfg, sae, opt = m.cfg, m.sae, m.opt
    for group in opt.param_groups:
        group["lr"] = lr_at(step, n_steps, cfg)
    with autocast:
        out = sae(x_bd, sparsity_coeff=sparsity_coeff_at(step, cfg), dense_f=False)
    opt.zero_grad(set_to_none=True)
    out.loss.float().backward()
    sae.remove_parallel_grads()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    opt.step()
    sae.normalise_decoder()
    sae.record_firing(out.fired, x_bd.shape[0])
    with torch.no_grad():
        m.metrics = _batch_metrics(x_bd, out)
    m.running.add(m.metrics, x_bd.shape[0])


def _report(m: _Member, step: int) -> None:
    values = {k: float(v) for k, v in m.metrics.items()}
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"training loss is {values['loss']} at step {step}")
    values["dead_frac"] = float(m.sae.dead_mask().float().mean())
    values["lr"] = m.opt.param_groups[0]["lr"]
    values["sparsity_coeff"] = sparsity_coeff_at(step, m.cfg)
    m.log(values, step)
    m.logged = step


def train_sae(
    make_batches: Callable[[int], Iterable[Tensor]],
    d_model: int,
    cfg: TrainConfig,
    log: LogFn = noop_log,
    progress: bool = True,
    n_steps: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool | Literal["auto"] = "auto",
) -> tuple[SAE, dict[str, Any]]:
    """Train one SAE (a sweep of one; see `train_saes`); returns it in eval mode and a summary."""
    [(sae, summary)] = train_saes(
        make_batches, d_model, [cfg], [log], progress, n_steps, checkpoint_dir, resume
    )
    return sae, summary


def _batch_metrics(x_bd: Tensor, out: Any) -> dict[str, Tensor]:
    """Training-batch metrics; FVU against the batch mean (scale-free, so any space gives it)."""
    x_hat = out.x_hat.float()
    err = (x_bd - x_hat).pow(2).sum()
    var = (x_bd - x_bd.mean(dim=0)).pow(2).sum()
    return {
        "loss": out.loss.detach().float(),
        "mse": out.mse.detach().float(),
        "l1": out.l1.detach().float(),
        "aux": out.aux.detach().float(),
        "sparsity": out.sparsity.detach().float(),
        "l0": out.l0.float(),
        "fvu": err / var.clamp_min(1e-12),
    }
