"""Supervised training of the built-in model on the synthetic task (``dyco-probe pretrain``).

Two phases, as real VLMs are built:

1. **vision**: the vision tower and its patch merger learn to describe each cell (shape and colour,
   or empty) through two linear heads on the merged image tokens, one token per cell;
2. **language**: with the vision tower frozen, the whole language model learns the chains of thought
   (next-token loss on the completion; look-up tokens weighted up), through a curriculum of stages.

Freezing a vision tower that was trained per cell matters: its tokens then carry each cell's
attributes separately, so the language model cannot read "which colour goes with the triangle" off an
average over the image and has to attend to the right token.

Attending to the right token is a retrieval circuit that a model this small does not find by itself
in a CPU budget (look-up accuracy stays at chance for thousands of steps). A *hint* bootstraps it: for
the first ``attention_hint_until`` of the language steps, an extra loss asks one head of the last layer
(``attention_hint_head``) to attend, from each look-up query, to the image token of the object the key
names; a second head (``table_hint_head``) gets the same hint for the table look-ups of the text
(from the query that produces ``3`` in ``red = 3`` to the ``3`` after ``red`` in the question), an
induction circuit that is just as slow to appear. The hints' weight decays linearly to zero, and the
rest of training is the plain next-token loss: whatever attention the shipped model has at the end is
what the next-token loss kept.

Everything is deterministic in the seed; the data stream is indexed by step, so a run killed at any
point resumes from its last checkpoint and continues identically.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dyco_probe.models.builtin import BuiltinArchitecture
from dyco_probe.task.problems import ROLE_VISUAL, TaskConfig, generate_problem, split_seed


@dataclass(frozen=True)
class Stage:
    """A curriculum stage: train on ``task`` until ``until`` (a fraction of the language steps)."""

    until: float
    task: TaskConfig


def default_curriculum(final: TaskConfig | None = None) -> tuple[Stage, ...]:
    """Dense look-ups (4-6 per question) for the first 30% of the language steps, then the task."""
    final = final or TaskConfig()
    return (
        Stage(0.3, replace(final, min_hops=4, max_hops=6)),  # dense look-ups first
        Stage(1.0, final),
    )


@dataclass(frozen=True)
class PretrainConfig:
    """Every knob of ``dyco-probe pretrain``, with the values the shipped model was trained with."""

    out: str = "runs/pretrain"
    seed: int = 0
    arch: BuiltinArchitecture = BuiltinArchitecture()
    # phase 1: vision tower
    vision_steps: int = 150
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    # phase 2: language model
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    visual_weight: float = 3.0  # loss weight of look-up tokens
    curriculum: tuple[Stage, ...] = field(default_factory=default_curriculum)
    attention_hint_weight: float = 1.0
    attention_hint_until: float = 0.4  # fraction of the language steps; the weight decays to 0 by then
    attention_hint_head: int = 0  # head of the last layer that gets the image look-up hint
    table_hint_head: int = 1  # head of the last layer that gets the table look-up hint (None: no hint)
    table_weight: float = 3.0  # loss weight of values looked up in the question's table
    # bookkeeping
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_n: int = 128
    threads: int | None = None

    def tiny(self) -> PretrainConfig:
        """A few steps of a very small model: for tests and smoke runs."""
        arch = BuiltinArchitecture(
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=2,
            num_kv_heads=2,
            vision_hidden=32,
            vision_heads=2,
            vision_intermediate=64,
        )
        return replace(
            self,
            arch=arch,
            vision_steps=2,
            vision_batch_size=4,
            steps=4,
            batch_size=4,
            warmup=1,
            checkpoint_every=2,
            eval_every=0,
            eval_n=8,
        )

    def with_task(self, task: TaskConfig) -> PretrainConfig:
        """The default curriculum ending in ``task``."""
        return replace(self, curriculum=default_curriculum(task))

    def with_overrides(self, **kw) -> PretrainConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def task_at(self, step: int) -> TaskConfig:
        frac = step / max(1, self.steps)
        for stage in self.curriculum:
            if frac < stage.until:
                return stage.task
        return self.curriculum[-1].task

    def to_dict(self) -> dict:
        d = asdict(self)
        d["curriculum"] = [{"until": s.until, "task": s.task.to_dict()} for s in self.curriculum]
        return d


# ---------------------------------------------------------------- batches


def prompt_for(handle, problem) -> str:
    return handle.prompt(f"<image> {problem.question}", 1)


def language_batch(handle, problems, visual_weight: float, table_weight: float = 1.0):
    """Teacher-forced batch with next-token targets and per-token loss weights over the completion.

    Returns ``(model_inputs, weights, lookups, table_lookups)``. ``lookups`` lists ``(sample, query
    column, relevant image-token column)`` of every look-up in the image, ``table_lookups`` lists
    ``(sample, query column, column of the value in the question's table)`` of every table look-up
    (``red = 3``); the query is the column whose logits produce the looked-up token.
    """
    from dyco_probe.batching import completion_ids_for, model_inputs, teacher_forced_batch

    comp = completion_ids_for(handle, [p.completion for p in problems])
    batch = teacher_forced_batch(
        handle, [prompt_for(handle, p) for p in problems], [[p.render()] for p in problems], comp
    )
    ids = batch["input_ids"]
    L = ids.shape[1]
    weights = batch["completion_mask"].float()
    lookups, table_lookups = [], []
    for i, p in enumerate(problems):
        start = L - len(comp[i])
        image_cols = (ids[i] == handle.image_token_id).nonzero().flatten()
        words = [w.text for w in p.chain]
        for j, w in enumerate(p.chain):
            if w.role == ROLE_VISUAL:
                weights[i, start + j] = visual_weight
                lookups.append((i, start + j - 1, int(image_cols[w.cells[0]])))
            elif j >= 2 and words[j - 1] == "=" and words[j - 2] in p.table:
                weights[i, start + j] = table_weight
                key_id = handle.tokenizer.convert_tokens_to_ids(words[j - 2])
                where = (ids[i, :start] == key_id).nonzero().flatten()
                if len(where) == 1:
                    table_lookups.append((i, start + j - 1, int(where[0]) + 1))
    return model_inputs(batch), weights, lookups, table_lookups


def forward_with_last_layer_attention(model, inputs):
    """Forward pass that also returns the last text layer's attention probabilities [B, H, L, L]
    (that layer alone runs eager attention; everything else is untouched)."""
    text = model.model.language_model
    captured = {}
    hook = text.layers[-1].self_attn.register_forward_hook(lambda m, i, o: captured.__setitem__("p", o[1]))
    impl = text.config._attn_implementation
    text.config._attn_implementation = "eager"
    try:
        out = model(**inputs)
    finally:
        text.config._attn_implementation = impl
        hook.remove()
    return out, captured["p"]


def attention_hint_loss(probs: torch.Tensor, lookups, head: int) -> torch.Tensor:
    """Mean −log attention of ``head`` from each look-up query to its target column."""
    i = torch.tensor([x[0] for x in lookups])
    q = torch.tensor([x[1] for x in lookups])
    k = torch.tensor([x[2] for x in lookups])
    return -torch.log(probs[i, head, q, k] + 1e-6).mean()


def weighted_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy weighted per target token (weight 0 = not a target)."""
    w = weights[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction="none")
    return (ce * w.flatten()).sum() / w.sum().clamp_min(1e-8)


def cell_targets(problems, task: TaskConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell shape and colour classes (last class = empty), row-major, for every image."""
    n = task.grid * task.grid
    shapes, colours = [], []
    for p in problems:
        s, c = [task.n_shapes] * n, [task.n_colours] * n
        for o in p.objects:
            k = o.row * task.grid + o.col
            s[k], c[k] = task.shapes.index(o.shape), task.colours.index(o.colour)
        shapes += s
        colours += c
    return torch.tensor(shapes), torch.tensor(colours)


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise RuntimeError(
            f"corrupt checkpoint {path}: {type(e).__name__}: {e}; delete it to start over"
        ) from e


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def lookup_report(handle, problems) -> dict:
    """Teacher-forced look-up accuracy, and how often the last layer's attention (mean over heads,
    restricted to image tokens) from each look-up query peaks on the relevant image token; plus
    free-running answer accuracy."""
    from dyco_probe.data import example_from_problem
    from dyco_probe.evaluation import evaluate

    model = handle.model
    was_training = model.training
    model.eval()
    try:
        inputs, _, lookups, _ = language_batch(handle, problems, 1.0)
        outputs, probs = forward_with_last_layer_attention(model, inputs)
        ids = inputs["input_ids"]
        mean = probs.mean(1)
        hits = peaks = 0
        for i, q, k in lookups:
            hits += int(outputs.logits[i, q].argmax() == ids[i, q + 1])
            image_cols = (ids[i] == handle.image_token_id).nonzero().flatten()
            peaks += int(image_cols[mean[i, q, image_cols].argmax()] == k)
        acc = evaluate(handle, [example_from_problem(p) for p in problems], progress=False).accuracy
    finally:
        model.train(was_training)
    n = max(len(lookups), 1)
    return {"lookup_accuracy": hits / n, "attention_peak_rate": peaks / n, "answer_accuracy": acc}


# ---------------------------------------------------------------- the run


def pretrain(
    config: PretrainConfig = PretrainConfig(), *, resume: bool = True, progress: bool = True
) -> dict:
    """Train the built-in model; returns a summary. Checkpoints to ``<out>/checkpoint.pt`` and saves
    the final model (``save_pretrained``) to ``<out>/model``."""
    from dyco_probe.models.adapters import QWEN2_5_VL
    from dyco_probe.models.builtin import build_untrained
    from dyco_probe.models.loading import ModelHandle

    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    model, processor = build_untrained(config.arch, seed=config.seed)
    handle = ModelHandle(model, processor, QWEN2_5_VL, "pretrain")
    task0 = config.curriculum[-1].task
    head = torch.nn.Linear(config.arch.hidden_size, task0.n_shapes + 1 + task0.n_colours + 1)
    vision_params = list(model.model.visual.parameters()) + list(head.parameters())
    vision_opt = torch.optim.AdamW(vision_params, lr=config.vision_lr)
    lm_params = [p for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    opt = torch.optim.AdamW(lm_params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))

    def schedule(step):
        warm = min(1.0, (step + 1) / max(1, config.warmup))
        return warm * 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    phase, step, history = "vision", 0, []
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        if state["config"] != config.to_dict():
            raise RuntimeError(
                f"{ckpt_path} was written with another configuration; pass --no-resume to start over"
            )
        model.load_state_dict(state["model"])
        head.load_state_dict(state["head"])
        vision_opt.load_state_dict(state["vision_opt"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        phase, step, history = state["phase"], state["step"], state["history"]
        _set_rng_state(state["rng"])

    def checkpoint():
        save_checkpoint(
            ckpt_path,
            {
                "config": config.to_dict(),
                "model": model.state_dict(),
                "head": head.state_dict(),
                "vision_opt": vision_opt.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "phase": phase,
                "step": step,
                "history": history,
                "rng": _rng_state(),
            },
        )

    t0 = time.perf_counter()
    model.train()
    if phase == "vision":
        bar = tqdm(total=config.vision_steps, initial=step, desc="pretrain: vision", disable=not progress)
        while step < config.vision_steps:
            problems = [
                generate_problem(split_seed("train", 10**8 + step * config.vision_batch_size + k), task0)
                for k in range(config.vision_batch_size)
            ]
            pix = processor.image_processor([p.render() for p in problems], return_tensors="pt")
            feats = model.model.visual(pix["pixel_values"], grid_thw=pix["image_grid_thw"]).pooler_output
            shapes, colours = cell_targets(problems, task0)
            logits = head(feats)
            loss = F.cross_entropy(logits[:, : task0.n_shapes + 1], shapes) + F.cross_entropy(
                logits[:, task0.n_shapes + 1 :], colours
            )
            loss.backward()
            vision_opt.step()
            vision_opt.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % config.checkpoint_every == 0 or step == config.vision_steps:
                history.append({"phase": "vision", "step": step, "loss": loss.item()})
                checkpoint()
        bar.close()
        phase, step = "language", 0
        checkpoint()

    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    eval_problems = [generate_problem(split_seed("val", i), task0, f"val-{i}") for i in range(config.eval_n)]
    bar = tqdm(total=config.steps, initial=step, desc="pretrain: language", disable=not progress)
    while step < config.steps:
        task = config.task_at(step)
        problems = [
            generate_problem(split_seed("train", step * config.batch_size + k), task)
            for k in range(config.batch_size)
        ]
        inputs, weights, lookups, table_lookups = language_batch(
            handle, problems, config.visual_weight, config.table_weight
        )
        hint = config.attention_hint_weight * max(
            0.0, 1 - step / max(1.0, config.attention_hint_until * config.steps)
        )
        if hint > 0 and lookups:
            outputs, probs = forward_with_last_layer_attention(model, inputs)
            loss = weighted_lm_loss(outputs.logits, inputs["input_ids"], weights)
            loss = loss + hint * attention_hint_loss(probs, lookups, config.attention_hint_head)
            if config.table_hint_head is not None and table_lookups:
                loss = loss + hint * attention_hint_loss(probs, table_lookups, config.table_hint_head)
        else:
            loss = weighted_lm_loss(model(**inputs).logits, inputs["input_ids"], weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm_params, config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        record = None
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            record = {
                "phase": "language",
                "step": step,
                "loss": loss.item(),
                **lookup_report(handle, eval_problems),
            }
            bar.write(json.dumps(record))
        if step % config.checkpoint_every == 0 or step == config.steps:
            history.append(record or {"phase": "language", "step": step, "loss": loss.item()})
            checkpoint()
    bar.close()

    model.eval()
    final_dir = out / "model"
    staging = out / ".model.partial"  # renamed to model/ once complete: model/ is never half written
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    recipe = {
        "command": "dyco-probe " + " ".join(sys.argv[1:]) if sys.argv and "dyco" in sys.argv[0] else None,
        "config": config.to_dict(),
        "history": history,
        "train_seconds_this_session": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    (staging / "recipe.json").write_text(json.dumps(recipe, indent=1))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(staging, final_dir)
    return {"out": str(final_dir), "steps": step, "history": history[-3:]}
