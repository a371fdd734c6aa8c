"""Rollouts: the completions an RL step samples, traced online, with their rewards.

``sample_rollout`` samples G completions per prompt in one ``generate`` call (the one sampler,
``dyco_probe.completions.sample``: temperature, top-p, no top-k cut, image placeholders never
generated) and traces their attention while they are generated (``dyco_probe.tracing.Tracer``);
``compute_rewards`` scores them; ``rollout_roles`` labels their tokens with any labeller;
``policy_batches`` and ``policy_logprobs`` give the policy's log-probabilities of the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from dyco_probe.completions import completion_logprobs, packed_batch, sample
from dyco_probe.labellers import get_labeller
from dyco_probe.scoring import normalised_ratios

__all__ = [
    "Rollout",
    "Signals",
    "compute_rewards",
    "policy_batches",
    "policy_logprobs",
    "prompts_and_images",
    "rollout_roles",
    "sample_rollout",
]


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


def prompts_and_images(handle, examples) -> tuple[list[str], list[list]]:
    """The prompt text and the images of each example, as the model is shown them."""
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

    prompts, images = prompts_and_images(handle, examples)
    inputs = handle.encode(prompts, images)
    traced = {}

    def traced_generate(batch, run):
        config = TraceConfig(layers=trace_layers, distance=distance)
        with Tracer(handle.model, config, image_token_id=handle.image_token_id) as tracer:
            sequences = run()
        traced["trace"] = tracer.finish(sequences)
        return sequences

    sampled = sample(
        handle.model,
        inputs,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        num_return_sequences=num_generations,
        tokenizer=handle.tokenizer,
        wrap=traced_generate if trace else None,
    )
    ids, mask, t = sampled.ids.cpu(), sampled.mask.cpu(), sampled.ids.shape[1]
    signals = None
    if trace:
        if traced["trace"].num_tokens < t:
            raise RuntimeError(f"the trace has {traced['trace'].num_tokens} tokens, the completions {t}")
        signals = Signals(
            *(getattr(traced["trace"], k)[:, :t].float() for k in ("r_vis", "r_txt", "v_vis", "v_txt"))
        )
    texts = [
        handle.tokenizer.decode(row[m].tolist(), skip_special_tokens=True).strip()
        for row, m in zip(ids, mask)
    ]
    return Rollout(
        examples=[ex for ex in examples for _ in range(num_generations)],
        group_ids=torch.arange(len(examples)).repeat_interleave(num_generations),
        completion_ids=ids,
        mask=mask,
        truncated=sampled.truncated.cpu(),
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


def policy_batches(handle, rollout: Rollout, n_chunks: int) -> list[tuple[Tensor, dict]]:
    """Split the rows into ``n_chunks`` teacher-forced batches ``(row indices, packed batch)``."""
    prompts, images = prompts_and_images(handle, rollout.examples)
    out = []
    for rows in torch.arange(len(rollout)).tensor_split(min(n_chunks, len(rollout))):
        rows_l = rows.tolist()
        completions = [rollout.completion_ids[i][rollout.mask[i]].tolist() for i in rows_l]
        batch = packed_batch(handle, [prompts[i] for i in rows_l], [images[i] for i in rows_l], completions)
        out.append((rows, batch))
    return out


def policy_logprobs(model, batch, temperature: float, grad: bool) -> Tensor:
    """``[B, T]`` log-probabilities of a policy batch's completion tokens, at the sampling temperature."""
    with torch.set_grad_enabled(grad):
        logp, _ = completion_logprobs(model, batch, temperature=temperature)
    return logp
