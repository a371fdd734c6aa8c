"""DyCo advantage reweighting inside TRL's ``GRPOTrainer`` (TRL 1.x; ``pip install "dyco-probe[trl]"``).

``DyCoGRPOTrainer`` is a ``GRPOTrainer`` that traces the completions TRL has generated and rewarded
teacher-forced, scores them with ``dyco_probe.scoring`` and hands TRL per-token advantages ``[B, T]``
instead of ``[B]``. Everything else is TRL's: generation (transformers, vLLM), rewards, every
``loss_type`` (``grpo``, ``dr_grpo``, ``dapo``, ``bnpo``, ``sapo``; GSPO is
``importance_sampling_level="sequence"``), accelerate / DeepSpeed / FSDP, checkpoints and logging.
Tracing reads the attention from the generated ids, so it works whatever generated them.

The attention rows ride along a forward of the policy that TRL runs anyway
(``dyco_probe.tracing.OfflineTracer`` on the shared attention function): its old-log-probability
pass where it has one (vLLM with importance-sampling correction, or more than one optimisation pass
per generation), else the loss forward itself, scored before the loss is formed. Where neither gives
the same numbers, one extra teacher-forced forward without gradient does it
(``DyCoGRPOTrainer.dyco_capture_plan``; ``dyco/extra_forward`` in the logs says which ran).

    from trl import GRPOConfig
    from dyco_probe.integrations.trl import DyCoGRPOTrainer, as_trl_reward, synthetic_dataset
    from dyco_probe.rewards import accuracy_reward, format_reward
    from dyco_probe.scoring import ScorerConfig

    trainer = DyCoGRPOTrainer(
        model="path/to/Qwen2.5-VL-3B-Instruct",
        reward_funcs=[as_trl_reward(accuracy_reward), as_trl_reward(format_reward)],
        args=GRPOConfig(output_dir="runs/trl", num_generations=8, max_completion_length=256),
        train_dataset=synthetic_dataset("train", 1000),
        dyco=ScorerConfig(granularity="token", alpha=0.2),
    )
    trainer.train()

Roles come from the traced dynamics (docs/method.md#token-roles, ``roles="fisher_rao"``) or, with
``roles="visual_dependency"``, from the counterfactual labeller (``dyco_probe.labellers``): one more
teacher-forced forward without gradient, the batch with its real images and with counterfactual ones
(``role_options``: ``counterfactual``, ``divergence``, thresholds; ``dyco_probe.counterfactual``).

With several processes, token-level weights need only each process's own completions; sequence
scores normalised over the group gather the group's scores across processes first (a group's
completions may be spread over processes), so every process sees the same statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from trl import GRPOTrainer

from dyco_probe.completions import completion_mask
from dyco_probe.labellers import DEPENDENCY_DEFAULTS, check_options, parse_options
from dyco_probe.layers import parse_layer_choice
from dyco_probe.roles import TAU_TXT, TAU_VIS, Role
from dyco_probe.scoring import ScorerConfig, reweight_advantages, score_tokens

__all__ = ["DyCoArguments", "DyCoGRPOTrainer", "as_trl_reward", "jsonl_dataset", "main", "synthetic_dataset"]

ROLE_SOURCES = ("fisher_rao", "visual_dependency")


def _completion_text(completion) -> str:
    """TRL passes completions as strings or as conversational message lists."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] if isinstance(m["content"], str) else "" for m in completion)


def as_trl_reward(func: Callable, answer_column: str = "answer") -> Callable:
    """Wrap a dyco_probe reward ``(completions, answers) -> list[float]`` as a TRL reward function
    ``(prompts, completions, **columns) -> list[float]``, reading answers from ``answer_column``."""

    def reward(prompts=None, completions=None, **kwargs):
        answers = kwargs.get(answer_column)
        if answers is None:
            raise KeyError(f"the dataset has no {answer_column!r} column for reward {func.__name__}")
        return func([_completion_text(c) for c in completions], list(answers))

    reward.__name__ = getattr(func, "__name__", "reward")
    return reward


def _row(ex) -> dict:
    """One TRL row: a conversational prompt with an image slot per ``<image>`` tag, its images and answer."""
    from dyco_probe.models.adapters import split_image_tags

    content = [
        {"type": "image"} if p is None else {"type": "text", "text": p} for p in split_image_tags(ex.question)
    ]
    return {
        "id": str(ex.id),
        "prompt": [{"role": "user", "content": content}],
        "images": ex.load_images(),
        "answer": ex.answer,
    }


def synthetic_dataset(split: str, n: int, config=None):
    """The synthetic task as a ``datasets.Dataset`` in TRL's conversational VLM format:
    ``prompt`` (a user turn with image slots and the question), ``images``, ``answer`` and ``id``."""
    from datasets import Dataset

    from dyco_probe.data import synthetic_examples

    return Dataset.from_list([_row(ex) for ex in synthetic_examples(split, n, config)])


def jsonl_dataset(path: str, n: int | None = None):
    """A VLM-R1 jsonl file (``dyco_probe.data.read_jsonl``) as a TRL dataset, like ``synthetic_dataset``."""
    from datasets import Dataset

    from dyco_probe.data import read_jsonl

    examples = read_jsonl(path)
    return Dataset.from_list([_row(ex) for ex in (examples[:n] if n else examples)])


CAPTURES = ("auto", "extra_forward")


class DyCoGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with DyCo per-token advantages (docs/method.md#advantage-reweighting).

    Args:
        *args, **kwargs: as for ``trl.GRPOTrainer``.
        dyco: the scorer's settings; ``granularity="off"`` makes this exactly ``GRPOTrainer``.
        trace_config: what to trace (``dyco_probe.tracing.TraceConfig``; default: last layer, all heads).
        image_token_id: the image placeholder id (default: from the model config).
        capture: where the attention rows come from. ``"auto"`` (default): from a forward of the
            policy that TRL runs anyway, where that gives the same numbers (``dyco_capture_plan``),
            else one extra teacher-forced forward; ``"extra_forward"``: always the extra forward.
        roles: ``"fisher_rao"`` (docs/method.md#token-roles on the traced dynamics, the scorer's thresholds) or
            ``"visual_dependency"`` (counterfactual; one more forward per batch).
        role_options: options of ``visual_dependency`` (``dyco_probe.labellers.DEPENDENCY_DEFAULTS``
            and ``patch_size``, ``seed``); errors name the dataset row's ``id`` column when it has one.

    TRL's own group advantages (its ``scale_rewards`` included) are the ``Â`` that DyCo reweights.
    Logged per step: ``dyco/role_visual``, ``dyco/role_text``, ``dyco/s_mean``, ``dyco/w_std``,
    ``dyco/sequence_score_std``, ``dyco/advantage_abs`` and ``dyco/extra_forward`` (the share of
    batches traced by an extra forward).
    """

    def __init__(
        self,
        *args,
        dyco: ScorerConfig | None = None,
        trace_config=None,
        image_token_id: int | None = None,
        capture: str = "auto",
        roles: str = "fisher_rao",
        role_options: dict | None = None,
        **kwargs,
    ):
        if capture not in CAPTURES:
            raise ValueError(f"unknown capture {capture!r}; valid: {', '.join(CAPTURES)}")
        if roles not in ROLE_SOURCES:
            raise ValueError(f"roles must be one of {', '.join(ROLE_SOURCES)}, got {roles!r}")
        check_options(roles, role_options or {})
        super().__init__(*args, **kwargs)
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if getattr(tokenizer, "padding_side", "left") != "left":
            # TRL left-pads the prompt ids but takes mm_token_type_ids (the images' columns, hence
            # Qwen-VL's positions) from the processor: both must pad alike, as when TRL loads it.
            tokenizer.padding_side = "left"
        self.dyco = dyco or ScorerConfig()
        self.trace_config = trace_config
        self.dyco_image_token_id = image_token_id
        self.roles = roles
        self.role_options = dict(role_options or {})
        self.dyco_capture = capture
        self._dyco_slot: _Slot | None = None

    def dyco_capture_plan(self) -> str:
        """Where the next batch's attention rows will come from, given the settings:

        - ``"old_logps"``: TRL's no-gradient log-probability pass of the policy over the whole
          generation batch. TRL runs it when vLLM generates with ``vllm_importance_sampling_correction``
          (its default), or when ``gradient_accumulation_steps`` is not a multiple of
          ``steps_per_generation × num_iterations``.
        - ``"loss"``: the loss forward itself (the rows are read, scored and the loss formed before
          backward). When TRL runs no old-log-probability pass, that forward runs with the weights
          that generated the batch; sequence scores need whole groups in it, i.e. ``steps_per_generation == 1``.
        - ``"extra_forward"``: one teacher-forced forward without gradient (``capture="extra_forward"``,
          sequence granularity with ``steps_per_generation > 1`` and no old-log-probability pass, or
          dropout active in the policy).

        Per batch, a completion mask TRL attends with that differs from the tracer's (up to and
        including the first EOS; ``mask_truncated_completions`` with a truncated completion, a
        completion stopped without EOS, ``pad_to_multiple_of``) also falls back to the extra forward.
        """
        training = self.model.training
        if self.dyco_capture == "extra_forward" or (training and _dropout_active(self._policy)):
            return "extra_forward"
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        ):
            return "old_logps"  # the condition under which TRL computes old_per_token_logps
        if training and self.dyco.granularity == "sequence" and self.args.steps_per_generation > 1:
            return "extra_forward"  # a group's completions land in different micro-batches
        return "loss"

    def _generate_and_score_completions(self, inputs):
        if self.dyco.granularity == "off":
            return super()._generate_and_score_completions(inputs)
        plan = self.dyco_capture_plan()
        slot = self._dyco_slot = _Slot() if plan == "old_logps" else None
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._dyco_slot = None
        b = output["completion_ids"].shape[0]
        start = self.accelerator.process_index * b
        output["dyco_group_ids"] = torch.arange(start, start + b, device=output["advantages"].device)
        output["dyco_group_ids"] //= self._group_size
        if self.roles == "visual_dependency":  # [B, T], split and shuffled with the batch by TRL
            output["dyco_roles"] = self._dependency_roles(inputs, output, self._eos_mask(output))
        if plan == "loss" and self._all_processes(self._masks_agree(output)):
            return output  # scored in the loss forward (_compute_loss), before backward
        captured = slot.trace if slot is not None else None
        self._apply_dyco(output, captured if captured is not None else self._trace(output), captured is None)
        return output

    def _compute_loss(self, model, inputs):
        if "dyco_group_ids" not in inputs or inputs["advantages"].dim() == 2:
            return super()._compute_loss(model, inputs)
        # DyCo rides along the loss forward: _get_per_token_logps_and_entropies captures the rows,
        # and the advantages are in place before TRL reads them to form the loss.
        slot = self._dyco_slot = _Slot(batch=inputs)
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._dyco_slot = None
        if not slot.used:
            raise RuntimeError(
                "DyCo found no loss forward to capture in this TRL version; pass capture='extra_forward'"
            )
        return loss

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
    ):
        slot, self._dyco_slot = self._dyco_slot, None  # the first pass after arming only: the policy's
        if slot is None or self.accelerator.unwrap_model(model) is not self._policy:  # not the reference
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        slot.used = True
        tracer = self._ride_along_tracer(input_ids, attention_mask, logits_to_keep, kwargs)
        if tracer is None:  # TRL attends with another completion mask than the tracer's
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
            if slot.batch is not None:
                self._apply_dyco(slot.batch, self._trace(slot.batch), extra_forward=True)
            return out
        with tracer:
            out = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        slot.trace = tracer.trace()
        if slot.batch is not None:  # the loss forward: DyCo advantages before the loss reads them
            self._apply_dyco(slot.batch, slot.trace, extra_forward=False)
        return out

    # -- pieces ------------------------------------------------------------------------------------

    @property
    def _group_size(self) -> int:
        """Completions per prompt of the batch being scored (TRL's evaluation may use another G)."""
        return self.num_generations if self.model.training else self.num_generations_eval

    @property
    def _policy(self):
        return self.accelerator.unwrap_model(self.model)

    def _all_processes(self, flag: bool) -> bool:
        """``flag`` on every process (plans must agree: sequence scores and metrics are gathered)."""
        if self.accelerator.num_processes == 1:
            return flag
        flags = self.accelerator.gather(torch.tensor([int(flag)], device=self.accelerator.device))
        return bool(flags.all())

    def _eos_mask(self, batch) -> torch.Tensor:
        """``[B, T]`` the completions the tracer reads: up to and including the first EOS."""
        return completion_mask(batch["completion_ids"], list(self.eos_token_ids))

    def _masks_agree(self, batch) -> bool:
        """Does TRL attend over the completions the tracer reads?"""
        return bool(torch.equal(self._eos_mask(batch), batch["completion_mask"].bool()))

    def _ride_along_tracer(self, input_ids, attention_mask, logits_to_keep: int, forward_kwargs: dict):
        """An ``OfflineTracer`` for a TRL forward over ``prompt ++ completion``, or None where TRL's
        completion mask is not the tracer's."""
        from dyco_probe.tracing import OfflineTracer

        p = input_ids.shape[1] - logits_to_keep
        prompt_inputs = {"input_ids": input_ids[:, :p], "attention_mask": attention_mask[:, :p]}
        for key in ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask"):
            if forward_kwargs.get(key) is not None:
                prompt_inputs[key] = forward_kwargs[key]
        for key in ("mm_token_type_ids", "token_type_ids"):
            if forward_kwargs.get(key) is not None:
                prompt_inputs[key] = forward_kwargs[key][:, :p]
        tracer = OfflineTracer(
            self._policy,
            prompt_inputs,
            input_ids[:, p:],
            image_token_id=self.dyco_image_token_id,
            config=self.trace_config,
            eos_token_id=list(self.eos_token_ids),
        )
        if not torch.equal(tracer.completion_mask, attention_mask[:, p:].bool()):
            return None
        return tracer

    @staticmethod
    def _prompt_inputs(batch) -> dict:
        """The encoded prompt batch (ids, mask, pixel inputs) of TRL's output, left-padded."""
        prompt_len = batch["prompt_ids"].shape[1]
        prompt_inputs = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_mask"]}
        for key in ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask"):
            if key in batch:
                prompt_inputs[key] = batch[key]
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in batch:
                prompt_inputs[key] = batch[key][:, :prompt_len]
        return prompt_inputs

    def _dependency_roles(self, inputs, output, mask: torch.Tensor) -> torch.Tensor:
        """``visual_dependency`` roles of the batch: its prompts with the real and with counterfactual
        images (pixels re-encoded, token ids kept), one teacher-forced forward without gradient."""
        from dyco_probe.counterfactual import (
            counterfactual_images,
            default_patch_size,
            dependency_from_inputs,
            with_images,
        )
        from dyco_probe.dependency import dependency_roles

        o = {**DEPENDENCY_DEFAULTS, **self.role_options}
        images = [
            list(row.get("images") or ([row["image"]] if row.get("image") is not None else []))
            for row in inputs
        ]
        step = self.state.global_step
        keys = [row.get("id", f"step {step} group {i // self._group_size}") for i, row in enumerate(inputs)]
        names = [str(row.get("id", f"batch row {i}")) for i, row in enumerate(inputs)]
        cf = counterfactual_images(
            images,
            o["counterfactual"],
            keys=keys,
            names=names,
            mask_fraction=float(o["mask_fraction"]),
            patch_size=int(o.get("patch_size") or default_patch_size(self.processing_class)),
            seed=int(o.get("seed", 0)),
        )
        real = self._prompt_inputs(output)
        other = with_images(real, self.processing_class, cf, names)
        score = dependency_from_inputs(
            self._policy,
            real,
            other,
            output["completion_ids"],
            mask,
            divergence=o["divergence"],
            temperature=float(o.get("temperature", self.temperature)),
        )
        return dependency_roles(score, mask, float(o["visual_above"]), float(o["text_below"]))

    def _trace(self, batch):
        """Teacher-forced trace of the batch's completions under the current (sampling) policy: the
        extra forward."""
        from dyco_probe.tracing import trace_offline

        prompt_inputs = self._prompt_inputs(batch)
        model = self._policy
        was_training = model.training
        model.eval()
        try:
            # TRL's autocast, as in its own forwards (the same numbers as capturing in one of them)
            with torch.no_grad(), self.accelerator.autocast():
                # The mask is recomputed from the EOS ids: TRL's completion_mask may have masked
                # truncated completions out entirely, and the tracer needs every row non-empty.
                return trace_offline(
                    model,
                    prompt_inputs,
                    batch["completion_ids"],
                    image_token_id=self.dyco_image_token_id,
                    config=self.trace_config,
                    eos_token_id=list(self.eos_token_ids),
                )
        finally:
            model.train(was_training)

    def _apply_dyco(self, batch: dict, trace, extra_forward: bool) -> None:
        """Replace TRL's ``[B]`` advantages of ``batch`` (its generation output, or a micro-batch of it)
        by DyCo's ``[B, T]``, scored from ``trace``, and log."""
        groups = batch["dyco_group_ids"]
        # float32, also inside the loss forward's autocast (mixed precision)
        with torch.autocast(device_type=groups.device.type, enabled=False):
            scored = self._score(trace, groups, batch.get("dyco_roles"))
            mask = trace.mask.to(groups.device)
            batch["advantages"] = self._reweight(batch["advantages"], scored, mask, groups)
        self._log_dyco(scored, mask, batch, extra_forward)

    def _score(self, trace, group_ids, roles=None) -> dict:
        """DyCo's scores of ``trace``; ``roles`` (``[B, T]``, ``visual_dependency``) replace the
        roles labelled from the traced dynamics."""
        scored = score_tokens(
            trace.r_vis,
            trace.r_txt,
            trace.v_vis,
            trace.v_txt,
            trace.mask,
            self.dyco,
            roles=None if roles is None else roles.cpu(),
            group_ids=group_ids.cpu(),
        )
        return {k: v.to(group_ids.device) for k, v in scored.items()}

    def _reweight(
        self, advantages: torch.Tensor, scored: dict, mask: torch.Tensor, group_ids
    ) -> torch.Tensor:
        c = self.dyco
        s, roles = scored["s"], scored["roles"]
        if c.granularity == "sequence" and c.normalise_over == "group" and self.accelerator.num_processes > 1:
            # z-score sequence scores over whole groups, which may straddle processes.
            acc = self.accelerator
            b, t = mask.shape
            pad = lambda x: acc.pad_across_processes(x, dim=1)  # noqa: E731
            all_s, all_roles, all_mask = (
                acc.gather(pad(s)),
                acc.gather(pad(roles)),
                acc.gather(pad(mask.long())),
            )
            all_adv, all_groups = acc.gather(advantages), acc.gather(group_ids)
            full = reweight_advantages(
                all_adv,
                all_s,
                all_roles,
                all_mask.bool(),
                granularity="sequence",
                alpha=c.alpha,
                group_ids=all_groups,
                normalise_over="group",
                min_length=c.min_length,
                clamp=c.clamp,
            )
            start = acc.process_index * b
            return full[start : start + b, :t]
        # Groups are whole within a local batch when it is a multiple of G; "batch" is per process
        # (as in the published code).
        return reweight_advantages(
            advantages,
            s,
            roles,
            mask,
            granularity=c.granularity,
            alpha=c.alpha,
            group_ids=group_ids,
            normalise_over=c.normalise_over,
            min_length=c.min_length,
            clamp=c.clamp,
        )

    def _log_dyco(self, scored: dict, mask: torch.Tensor, batch: dict, extra_forward: bool):
        mode = "train" if self.model.training else "eval"
        advantages, loss_mask = batch["advantages"], batch["completion_mask"].bool()
        roles = scored["roles"][mask]
        n = max(int(mask.sum()), 1)
        local = {
            "dyco/role_visual": float((roles == Role.VISUAL).sum()) / n,
            "dyco/role_text": float((roles == Role.TEXT).sum()) / n,
            "dyco/s_mean": float(scored["s"][mask].sum()) / n,
            "dyco/w_std": float(scored["w"][mask].std()) if n > 1 else 0.0,
            "dyco/sequence_score_std": float(scored["sequence_score"].std()) if mask.shape[0] > 1 else 0.0,
            "dyco/advantage_abs": float(advantages[loss_mask].abs().mean()) if loss_mask.any() else 0.0,
            "dyco/extra_forward": float(extra_forward),
        }
        values = torch.tensor(list(local.values()), device=self.accelerator.device)
        values = self.accelerator.gather(values.unsqueeze(0)).mean(0)
        for key, value in zip(local, values.tolist()):
            self._metrics[mode][key].append(value)


@dataclass
class _Slot:
    """A capture armed for the next ``_get_per_token_logps_and_entropies`` call: TRL's old-log-prob
    pass (``batch`` None: the trace is kept), or the loss forward of ``batch`` (scored in place)."""

    batch: dict | None = None
    trace: object = None
    used: bool = False


def _dropout_active(model) -> bool:
    """Would a training-mode forward drop anything (then it is not the tracer's eval-mode forward)?"""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
        if isinstance(getattr(m, "attention_dropout", None), float) and m.attention_dropout > 0:
            return True
    return False


# -- command line: python -m dyco_probe.integrations.trl (or accelerate launch -m ...) ---------------


@dataclass
class DyCoArguments:
    """What the TRL entry point adds to ``GRPOConfig``'s own options."""

    model: str = field(default="builtin", metadata={"help": "'builtin' or a local checkpoint directory"})
    data: str | None = field(default=None, metadata={"help": "VLM-R1 jsonl; default: the synthetic task"})
    n_train: int = field(
        default=2000, metadata={"help": "training examples (synthetic, or the first of --data)"}
    )
    granularity: str = field(default="token", metadata={"help": "DyCo: token, sequence or off"})
    alpha: float = field(default=0.2, metadata={"help": "DyCo reweighting strength"})
    normalise_over: str = field(default="group", metadata={"help": "sequence scores: group or batch"})
    min_length: int = field(default=0, metadata={"help": "sequence scores: anti-collapse length guard"})
    tau_vis: float = field(default=TAU_VIS, metadata={"help": "visual role threshold"})
    tau_txt: float = field(default=TAU_TXT, metadata={"help": "text role threshold"})
    trace_layers: str | None = field(
        default=None, metadata={"help": "probed layers: 'all' or 'i,j' (default last)"}
    )
    roles: str = field(
        default="fisher_rao", metadata={"help": "role source: fisher_rao or visual_dependency"}
    )
    role_options: str | None = field(
        default=None,
        metadata={"help": "visual_dependency options, e.g. 'counterfactual=patches,visual_above=0.5'"},
    )


def _load_processor(source: str):
    """The model's processor without loading its weights (``builtin``: the shipped one)."""
    import json

    from dyco_probe.models import loading
    from dyco_probe.models.adapters import adapter_for

    path = loading.resolve_checkpoint(source)
    model_type = json.loads((path / "config.json").read_text()).get("model_type", "")
    return loading._load_processor(path, adapter_for(model_type)), str(path)


def main(argv: list[str] | None = None):
    """``python -m dyco_probe.integrations.trl [DyCo options] [GRPOConfig options]``: train with
    ``DyCoGRPOTrainer`` on the synthetic task or a jsonl, accuracy + format rewards. Returns the trainer."""
    from transformers import HfArgumentParser
    from trl import GRPOConfig

    from dyco_probe.rewards import accuracy_reward, format_reward
    from dyco_probe.tracing import TraceConfig

    parser = HfArgumentParser((DyCoArguments, GRPOConfig))
    dyco_args, grpo_args = parser.parse_args_into_dataclasses(args=argv)
    processor, path = _load_processor(dyco_args.model)
    if dyco_args.data:
        dataset = jsonl_dataset(dyco_args.data, dyco_args.n_train)
    else:
        dataset = synthetic_dataset("train", dyco_args.n_train)
    layers = parse_layer_choice(dyco_args.trace_layers)
    trainer = DyCoGRPOTrainer(
        model=path,
        processing_class=processor,
        reward_funcs=[as_trl_reward(accuracy_reward), as_trl_reward(format_reward)],
        args=grpo_args,
        train_dataset=dataset,
        dyco=ScorerConfig(
            granularity=dyco_args.granularity,
            alpha=dyco_args.alpha,
            normalise_over=dyco_args.normalise_over,
            min_length=dyco_args.min_length,
            tau_vis=dyco_args.tau_vis,
            tau_txt=dyco_args.tau_txt,
        ),
        trace_config=TraceConfig(layers=layers),
        roles=dyco_args.roles,
        role_options=parse_options(dyco_args.role_options or ""),
    )
    trainer.train(resume_from_checkpoint=grpo_args.resume_from_checkpoint)
    trainer.save_model(grpo_args.output_dir)
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(grpo_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()
