"""Minimal RLVR with DyCo advantage reweighting: GRPO, Dr. GRPO, DAPO, GSPO and SAPO (docs/method.md#advantage-reweighting, #policy-losses).

One file, read top to bottom: the configuration, DyCo as one function from (trace, rewards) to
advantages, the pieces of a step (sample with online tracing, reward, update), then the loop with
its logging, evaluation and checkpoints. Each training step:

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

A run directory holds ``config.json``, ``metrics.jsonl`` (one record per step and per evaluation),
``metrics.csv`` / ``eval.csv``, ``checkpoint.pt`` (model, optimiser, scheduler, RNG states, step and
data position; written atomically) and ``model/`` (the final policy, loadable with
``dyco_probe.models.loading.load``). ``train(config)`` with ``resume=True`` continues a killed run;
on CPU the continuation is identical to an uninterrupted run.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dyco_probe.distances import DISTANCES
from dyco_probe.files import atomic_path, write_text_atomic
from dyco_probe.generation import suppressed_tokens
from dyco_probe.labellers import check_options, get_labeller
from dyco_probe.losses import LOSSES, LossConfig, dynamic_sampling_mask, policy_loss
from dyco_probe.roles import Role
from dyco_probe.scoring import (
    GRANULARITIES,
    NORMALISE_OVER,
    ScorerConfig,
    dyco_advantages,
    group_advantages,
    normalised_ratios,
    reweight_advantages,
    score_tokens,
)

__all__ = [
    "RLConfig",
    "RunResult",
    "Rollout",
    "advantages_from_trace",
    "compute_rewards",
    "rollout_roles",
    "sample_rollout",
    "train",
]

CHECKPOINT = "checkpoint.pt"
SYNTHETIC_TRAIN, SYNTHETIC_EVAL = 2000, 200  # examples of the synthetic task when n_train / n_eval are unset
METRICS = "metrics.jsonl"


@dataclass
class RLConfig:
    """Every knob of a training run, with its default. ``train`` checks them before doing any work.

    Run:
        out_dir: run directory (metrics, checkpoints, final model).
        model: ``"builtin"`` or a local checkpoint directory (ignored when ``train`` gets a handle).
        device, dtype: as for ``dyco_probe.models.loading.load``.
        seed: seeds python, numpy and torch at the start of a run.
        steps: training steps; one step = one batch of ``prompts_per_step × num_generations`` samples.
        resume: continue from ``out_dir/checkpoint.pt``; without it an existing checkpoint is an error.
        threads: ``torch.set_num_threads`` for the run (``None``: leave torch's setting).

    Data:
        data: a VLM-R1 jsonl of training examples; ``None``: the synthetic task's train split.
        n_train: number of training examples: the first ``n_train`` of ``data`` or of the synthetic
            split (``None``: every line of ``data``, or 2000 of the synthetic split; 0: all of ``data``).
        eval_data: a jsonl of held-out examples; ``None``: the synthetic split ``eval_split``.
        eval_split: held-out synthetic split.
        n_eval: number of held-out examples: the first ``n_eval`` of ``eval_data`` or of the synthetic
            split (``None``: every line of ``eval_data``, or 200 of the synthetic split; 0 disables
            evaluation).
        eval_every: evaluate every so many steps (and always before the first and after the last
            step); 0: only before and after.
        eval_max_new_tokens, eval_batch_size: greedy decoding for evaluation.

    Sampling:
        prompts_per_step: prompts per step.
        num_generations: G, completions per prompt (>= 2: group advantages need a spread).
        max_new_tokens, temperature, top_p: sampling; the log-probabilities use the same temperature.

    Rewards:
        reward_weights: weight of each reward function by name; the reward is their weighted sum.
            The built-in functions are ``accuracy`` and ``format`` (``dyco_probe.rewards``).

    DyCo (docs/method.md#advantage-reweighting):
        dyco: ``"token"`` (paper), ``"sequence"`` (published code) or ``"off"`` (baseline; no tracing).
        alpha, normalise_over, min_length, tau_vis, tau_txt: scorer knobs (``ScorerConfig``).
        trace_layers: probed layers (``None``: the last; ``"all"``; or indices).
        roles: where the token roles come from: ``"fisher_rao"`` (docs/method.md#token-roles on the traced dynamics, with
            ``tau_vis``, ``tau_txt``) or any other labeller of ``dyco_probe.labellers``, run on each
            batch's rollout, e.g. ``"visual_dependency"`` (one extra teacher-forced forward per batch,
            real and counterfactual image together) or ``"ground_truth"`` (synthetic task, an oracle).
            ``s_t`` still reads the traced attention ratios.
        role_options: options of that labeller (e.g. ``{"counterfactual": "patches"}``); a labeller
            that compares next-token distributions gets the sampling ``temperature`` unless they set one.
        trace_when_off: also trace and score baseline runs, for the role and ``s_t`` metrics only
            (costs the tracing time; advantages unchanged).

    Optimisation (docs/method.md#policy-losses):
        algo: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo`` or ``sapo``.
        beta: KL coefficient (``None``: 0.04, and 0 for DAPO). With ``beta = 0`` no reference model
            is kept and KL is not logged.
        eps, eps_low, eps_high, gspo_eps_low, gspo_eps_high, sapo_tau_pos, sapo_tau_neg: loss knobs
            (``LossConfig``; ``eps_low``/``eps_high`` are DAPO's decoupled clip).
        num_iterations: policy updates per batch (μ); above 1 the ratio uses the log-probabilities
            of the sampling policy, computed before the first update.
        grad_accum: micro-batches the batch is split into; gradients accumulate over them into
            one optimiser step per iteration, with the same result as the whole batch at once.
        lr, weight_decay, adam_betas, warmup_steps, max_grad_norm: AdamW with linear warm-up
            (over optimiser steps) then a constant rate, and gradient-norm clipping.
        freeze_vision: train the language model only; the vision tower (and Qwen's patch merger)
            keeps its weights, as when it was pretrained per image patch.
        dynamic_sampling: DAPO's filter: drop groups whose rewards are all equal and sample more
            prompts, up to ``dynamic_sampling_rounds`` extra rounds, to fill the batch.
        mask_truncated: leave completions without EOS out of the loss (``None``: only for DAPO).

    Logging:
        checkpoint_every: steps between checkpoints (0: only at the end).
        tensorboard: also log to TensorBoard under ``out_dir/tb`` (needs ``tensorboard``).
    """

    # run
    out_dir: str = "runs/rl"
    model: str = "builtin"
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    steps: int = 150
    resume: bool = False
    threads: int | None = None
    # data
    data: str | None = None
    n_train: int | None = None
    eval_data: str | None = None
    eval_split: str = "test"
    n_eval: int | None = None
    eval_every: int = 50
    eval_max_new_tokens: int = 96
    eval_batch_size: int = 64
    # sampling
    prompts_per_step: int = 8
    num_generations: int = 8
    max_new_tokens: int = 72
    temperature: float = 1.0
    top_p: float = 1.0
    # rewards
    reward_weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    # DyCo
    dyco: str = "token"
    alpha: float = 0.2
    normalise_over: str = "group"
    min_length: int = 0
    tau_vis: float = 0.0
    tau_txt: float = 0.05
    trace_layers: str | tuple[int, ...] | None = None
    roles: str = "fisher_rao"
    role_options: dict[str, float | str] = field(default_factory=dict)
    trace_when_off: bool = False
    # optimisation
    algo: str = "grpo"
    beta: float | None = None
    eps: float = 0.2
    eps_low: float = 0.2
    eps_high: float = 0.28
    gspo_eps_low: float = 3e-4
    gspo_eps_high: float = 4e-4
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    num_iterations: int = 1
    grad_accum: int = 1
    lr: float = 3e-5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    freeze_vision: bool = True
    dynamic_sampling: bool = False
    dynamic_sampling_rounds: int = 3
    mask_truncated: bool | None = None
    # logging
    checkpoint_every: int = 50
    tensorboard: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.algo in LOSSES, f"unknown loss {self.algo!r}; valid: {', '.join(LOSSES)}")
        need(
            self.dyco in GRANULARITIES,
            f"unknown DyCo granularity {self.dyco!r}; valid: {', '.join(GRANULARITIES)}",
        )
        need(
            self.normalise_over in NORMALISE_OVER,
            f"unknown normalise_over {self.normalise_over!r}; valid: {', '.join(NORMALISE_OVER)}",
        )
        need(
            self.num_generations >= 2,
            f"num_generations (G) must be >= 2: group advantages of a single completion are always 0 "
            f"(got {self.num_generations})",
        )
        for name in ("prompts_per_step", "max_new_tokens", "num_iterations", "grad_accum"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "steps",
            "n_train",
            "n_eval",
            "eval_every",
            "checkpoint_every",
            "warmup_steps",
            "min_length",
        ):
            value = getattr(self, name)
            need(value is None or value >= 0, f"{name} must be >= 0, got {value}")
        need(self.dynamic_sampling_rounds >= 0, "dynamic_sampling_rounds must be >= 0")
        need(
            self.grad_accum <= self.prompts_per_step * self.num_generations,
            f"grad_accum ({self.grad_accum}) exceeds the batch of "
            f"{self.prompts_per_step * self.num_generations} samples",
        )
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        need(self.beta is None or self.beta >= 0, f"beta must be >= 0, got {self.beta}")
        need(self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}")
        need(bool(self.reward_weights), "reward_weights is empty: no reward to optimise")
        need(self.threads is None or self.threads >= 1, "threads must be >= 1")
        need(
            self.roles != "fisher_rao" or not self.role_options,
            "role_options are for other labellers: the fisher_rao roles use tau_vis and tau_txt",
        )
        check_options(self.roles, self.role_options)
        self.adam_betas = tuple(self.adam_betas)
        if isinstance(self.trace_layers, list):
            self.trace_layers = tuple(self.trace_layers)

    # -- derived settings -------------------------------------------------------------------------

    @property
    def kl_beta(self) -> float:
        """The KL coefficient in use: ``beta``, or its per-loss default (0.04; DAPO 0)."""
        if self.beta is not None:
            return self.beta
        return 0.0 if self.algo == "dapo" else 0.04

    @property
    def masks_truncated(self) -> bool:
        return self.algo == "dapo" if self.mask_truncated is None else self.mask_truncated

    @property
    def trace_distance(self) -> str:
        """The distance the rollouts' dynamics are traced with: the labeller's, for a distance rule."""
        return self.roles if self.roles in DISTANCES else "fisher_rao"

    @property
    def traces(self) -> bool:
        """Whether sampling traces attention (DyCo on, or baseline metrics asked for)."""
        return self.dyco != "off" or self.trace_when_off

    def labeller_options(self) -> dict:
        """``role_options``, and the sampling temperature for a labeller that compares next-token
        distributions (``visual_dependency``), unless the options set one."""
        options = dict(self.role_options)
        if "temperature" in inspect.signature(get_labeller(self.roles)).parameters:
            options.setdefault("temperature", self.temperature)
        return options

    def scorer(self) -> ScorerConfig:
        return ScorerConfig(
            granularity=self.dyco,
            alpha=self.alpha,
            tau_vis=self.tau_vis,
            tau_txt=self.tau_txt,
            normalise_over=self.normalise_over,
            min_length=self.min_length,
        )

    def loss_config(self) -> LossConfig:
        return LossConfig(
            eps=self.eps,
            beta=self.kl_beta,
            dapo_beta=self.kl_beta,
            eps_low=self.eps_low,
            eps_high=self.eps_high,
            gspo_eps_low=self.gspo_eps_low,
            gspo_eps_high=self.gspo_eps_high,
            sapo_tau_pos=self.sapo_tau_pos,
            sapo_tau_neg=self.sapo_tau_neg,
            max_completion_length=self.max_new_tokens,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        if isinstance(self.trace_layers, tuple):
            d["trace_layers"] = list(self.trace_layers)
        return d

    @classmethod
    def from_run(cls, out_dir, **overrides) -> RLConfig:
        """The settings of the run in ``out_dir`` (its ``config.json``), to resume it.

        ``overrides`` may change what leaves the results as they are (``RESUME_SAFE``: ``steps``,
        ``eval_every``, ``threads``, ...; ``train`` records the change in ``metrics.jsonl``); any
        other setting that differs from the run's is a ``ValueError`` naming it, since the
        continuation would no longer be the run it claims to be.
        """
        path = Path(out_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{out_dir} holds no run to resume (no config.json); start it without --resume / resume=True"
            )
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); the run's settings cannot be read") from e
        known = {f.name for f in dataclasses.fields(cls)}
        base = cls(**{k: v for k, v in saved.items() if k in known})
        config = dataclasses.replace(base, **overrides, out_dir=str(out_dir), resume=True)
        resume_changes(base.to_dict(), config)
        return config


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


# -- sampling with online tracing ------------------------------------------------------------------


@dataclass
class Signals:
    """The trace tensors DyCo needs, ``[B, T]`` each (a ``Trace`` reduced to what the scorer reads)."""

    r_vis: Tensor
    r_txt: Tensor
    v_vis: Tensor
    v_txt: Tensor


@dataclass
class Rollout:
    """Sampled completions of a step: G rows per prompt, right-padded ``[B, T]`` tensors.

    ``examples[i]`` is row i's example, ``group_ids[i]`` its prompt's group; ``mask`` is True up to
    and including the first EOS; ``truncated`` marks rows without EOS; ``signals`` is ``None`` when
    nothing was traced. ``rewards`` (weighted sum) and ``reward_parts`` (per function) are filled by
    ``compute_rewards``.
    """

    examples: list
    group_ids: Tensor
    completion_ids: Tensor
    mask: Tensor
    truncated: Tensor
    texts: list[str]
    signals: Signals | None = None
    rewards: Tensor | None = None
    reward_parts: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def select(self, rows: Tensor) -> Rollout:
        """The rollout restricted to ``rows`` (indices or a bool mask), trimmed to its longest row."""
        idx = rows.nonzero().flatten() if rows.dtype == torch.bool else rows
        mask = self.mask[idx]
        t = int(mask.sum(-1).max()) if len(idx) else 0
        cut = lambda x: x[idx][:, :t]  # noqa: E731
        return Rollout(
            examples=[self.examples[i] for i in idx.tolist()],
            group_ids=self.group_ids[idx],
            completion_ids=cut(self.completion_ids),
            mask=cut(self.mask),
            truncated=self.truncated[idx],
            texts=[self.texts[i] for i in idx.tolist()],
            signals=None
            if self.signals is None
            else Signals(*(cut(v) for v in asdict(self.signals).values())),
            rewards=None if self.rewards is None else self.rewards[idx],
            reward_parts={k: v[idx] for k, v in self.reward_parts.items()},
        )

    @staticmethod
    def cat(parts: Sequence[Rollout]) -> Rollout:
        """Concatenate rollouts (padding to the longest); group ids are kept distinct."""
        t = max(p.mask.shape[1] for p in parts)

        def pad(x: Tensor, value=0) -> Tensor:
            return torch.nn.functional.pad(x, (0, t - x.shape[1]), value=value)

        groups, total = [], 0
        for p in parts:  # renumber each part's groups after the previous part's
            _, dense = torch.unique(p.group_ids, return_inverse=True)
            groups.append(dense + total)
            total += int(dense.max()) + 1 if len(p) else 0
        sig = None
        if all(p.signals is not None for p in parts):
            sig = Signals(
                *(
                    torch.cat([pad(getattr(p.signals, k)) for p in parts])
                    for k in ("r_vis", "r_txt", "v_vis", "v_txt")
                )
            )
        return Rollout(
            examples=[e for p in parts for e in p.examples],
            group_ids=torch.cat(groups),
            completion_ids=torch.cat([pad(p.completion_ids) for p in parts]),
            mask=torch.cat([pad(p.mask, False) for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
            texts=[s for p in parts for s in p.texts],
            signals=sig,
            rewards=None if any(p.rewards is None for p in parts) else torch.cat([p.rewards for p in parts]),
            reward_parts={k: torch.cat([p.reward_parts[k] for p in parts]) for k in parts[0].reward_parts},
        )


def _eos_ids(handle) -> list[int]:
    eos = handle.model.generation_config.eos_token_id
    eos = handle.tokenizer.eos_token_id if eos is None else eos
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _prompts_and_images(handle, examples) -> tuple[list[str], list[list]]:
    images = [ex.load_images() for ex in examples]
    return [handle.prompt(ex.question, len(ims)) for ex, ims in zip(examples, images)], images


def sample_rollout(
    handle,
    examples: Sequence,
    num_generations: int,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    trace: bool = True,
    trace_layers=None,
    distance: str = "fisher_rao",
) -> Rollout:
    """Sample ``num_generations`` completions for each example in one ``generate`` call, tracing the
    attention online when ``trace`` (``dyco_probe.tracing.Tracer``; nothing is recomputed), the
    dynamics measured with ``distance``."""
    from dyco_probe.tracing import TraceConfig, Tracer

    prompts, images = _prompts_and_images(handle, examples)
    inputs = handle.encode(prompts, images)
    tok = handle.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        top_k=0,
        num_return_sequences=num_generations,
        pad_token_id=pad_id,
        suppress_tokens=suppressed_tokens(handle.model) or None,
    )
    was_training = handle.model.training
    handle.model.eval()
    try:
        with torch.no_grad():
            if trace:
                config = TraceConfig(layers=trace_layers, distance=distance)
                with Tracer(handle.model, config, image_token_id=handle.image_token_id) as tracer:
                    sequences = handle.model.generate(**inputs, **gen_kwargs)
                traced = tracer.finish(sequences)
            else:
                sequences = handle.model.generate(**inputs, **gen_kwargs)
    finally:
        handle.model.train(was_training)

    ids = sequences[:, inputs["input_ids"].shape[1] :].cpu()
    is_eos = torch.isin(ids, torch.tensor(_eos_ids(handle)))
    mask = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # up to and including the first EOS
    t = int(mask.sum(-1).max())
    ids, mask = ids[:, :t], mask[:, :t]
    truncated = ~(is_eos[:, :t] & mask).any(-1)
    signals = None
    if trace:
        if traced.num_tokens < t:
            raise RuntimeError(f"the trace has {traced.num_tokens} tokens, the completions {t}")
        signals = Signals(*(getattr(traced, k)[:, :t].float() for k in ("r_vis", "r_txt", "v_vis", "v_txt")))
    texts = [tok.decode(row[m].tolist(), skip_special_tokens=True).strip() for row, m in zip(ids, mask)]
    return Rollout(
        examples=[ex for ex in examples for _ in range(num_generations)],
        group_ids=torch.arange(len(examples)).repeat_interleave(num_generations),
        completion_ids=ids,
        mask=mask,
        truncated=truncated,
        texts=texts,
        signals=signals,
    )


def rollout_roles(
    handle, rollout: Rollout, labeller: str, options: dict | None = None, *, distance: str = "fisher_rao"
) -> Tensor:
    """Roles ``[B, T]`` of a traced rollout's tokens from a labeller of ``dyco_probe.labellers``.

    The labeller sees the rollout as a ``Trace`` (its tokens, traced signals and examples, dynamics
    measured with ``distance``) and gets the handle, so labellers that run the model
    (``visual_dependency``) score the tokens under the current policy."""
    from dyco_probe.tracing import Trace

    sig = rollout.signals
    if sig is None:
        raise ValueError("labelling a rollout needs its traced signals (sample it with trace=True)")
    r_vis_n, r_txt_n = normalised_ratios(sig.r_vis, sig.r_txt)
    trace = Trace(
        token_ids=rollout.completion_ids,
        mask=rollout.mask,
        r_vis=sig.r_vis,
        r_txt=sig.r_txt,
        r_vis_norm=r_vis_n,
        r_txt_norm=r_txt_n,
        v_vis=sig.v_vis,
        v_txt=sig.v_txt,
        samples=[{"example_id": ex.id} for ex in rollout.examples],
        metadata={"settings": {"distance": distance}},
    )
    return get_labeller(labeller)(
        trace, examples=rollout.examples, tokenizer=handle.tokenizer, handle=handle, **(options or {})
    )


def compute_rewards(
    rollout: Rollout, reward_funcs: dict[str, Callable], weights: dict[str, float]
) -> Rollout:
    """Fill ``rollout.rewards = Σ_k weight_k · reward_k(completions, answers)`` and the parts."""
    answers = [ex.answer for ex in rollout.examples]
    total = torch.zeros(len(rollout))
    for name, weight in weights.items():
        values = torch.tensor(reward_funcs[name](rollout.texts, answers), dtype=torch.float32)
        if values.shape != (len(rollout),):
            raise ValueError(
                f"reward {name!r} returned {tuple(values.shape)} values for {len(rollout)} completions"
            )
        rollout.reward_parts[name] = values
        total = total + weight * values
    rollout.rewards = total
    return rollout


# -- the policy update -----------------------------------------------------------------------------


def _micro_batches(handle, rollout: Rollout, n_chunks: int) -> list[tuple[Tensor, dict]]:
    """Split the rows into ``n_chunks`` teacher-forced batches ``(row indices, batch)``."""
    from dyco_probe.batching import teacher_forced_batch

    prompts, images = _prompts_and_images(handle, rollout.examples)
    out = []
    for rows in torch.arange(len(rollout)).tensor_split(min(n_chunks, len(rollout))):
        rows_l = rows.tolist()
        completions = [rollout.completion_ids[i][rollout.mask[i]].tolist() for i in rows_l]
        batch = teacher_forced_batch(
            handle, [prompts[i] for i in rows_l], [images[i] for i in rows_l], completions
        )
        out.append((rows, batch))
    return out


def _logprobs(model, batch, temperature: float, grad: bool) -> Tensor:
    from dyco_probe.batching import completion_logprobs

    with torch.set_grad_enabled(grad):
        logp, _ = completion_logprobs(model, batch, temperature=temperature)
    return logp


# -- data order, RNG and checkpoints ---------------------------------------------------------------


def _example_at(examples: Sequence, position: int, seed: int):
    """The example at a global data position: a fresh seeded shuffle per epoch, so the position
    alone (saved in checkpoints) fixes the order."""
    n = len(examples)
    epoch, i = divmod(position, n)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return examples[int(order[i])]


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _lr_lambda(warmup_steps: int):
    return lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0


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


class _Log:
    """``metrics.jsonl`` (append, flushed per record), CSV exports and optional TensorBoard."""

    def __init__(self, out_dir: Path, keep_until: int | None, tensorboard: bool):
        self.path = out_dir / METRICS
        self.out_dir = out_dir
        self.records: list[dict] = []
        if keep_until is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if rec["step"] <= keep_until:  # drop what a killed run logged after its checkpoint
                    self.records.append(rec)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except ImportError:
                warnings.warn("tensorboard is not installed; logging to jsonl/csv only", stacklevel=2)

    def write(self, record: dict) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "kind"):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def export_csv(self) -> None:
        for kind, name in (("train", "metrics.csv"), ("eval", "eval.csv")):
            rows = [r for r in self.records if r["kind"] == kind]
            if not rows:
                continue
            columns = list(dict.fromkeys(k for r in rows for k in r))
            with atomic_path(self.out_dir / name) as tmp, tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


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
    out_dir = Path(config.out_dir)
    ckpt_path = out_dir / CHECKPOINT
    if ckpt_path.exists() and not config.resume:
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
    _seed_everything(config.seed)
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
    scorer, loss_cfg = config.scorer(), config.loss_config()

    start, position, initial_eval, last_eval = 0, 0, None, None
    changes: dict = {}
    if config.resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changes = resume_changes(state["config"], config)
        if config.steps < state["step"]:
            raise ValueError(f"steps = {config.steps} is below the {state['step']} steps {out_dir} has done")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, position = state["step"], state["data_position"]
        initial_eval, last_eval = state["initial_eval"], state["last_eval"]
    write_text_atomic(out_dir / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    log = _Log(out_dir, keep_until=start if start > 0 else -1, tensorboard=config.tensorboard)
    if changes:  # what a resume changed, where the run's history is
        log.write({"kind": "resume", "step": start, "changed": changes})

    def save_checkpoint(step: int) -> None:
        state = {
            "step": step,
            "data_position": position,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "config": config.to_dict(),
            "initial_eval": initial_eval,
            "last_eval": last_eval,
        }
        _atomic_save(state, ckpt_path)
        log.export_csv()

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
                    rollout.signals, rollout.rewards, rollout.group_ids, rollout.mask, scorer, roles=roles
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
                save_checkpoint(step)
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

    model_dir = out_dir / "model"
    if config.steps > start or not model_dir.exists():
        _save_model(handle, model_dir)
    log.export_csv()
    return RunResult(
        out_dir=str(out_dir),
        steps=config.steps,
        resumed_from=start,
        initial_eval=initial_eval,
        final_eval=last_eval,
        last_metrics=last,
        model_dir=str(model_dir),
    )


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
    chunks = _micro_batches(handle, rollout, config.grad_accum)
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
        ref = _logprobs(ref_model, batch, config.temperature, grad=False) if ref_model is not None else None
        old = _logprobs(model, batch, config.temperature, grad=False) if config.num_iterations > 1 else None
        fixed.append((ref, old, int(t)))

    totals: dict[str, float] = {}
    grad_norms = []
    model.train()
    for _ in range(config.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        for (rows, batch), (ref, old, t) in zip(chunks, fixed):
            logp = _logprobs(model, batch, config.temperature, grad=True)
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


def _save_model(handle, path: Path) -> Path:
    """Save the policy and its processor with ``save_pretrained`` (loadable with ``load(path)``)."""
    tmp = path.with_name(f".{path.name}.tmp")
    handle.model.save_pretrained(tmp)
    handle.processor.save_pretrained(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        os.replace(path, old)
        os.replace(tmp, path)
        import shutil

        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


# Settings a resumed run may change: where and how fast it runs, how long, how often it evaluates
# and checkpoints. Everything else decides what the run computes.
RESUME_SAFE = (
    "out_dir",
    "resume",
    "steps",
    "threads",
    "device",
    "eval_every",
    "checkpoint_every",
    "tensorboard",
)


def resume_changes(saved: dict, config: RLConfig) -> dict[str, list]:
    """The resume-safe settings in which ``config`` differs from a run's saved ones, as
    ``{name: [saved, now]}``; a difference in any other setting is a ``ValueError`` naming each."""
    now = config.to_dict()
    changed = {k: [saved.get(k), now[k]] for k in now if k in saved and saved[k] != now[k]}
    unsafe = {k: v for k, v in changed.items() if k not in RESUME_SAFE}
    if unsafe:
        listed = "; ".join(
            f"{k}: the run has {old!r}, now {new!r}" for k, (old, new) in sorted(unsafe.items())
        )
        raise ValueError(
            f"resuming {config.out_dir} with settings that differ from the run's ({listed}); a resumed run "
            "keeps its settings (only " + ", ".join(RESUME_SAFE[2:]) + " may change): drop those options, "
            "or start a new run in another directory"
        )
    return {k: v for k, v in changed.items() if k not in ("out_dir", "resume")}
