"""The settings of an RL run (``dyco_probe.rl``): one dataclass, every knob with its default, checked
when it is built, and what a resumed run may change.

The scorer's and the loss's own settings live in ``ScorerConfig`` and ``LossConfig`` with their
defaults; an ``RLConfig`` holds one of each and takes their knobs by name as well, so
``RLConfig(dyco="sequence", alpha=0.3, eps_high=0.3)`` and ``RLConfig(scorer=ScorerConfig(...))`` say
the same, and a run's ``config.json`` has one key per setting.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

from dyco_probe.distances import DISTANCES
from dyco_probe.labellers import check_options, get_labeller
from dyco_probe.losses import LOSSES, LossConfig
from dyco_probe.scoring import ScorerConfig

__all__ = ["RESUME_SAFE", "RLConfig", "resume_changes"]

# Setting name -> field of the composed config.
SCORER_KNOBS = {
    "dyco": "granularity",
    "alpha": "alpha",
    "normalise_over": "normalise_over",
    "min_length": "min_length",
    "tau_vis": "tau_vis",
    "tau_txt": "tau_txt",
}
LOSS_KNOBS = {
    k: k
    for k in ("eps", "eps_low", "eps_high", "gspo_eps_low", "gspo_eps_high", "sapo_tau_pos", "sapo_tau_neg")
}


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
        scorer: the scorer's settings (``ScorerConfig``). Its knobs are also settings of their own,
            by name: ``dyco`` (its ``granularity``: ``"token"``, the paper; ``"sequence"``, the
            published code; or ``"off"``, the baseline, no tracing), ``alpha``, ``normalise_over``,
            ``min_length``, ``tau_vis``, ``tau_txt``.
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
        loss: the loss's clip and gate settings (``LossConfig``), also settings of their own by name:
            ``eps``, ``eps_low``, ``eps_high`` (DAPO's decoupled clip), ``gspo_eps_low``,
            ``gspo_eps_high``, ``sapo_tau_pos``, ``sapo_tau_neg``. Its KL coefficient and Dr. GRPO's
            length come from ``beta`` and ``max_new_tokens`` (``loss_config()``).
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
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    trace_layers: str | tuple[int, ...] | None = None
    roles: str = "fisher_rao"
    role_options: dict[str, float | str] = field(default_factory=dict)
    trace_when_off: bool = False
    # optimisation
    algo: str = "grpo"
    beta: float | None = None
    loss: LossConfig = field(default_factory=LossConfig)
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
        for part, knobs in (("scorer", SCORER_KNOBS), ("loss", LOSS_KNOBS)):
            config = getattr(self, part)
            fixed = [
                f.name
                for f in dataclasses.fields(config)
                if f.name not in knobs.values() and getattr(config, f.name) != f.default
            ]
            need(
                not fixed,
                f"{part}: {', '.join(fixed)} is not a setting of a run (those are {', '.join(knobs)})",
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

    def loss_config(self) -> LossConfig:
        """The loss's settings with the KL coefficient in use and Dr. GRPO's length filled in."""
        return dataclasses.replace(
            self.loss, beta=self.kl_beta, dapo_beta=self.kl_beta, max_completion_length=self.max_new_tokens
        )

    @classmethod
    def settings(cls) -> list[tuple[str, str, object]]:
        """Every setting by name, as ``(name, type, default)``, in the order of ``to_dict`` (the
        command line has one option each): the composed configs' knobs in their place."""
        out = []
        for f in dataclasses.fields(cls):
            knobs = {"scorer": SCORER_KNOBS, "loss": LOSS_KNOBS}.get(f.name)
            if knobs is None:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                out.append((f.name, str(f.type), default))
                continue
            inner = {g.name: g for g in dataclasses.fields(f.default_factory)}
            out += [(name, str(inner[k].type), inner[k].default) for name, k in knobs.items()]
        return out

    def to_dict(self) -> dict:
        """One key per setting (``settings()``): the format of a run's ``config.json``."""
        d = {name: copy.deepcopy(getattr(self, name)) for name, _, _ in self.settings()}
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
        known = {name for name, _, _ in cls.settings()}
        base = cls(**{k: v for k, v in saved.items() if k in known})
        config = dataclasses.replace(base, **overrides, out_dir=str(out_dir), resume=True)
        resume_changes(base.to_dict(), config)
        return config


def _knob(part: str, name: str) -> property:
    return property(lambda self: getattr(getattr(self, part), name), doc=f"``{part}.{name}``")


def _taking_knobs(init):
    """``RLConfig.__init__`` that also takes the composed configs' knobs by name."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for part, cls, knobs in (("scorer", ScorerConfig, SCORER_KNOBS), ("loss", LossConfig, LOSS_KNOBS)):
            given = {knobs[k]: kwargs.pop(k) for k in list(kwargs) if k in knobs}
            if given:
                kwargs[part] = dataclasses.replace(kwargs.get(part) or cls(), **given)
        init(self, *args, **kwargs)

    return __init__


RLConfig.__init__ = _taking_knobs(RLConfig.__init__)
for _part, _knobs in (("scorer", SCORER_KNOBS), ("loss", LOSS_KNOBS)):
    for _name, _inner in _knobs.items():
        setattr(RLConfig, _name, _knob(_part, _inner))


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
