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

**The planted failure** (the positive control). Two thirds of the questions carry a note about one
queried object, half of the notes false (``dyco_probe.task.problems``). The chains come from a biased
teacher (``trust``): at the noted look-up it cites the note (``triangle note blue``) instead of reading
the image (``triangle red``) with probability ``trust``. A model this small does not learn *which*
look-up is the noted one from the next-token loss within the budget, so two more hints bootstrap it,
with the same decay: from the query that decides a look-up's form, a head of layer
``decision_hint_layer`` attends to the note's key when the look-up is of the noted object, and away from
it otherwise (``decision_hint_head``); and from the query that produces a copied value, head
``note_hint_head`` of the last layer attends to the note's value, and away from it at read look-ups.
The decision token of a noted look-up weighs ``decision_weight`` in the loss. The result is a model whose
wrong answers on false notes are planted coordination failures: at the copied value it does not look at
the image, and RL from the answer reward can teach it to read instead.

Everything is deterministic in the seed; the data stream is indexed by step, so a run killed at any
point resumes from its last checkpoint and continues identically.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dyco_probe.models.builtin import BuiltinArchitecture
from dyco_probe.task.problems import (
    LOOKUP_COPIED,
    LOOKUP_READ,
    NOTE,
    TaskConfig,
    generate_problem,
    split_seed,
    teacher_chain,
)
from dyco_probe.training import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_model,
    seed_everything,
    set_rng_state,
)


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
    steps: int = 4000
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
    # the planted failure: a teacher that trusts notes, and the hints that teach where notes apply
    trust: float = 0.7  # probability that the teacher cites a note instead of reading the image
    decision_weight: float = 5.0  # loss weight of the token that decides a noted look-up's form
    note_hint_head: int | None = 2  # last-layer head: copied value -> the note's value (None: no hint)
    decision_hint_layer: int = -2  # layer whose head marks look-ups of the noted object
    decision_hint_head: int | None = 0  # its head: decision query -> the note's key (None: no hint)
    # bookkeeping
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_n: int = 128
    threads: int | None = None

    def __post_init__(self):
        heads = self.arch.num_heads
        for name in ("attention_hint_head", "table_hint_head", "note_hint_head", "decision_hint_head"):
            h = getattr(self, name)
            if h is not None and not 0 <= h < heads:
                raise ValueError(f"{name} must be a head index in 0..{heads - 1} or None, got {h}")
        if not -self.arch.num_layers <= self.decision_hint_layer < self.arch.num_layers:
            raise ValueError(
                f"decision_hint_layer {self.decision_hint_layer} is out of range for {self.arch.num_layers} layers"
            )
        if not 0.0 <= self.trust <= 1.0:
            raise ValueError(f"trust must be in [0, 1], got {self.trust}")

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
            note_hint_head=1,
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


HINTS = ("image", "table", "note_copy", "note_read", "decision_noted", "decision_other")


@dataclass
class LanguageBatch:
    """A teacher-forced batch of chains with per-token loss weights and the hints' attention targets.

    ``hints[name]`` lists ``(sample, query column, key column)``; the query is the column whose logits
    produce the token concerned:

    - ``image``: a value read from the image -> the image token of the named object;
    - ``table``: a value looked up in the question's table (``red = 3``) -> the ``3`` after ``red``;
    - ``note_copy``: a value copied from the note -> the note's value; ``note_read``: a value read
      from the image in a question with a note -> the note's value (to be avoided);
    - ``decision_noted``: the query deciding the form of the noted object's look-up -> the note's key;
      ``decision_other``: the same for the other look-ups of a question with a note (to be avoided).
    """

    inputs: dict
    weights: torch.Tensor
    hints: dict[str, list[tuple[int, int, int]]]

    @property
    def lookups(self) -> list[tuple[int, int, int]]:
        return self.hints["image"]


def language_batch(
    handle,
    problems,
    visual_weight: float,
    table_weight: float = 1.0,
    *,
    chains=None,
    decision_weight: float = 1.0,
) -> LanguageBatch:
    """Teacher-forced batch of ``chains`` (default: the gold chains) with next-token targets,
    per-token loss weights over the completion and the hints' attention targets."""
    from dyco_probe.completions import completion_ids_for, model_inputs, packed_batch

    chains = [p.chain for p in problems] if chains is None else chains
    comp = completion_ids_for(handle, [" ".join(w.text for w in c) for c in chains])
    batch = packed_batch(
        handle, [prompt_for(handle, p) for p in problems], [[p.render()] for p in problems], comp
    )
    ids = batch["input_ids"]
    L = ids.shape[1]
    weights = batch["completion_mask"].float()
    hints: dict[str, list] = {name: [] for name in HINTS}
    to_id = handle.tokenizer.convert_tokens_to_ids
    for i, (p, chain) in enumerate(zip(problems, chains)):
        start = L - len(comp[i])
        image_cols = (ids[i] == handle.image_token_id).nonzero().flatten()
        note_key = note_value = None
        if p.note is not None:
            at = (ids[i, :start] == to_id(NOTE)).nonzero().flatten()
            if len(at) == 1:
                note_key, note_value = int(at[0]) + 1, int(at[0]) + 2
        words = [w.text for w in chain]
        for j, w in enumerate(chain):
            query = start + j - 1
            if w.lookup:
                decision = j if w.lookup == LOOKUP_READ else j - 1  # the word after the key
                noted = bool(w.note)
                if noted:
                    weights[i, start + decision] = max(float(weights[i, start + decision]), decision_weight)
                if note_key is not None:
                    key_query = start + decision - 1
                    hints["decision_noted" if noted else "decision_other"].append((i, key_query, note_key))
                    hints["note_copy" if w.lookup == LOOKUP_COPIED else "note_read"].append(
                        (i, query, note_value)
                    )
            if w.lookup == LOOKUP_READ:
                weights[i, start + j] = max(float(weights[i, start + j]), visual_weight)
                hints["image"].append((i, query, int(image_cols[w.cells[0]])))
            elif j >= 2 and words[j - 1] == "=" and words[j - 2] in p.table:
                weights[i, start + j] = table_weight
                where = (ids[i, :start] == to_id(words[j - 2])).nonzero().flatten()
                if len(where):  # the table is the question's first mention of a value
                    hints["table"].append((i, query, int(where[0]) + 1))
    return LanguageBatch(model_inputs(batch), weights, hints)


def forward_with_attention(model, inputs, layers=(-1,)):
    """Forward pass that also returns the attention probabilities ``[B, H, L, L]`` of the given text
    layers (a dict by layer index as given). The model runs eager attention for this pass only."""
    text = model.model.language_model
    captured = {}
    hooks = [
        text.layers[layer].self_attn.register_forward_hook(
            lambda m, i, o, layer=layer: captured.__setitem__(layer, o[1])
        )
        for layer in layers
    ]
    impl = text.config._attn_implementation
    text.config._attn_implementation = "eager"
    try:
        out = model(**inputs)
    finally:
        text.config._attn_implementation = impl
        for hook in hooks:
            hook.remove()
    return out, captured


def forward_with_last_layer_attention(model, inputs):
    """Forward pass that also returns the last text layer's attention probabilities [B, H, L, L]."""
    out, captured = forward_with_attention(model, inputs, (-1,))
    return out, captured[-1]


def attention_hint_loss(probs: torch.Tensor, targets, head: int, avoid: bool = False) -> torch.Tensor:
    """Mean −log attention of ``head`` from each query to its target column; with ``avoid``, mean
    −log(1 − attention): the head is pushed off the target."""
    i = torch.tensor([x[0] for x in targets])
    q = torch.tensor([x[1] for x in targets])
    k = torch.tensor([x[2] for x in targets])
    p = probs[i, head, q, k]
    return -torch.log((1 - p if avoid else p) + 1e-6).mean()


def hinted_layers(config: PretrainConfig) -> tuple[int, ...]:
    """The text layers the hints look at, as negative indices (the last layer is -1)."""
    layers = {-1}
    if config.decision_hint_head is not None:
        layers.add(config.decision_hint_layer % config.arch.num_layers - config.arch.num_layers)
    return tuple(sorted(layers))


def hint_loss(config: PretrainConfig, probs: dict, hints: dict) -> torch.Tensor:
    """The sum of the attention hints that apply to a batch (see ``LanguageBatch``)."""
    last = probs[-1]
    terms = [(last, "image", config.attention_hint_head, False)]
    if config.table_hint_head is not None:
        terms.append((last, "table", config.table_hint_head, False))
    if config.note_hint_head is not None:
        terms += [
            (last, "note_copy", config.note_hint_head, False),
            (last, "note_read", config.note_hint_head, True),
        ]
    if config.decision_hint_head is not None:
        layer = probs[hinted_layers(config)[0]]
        terms += [
            (layer, "decision_noted", config.decision_hint_head, False),
            (layer, "decision_other", config.decision_hint_head, True),
        ]
    loss = torch.zeros(())
    for p, name, head, avoid in terms:
        if hints[name]:
            loss = loss + attention_hint_loss(p, hints[name], head, avoid)
    return loss


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


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def lookup_report(handle, problems) -> dict:
    """Teacher-forced look-up accuracy, and how often the last layer's attention (mean over heads,
    restricted to image tokens) from each look-up query peaks on the relevant image token; plus
    free-running answer accuracy."""
    from dyco_probe.data import example_from_problem
    from dyco_probe.evaluation import evaluate
    from dyco_probe.task.notes import note_summary

    model = handle.model
    was_training = model.training
    model.eval()
    try:
        batch = language_batch(handle, problems, 1.0)
        inputs, lookups = batch.inputs, batch.lookups
        outputs, probs = forward_with_last_layer_attention(model, inputs)
        ids = inputs["input_ids"]
        mean = probs.mean(1)
        hits = peaks = 0
        for i, q, k in lookups:
            hits += int(outputs.logits[i, q].argmax() == ids[i, q + 1])
            image_cols = (ids[i] == handle.image_token_id).nonzero().flatten()
            peaks += int(image_cols[mean[i, q, image_cols].argmax()] == k)
        result = evaluate(handle, [example_from_problem(p) for p in problems], progress=False)
    finally:
        model.train(was_training)
    n = max(len(lookups), 1)
    notes = note_summary(
        problems, [r["completion"] for r in result.records], [r["correct"] for r in result.records]
    )
    return {
        "lookup_accuracy": hits / n,
        "attention_peak_rate": peaks / n,
        "answer_accuracy": result.accuracy,
        **{k: v for k, v in notes.items() if not k.startswith("n_")},
    }


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
    seed_everything(config.seed)
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
        set_rng_state(state["rng"])

    def checkpoint():
        save_checkpoint(
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
                "rng": rng_state(),
            },
            ckpt_path,
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
        teacher = random.Random(split_seed("train", step * config.batch_size) ^ 0x7EAC4E5)
        batch = language_batch(
            handle,
            problems,
            config.visual_weight,
            config.table_weight,
            chains=[teacher_chain(p, config.trust, teacher) for p in problems],
            decision_weight=config.decision_weight,
        )
        inputs, weights = batch.inputs, batch.weights
        hint = config.attention_hint_weight * max(
            0.0, 1 - step / max(1.0, config.attention_hint_until * config.steps)
        )
        if hint > 0:
            outputs, probs = forward_with_attention(model, inputs, hinted_layers(config))
            loss = weighted_lm_loss(outputs.logits, inputs["input_ids"], weights)
            loss = loss + hint * hint_loss(config, probs, batch.hints)
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
    recipe = {
        "command": "dyco-probe " + " ".join(sys.argv[1:]) if sys.argv and "dyco" in sys.argv[0] else None,
        "config": config.to_dict(),
        "history": history,
        "train_seconds_this_session": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }
    final_dir = save_model(model, processor, out / "model", {"recipe.json": json.dumps(recipe, indent=1)})
    return {"out": str(final_dir), "steps": step, "history": history[-3:]}
