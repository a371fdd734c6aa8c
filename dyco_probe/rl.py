"""Minimal RLVR with DyCo advantage reweighting: GRPO, Dr. GRPO, DAPO, GSPO and SAPO (docs/method.md#advantage-reweighting, #policy-losses).

Read top to bottom: DyCo as one function from (trace, rewards) to advantages, the pieces of a step,
then the loop with its logging, evaluation and checkpoints. The settings are one dataclass,
``RLConfig`` (``dyco_probe.rl_config``); the rollouts are ``dyco_probe.rollout``'s. Each training step:

1. takes ``prompts_per_step`` prompts and samples ``num_generations`` (G) completions for each,
   tracing the attention online during ``generate`` (skipped when ``dyco="off"``);
2. scores them with the reward functions (accuracy + format by default; any
   ``(completions, answers) -> list[float]``), weighted and summed;
3. turns rewards into group advantages and reweights them per token with the scorer
   (``dyco_probe.scoring``, the only place ``s_t`` is computed);
4. runs ``num_iterations`` policy updates on the batch with the chosen loss
   (``dyco_probe.losses``), k3 KL to a frozen copy of the initial model, AdamW, gradient clipping,
   and the batch split into ``grad_accum`` micro-batches.

Typical use::

    from dyco_probe.rl import RLConfig, train
    result = train(RLConfig(algo="grpo", dyco="token", steps=100, out_dir="runs/grpo-token"))
    result.final_eval["accuracy"]

The run directory (``dyco_probe.rundir.TrainingRun``) holds ``config.json``, ``metrics.jsonl`` (one
record per step and per evaluation), ``metrics.csv`` / ``eval.csv``, ``checkpoint.pt`` (model,
optimiser, scheduler, RNG states, step and data position; written atomically) and ``model/`` (the
final policy, loadable with ``dyco_probe.models.loading.load``). ``train(config)`` with
``resume=True`` continues a killed run; on CPU the continuation is identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from dyco_probe.files import write_text_atomic
from dyco_probe.losses import LossConfig, dynamic_sampling_mask, policy_loss
from dyco_probe.rl_config import RESUME_SAFE, RLConfig, resume_changes
from dyco_probe.roles import Role
from dyco_probe.rollout import (
    Rollout,
    Signals,
    compute_rewards,
    policy_batches,
    policy_logprobs,
    rollout_roles,
    sample_rollout,
)
from dyco_probe.rundir import TrainingRun
from dyco_probe.scoring import (
    ScorerConfig,
    dyco_advantages,
    group_advantages,
    reweight_advantages,
    score_tokens,
)
from dyco_probe.training import (
    MetricsLog,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_model,
    seed_everything,
    set_rng_state,
)

__all__ = [
    "RESUME_SAFE",
    "RLConfig",
    "RunResult",
    "Rollout",
    "Signals",
    "advantages_from_trace",
    "compute_rewards",
    "resume_changes",
    "rollout_roles",
    "sample_rollout",
    "train",
]

SYNTHETIC_TRAIN, SYNTHETIC_EVAL = 2000, 200  # examples of the synthetic task when n_train / n_eval are unset


# -- DyCo: (trace, rewards) -> advantages ----------------------------------------------------------


def advantages_from_trace(
    trace,
    rewards: Tensor,
    group_ids: Tensor,
    mask: Tensor,
    scorer: ScorerConfig,
    roles: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """DyCo (docs/method.md#advantage-reweighting): per-token advantages ``[B, T]`` from a trace and the rewards.

    Group advantages ``Â_i`` from ``rewards`` within each group, reweighted by the scorer at
    ``scorer.granularity``. ``trace`` is anything with ``[B, T]`` ``r_vis``, ``r_txt``, ``v_vis`` and
    ``v_txt`` (a ``dyco_probe.tracing.Trace``, or a ``Rollout``'s signals); it may be ``None`` for
    ``granularity="off"``. ``roles`` (``[B, T]``) replaces the roles (docs/method.md#token-roles) of the trace's dynamics
    (``rollout_roles``). Returns the advantages (0 off the mask) and the scorer's output (``None``
    without a trace).
    """
    mask = mask.to(torch.bool)
    if trace is None:
        if scorer.granularity != "off":
            raise ValueError(f"DyCo granularity {scorer.granularity!r} needs a trace")
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        adv = reweight_advantages(
            group_advantages(rewards, group_ids), zeros, zeros.long(), mask, granularity="off"
        )
        return adv, None
    scored = score_tokens(
        trace.r_vis, trace.r_txt, trace.v_vis, trace.v_txt, mask, scorer, roles=roles, group_ids=group_ids
    )
    return dyco_advantages(rewards, group_ids, scored, mask, scorer), scored


# -- one step: sample and reward (1-2), update (4) ---------------------------------------------------


def _sample_batch(handle, config: RLConfig, examples: Sequence, position: int, reward_funcs):
    """Steps 1-2: a rewarded ``Rollout`` of ``prompts_per_step`` groups from data ``position`` on.

    With DAPO's dynamic sampling, groups whose rewards are all equal are dropped and more prompts
    are sampled to refill, for at most ``dynamic_sampling_rounds`` extra rounds; the rollout may
    then hold fewer groups, or be ``None``. Returns ``(rollout, new position, groups sampled,
    generation seconds)``.
    """
    kept, n_sampled, seconds = [], 0, 0.0
    rounds = 1 + (config.dynamic_sampling_rounds if config.dynamic_sampling else 0)
    for _ in range(rounds):
        need = config.prompts_per_step - sum(int(r.group_ids.unique().numel()) for r in kept)
        batch = [_example_at(examples, position + k, config.seed) for k in range(need)]
        position, n_sampled = position + need, n_sampled + need
        t0 = time.perf_counter()
        rollout = sample_rollout(
            handle,
            batch,
            config.num_generations,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            trace=config.traces,
            trace_layers=config.trace_layers,
            distance=config.trace_distance,
        )
        seconds += time.perf_counter() - t0
        compute_rewards(rollout, reward_funcs, config.reward_weights)
        if not config.dynamic_sampling:
            return rollout, position, n_sampled, seconds
        rollout = rollout.select(dynamic_sampling_mask(rollout.rewards, rollout.group_ids))
        if len(rollout):
            kept.append(rollout)
        if sum(len(r) for r in kept) >= config.prompts_per_step * config.num_generations:
            break
    return (Rollout.cat(kept) if kept else None), position, n_sampled, seconds


def _update(
    config: RLConfig,
    handle,
    ref_model,
    optimizer,
    scheduler,
    rollout: Rollout,
    adv: Tensor,
    loss_mask: Tensor,
    loss_cfg: LossConfig,
) -> dict:
    """``num_iterations`` optimiser steps on one batch, each accumulating ``grad_accum`` micro-batches.

    Each micro-batch's loss is scaled by its share of the batch (sequences, or tokens for DAPO's
    token-level mean), so the accumulated gradient equals the whole batch's.
    """
    model = handle.model
    chunks = policy_batches(handle, rollout, config.grad_accum)
    n_seq = len(rollout)
    n_tok = int(loss_mask.sum())

    def share(rows: Tensor) -> float:
        if config.algo == "dapo":
            return int(loss_mask[rows].sum()) / max(n_tok, 1)
        return len(rows) / n_seq

    # Log-probabilities that stay fixed over the iterations: the reference policy's, and the
    # sampling policy's when the batch is reused (μ > 1; for μ = 1 the ratio is exactly 1).
    fixed = []
    model.eval()
    for _, batch in chunks:
        t = batch["completion_mask"].sum(-1).max()
        ref = (
            policy_logprobs(ref_model, batch, config.temperature, grad=False)
            if ref_model is not None
            else None
        )
        old = (
            policy_logprobs(model, batch, config.temperature, grad=False)
            if config.num_iterations > 1
            else None
        )
        fixed.append((ref, old, int(t)))

    totals: dict[str, float] = {}
    grad_norms = []
    model.train()
    for _ in range(config.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for (rows, batch), (ref, old, t) in zip(chunks, fixed):
            logp = policy_logprobs(model, batch, config.temperature, grad=True)
            w = share(rows)
            if w == 0:
                continue
            dev = logp.device
            loss, metrics = policy_loss(
                config.algo,
                logp,
                logp.detach() if old is None else old,
                adv[rows][:, :t].to(dev),
                loss_mask[rows][:, :t].to(dev),
                ref_logp=ref,
                config=loss_cfg,
                truncated=rollout.truncated[rows].to(dev) if config.masks_truncated else None,
            )
            (loss * w).backward()
            for k, v in {"loss": loss.item(), **metrics}.items():
                totals[k] = totals.get(k, 0.0) + w * v / config.num_iterations
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)))
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    out = {("kl" if k == "kl_mean" else k): v for k, v in totals.items()}
    if ref_model is None:
        out.pop("kl", None)  # without a reference the k3 term is 0 by construction
    out.update(grad_norm=float(np.mean(grad_norms)), lr=scheduler.get_last_lr()[0], loss_tokens=n_tok)
    if not all(math.isfinite(v) for v in out.values()):
        raise FloatingPointError(f"non-finite training metrics: {out}")
    return out


def _is_vision_parameter(name: str) -> bool:
    """Parameters of the vision tower: Qwen-VL's ``visual`` (patch merger included), LLaVA's
    ``vision_tower`` (its projector stays trainable)."""
    parts = name.split(".")
    return "visual" in parts or "vision_tower" in parts


# -- the loop --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """What ``train`` returns: where the run lives and its first and last evaluations."""

    out_dir: str
    steps: int
    resumed_from: int
    initial_eval: dict | None
    final_eval: dict | None
    last_metrics: dict
    model_dir: str | None

    def summary(self) -> dict:
        return asdict(self)


def train(
    config: RLConfig,
    handle=None,
    *,
    reward_funcs: dict[str, Callable] | None = None,
    train_examples: Sequence | None = None,
    eval_examples: Sequence | None = None,
    progress: bool = True,
) -> RunResult:
    """Train a policy with RLVR and DyCo reweighting; see the module docstring for one step.

    Args:
        config: the run's settings (checked when it is built).
        handle: a ``ModelHandle`` holding the *initial* policy (also the KL reference); ``None``
            loads ``config.model``. On resume the policy weights come from the checkpoint.
        reward_funcs: reward functions by name, ``(completions, answers) -> list[float]``
            (default: ``dyco_probe.rewards.DEFAULT_REWARDS``); ``config.reward_weights`` picks and
            weights them.
        train_examples, eval_examples: ``Example`` lists instead of ``config``'s data.
        progress: show a progress bar.

    Returns:
        A ``RunResult``; everything else is in ``config.out_dir``.
    """
    from tqdm.auto import tqdm

    from dyco_probe.rewards import DEFAULT_REWARDS

    # Everything that can be wrong with the request fails here, before any model is loaded.
    reward_funcs = dict(DEFAULT_REWARDS if reward_funcs is None else reward_funcs)
    unknown = set(config.reward_weights) - set(reward_funcs)
    if unknown:
        raise ValueError(f"no reward function named {sorted(unknown)}; have {sorted(reward_funcs)}")
    run = TrainingRun(config.out_dir)
    out_dir = run.root
    if run.checkpoint.exists() and not config.resume:
        raise ValueError(
            f"{out_dir} already holds a run; resume it (resume=True / --resume) or pick another out_dir"
        )
    train_examples, eval_examples = _load_data(config, train_examples, eval_examples)
    if config.threads:
        torch.set_num_threads(config.threads)
    if handle is None:
        from dyco_probe.models.loading import load

        handle = load(config.model, device=config.device, dtype=config.dtype)

    out_dir.mkdir(parents=True, exist_ok=True)
    model = handle.model
    seed_everything(config.seed)
    ref_model = None
    if config.kl_beta > 0:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    if config.freeze_vision:
        for name, p in model.named_parameters():
            if _is_vision_parameter(name):
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config.warmup_steps))
    loss_cfg = config.loss_config()

    start, position, initial_eval, last_eval = 0, 0, None, None
    changes: dict = {}
    state = load_checkpoint(run.checkpoint) if config.resume else None
    if state is not None:
        changes = resume_changes(state["config"], config)
        if config.steps < state["step"]:
            raise ValueError(f"steps = {config.steps} is below the {state['step']} steps {out_dir} has done")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start, position = state["step"], state["data_position"]
        initial_eval, last_eval = state["initial_eval"], state["last_eval"]
    write_text_atomic(run.config, json.dumps(config.to_dict(), indent=2) + "\n")
    log = MetricsLog(out_dir, keep_until=start if start > 0 else -1, tensorboard=config.tensorboard)
    if changes:  # what a resume changed, where the run's history is
        log.write({"kind": "resume", "step": start, "changed": changes})

    def checkpoint(step: int) -> None:
        state = {
            "step": step,
            "data_position": position,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "config": config.to_dict(),
            "initial_eval": initial_eval,
            "last_eval": last_eval,
        }
        save_checkpoint(state, run.checkpoint)
        log.export_csv(TrainingRun.CSV)

    if start == 0 and eval_examples:
        initial_eval = last_eval = _evaluate(handle, eval_examples, config, 0)
        log.write(initial_eval)
    last: dict = {}
    bar = tqdm(total=config.steps, initial=start, desc=f"{config.algo}/{config.dyco}", disable=not progress)
    try:
        for step in range(start + 1, config.steps + 1):
            t_step = time.perf_counter()
            timing = {"time_roles": 0.0, "time_score": 0.0}

            # 1-2. Sample G completions per prompt (traced online) and reward them.
            rollout, position, n_groups_sampled, timing["time_generate"] = _sample_batch(
                handle, config, train_examples, position, reward_funcs
            )
            if rollout is None:  # dynamic sampling found no group with a reward spread
                record = {"kind": "train", "step": step, "skipped": 1, "groups_sampled": n_groups_sampled}
            else:
                # 3. DyCo: (trace, rewards) -> per-token advantages, with roles from the labeller.
                roles = None
                if config.roles != "fisher_rao" and rollout.signals is not None:
                    t0 = time.perf_counter()
                    roles = rollout_roles(
                        handle,
                        rollout,
                        config.roles,
                        config.labeller_options(),
                        distance=config.trace_distance,
                    )
                    timing["time_roles"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                adv, scored = advantages_from_trace(
                    rollout.signals,
                    rollout.rewards,
                    rollout.group_ids,
                    rollout.mask,
                    config.scorer,
                    roles=roles,
                )
                timing["time_score"] = time.perf_counter() - t0

                # 4. Policy update(s).
                t0 = time.perf_counter()
                loss_mask = rollout.mask.clone()
                if config.masks_truncated:
                    loss_mask &= ~rollout.truncated.unsqueeze(-1)
                update = _update(
                    config, handle, ref_model, optimizer, scheduler, rollout, adv, loss_mask, loss_cfg
                )
                timing["time_update"] = time.perf_counter() - t0
                record = {
                    "kind": "train",
                    "step": step,
                    **_step_metrics(rollout, adv, scored, loss_mask, n_groups_sampled),
                    **update,
                }
            record.update(timing, data_position=position)
            record["time_step"] = time.perf_counter() - t_step
            log.write(record)
            last = record

            if eval_examples and (
                step == config.steps or (config.eval_every and step % config.eval_every == 0)
            ):
                last_eval = _evaluate(handle, eval_examples, config, step)
                log.write(last_eval)
            if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                checkpoint(step)
            bar.update(1)
            bar.set_postfix(
                reward=f"{record.get('reward', float('nan')):.2f}",
                acc=f"{record.get('accuracy', float('nan')):.2f}",
                eval=f"{last_eval['accuracy']:.3f}" if last_eval else "-",
            )
    finally:
        bar.close()
        log.close()
        for name, p in model.named_parameters():  # hand the model back as it came, frozen or not
            p.requires_grad_(trainable[name])

    model_dir = run.model
    if config.steps > start or not model_dir.exists():
        save_model(handle.model, handle.processor, model_dir)
    log.export_csv(TrainingRun.CSV)
    return RunResult(
        out_dir=str(out_dir),
        steps=config.steps,
        resumed_from=start,
        initial_eval=initial_eval,
        final_eval=last_eval,
        last_metrics=last,
        model_dir=str(model_dir),
    )


# -- data and evaluation ---------------------------------------------------------------------------


def _load_data(config: RLConfig, train_examples, eval_examples):
    from dyco_probe.data import read_jsonl, synthetic_examples

    if train_examples is None:
        if config.data:
            train_examples = read_jsonl(config.data)
            train_examples = train_examples[: config.n_train] if config.n_train else train_examples
        else:
            n = SYNTHETIC_TRAIN if config.n_train is None else config.n_train
            train_examples = synthetic_examples("train", n)
    if not train_examples:
        raise ValueError("the training set is empty (n_train = 0 or an empty data file)")
    if eval_examples is None:
        if config.n_eval == 0:
            eval_examples = []
        elif config.eval_data:
            eval_examples = read_jsonl(config.eval_data)[: config.n_eval]
        else:
            n = SYNTHETIC_EVAL if config.n_eval is None else config.n_eval
            eval_examples = synthetic_examples(config.eval_split, n)
    return list(train_examples), list(eval_examples)


def _example_at(examples: Sequence, position: int, seed: int):
    """The example at a global data position: a fresh seeded shuffle per epoch, so the position
    alone (saved in checkpoints) fixes the order."""
    n = len(examples)
    epoch, i = divmod(position, n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return examples[int(order[i])]


def _lr_lambda(warmup_steps: int):
    return lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _evaluate(handle, examples, config: RLConfig, step: int) -> dict:
    from dyco_probe.evaluation import evaluate

    t0 = time.perf_counter()
    res = evaluate(
        handle,
        examples,
        max_new_tokens=config.eval_max_new_tokens,
        batch_size=config.eval_batch_size,
        progress=False,
    )
    lo, hi = res.accuracy_ci
    record = {
        "kind": "eval",
        "step": step,
        "accuracy": res.accuracy,
        "accuracy_ci_low": lo,
        "accuracy_ci_high": hi,
        "format": res.format_rate,
        "n": res.n,
        "time_eval": time.perf_counter() - t0,
    }
    problems = [getattr(ex, "problem", None) for ex in examples]
    if all(p is not None for p in problems) and any(p.note is not None for p in problems):
        from dyco_probe.task.notes import note_summary

        record.update(
            note_summary(
                problems, [r["completion"] for r in res.records], [r["correct"] for r in res.records]
            )
        )
    return record


# -- metrics ---------------------------------------------------------------------------------------


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    return x[mask] if mask.any() else torch.zeros(1)


def _step_metrics(rollout: Rollout, adv: Tensor, scored, loss_mask: Tensor, n_groups_sampled: int) -> dict:
    lengths = rollout.mask.sum(-1).float()
    groups = rollout.group_ids
    m = {
        "reward": float(rollout.rewards.mean()),
        "reward_std": float(rollout.rewards.std()) if len(rollout) > 1 else 0.0,
        **{k: float(v.mean()) for k, v in rollout.reward_parts.items()},
        "completion_length": float(lengths.mean()),
        "completion_length_min": float(lengths.min()),
        "completion_length_max": float(lengths.max()),
        "truncated_fraction": float(rollout.truncated.float().mean()),
        "groups": int(groups.unique().numel()),
        "groups_sampled": n_groups_sampled,
        "frac_reward_zero_std": 1.0 - float(dynamic_sampling_mask(rollout.rewards, groups).float().mean()),
    }
    a = _masked(adv, loss_mask)
    m.update(
        adv_mean=float(a.mean()),
        adv_std=float(a.std()) if a.numel() > 1 else 0.0,
        adv_abs=float(a.abs().mean()),
    )
    if scored is not None:
        mask = rollout.mask
        roles = scored["roles"][mask]
        active = roles != Role.NEUTRAL
        s, w = scored["s"][mask], scored["w"][mask]
        m.update(
            role_visual=float((roles == Role.VISUAL).float().mean()),
            role_text=float((roles == Role.TEXT).float().mean()),
            role_neutral=float((roles == Role.NEUTRAL).float().mean()),
            s_mean=float(s.mean()),
            s_mean_active=float(s[active].mean()) if active.any() else 0.0,
            w_std=float(w.std()) if w.numel() > 1 else 0.0,
            w_min=float(w.min()),
            w_max=float(w.max()),
            seq_score_mean=float(scored["sequence_score"].mean()),
            seq_score_std=float(scored["sequence_score"].std()) if len(rollout) > 1 else 0.0,
        )
    return m
