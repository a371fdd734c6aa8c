"""Worker of ``test_trl_integration.test_two_processes_under_accelerate_launch``: under
``accelerate launch --num_processes 2`` (CPU, gloo) it trains ``DyCoGRPOTrainer`` for two steps
and saves, per process, every batch DyCo scored: its inputs, TRL's sequence advantages, DyCo's
advantages and the weights they were traced with.

    python tests/trl_two_processes.py CHECKPOINT OUT GRANULARITY:SETTING [GRANULARITY:SETTING ...]
"""

from __future__ import annotations

import sys

import torch
from trl import GRPOConfig

from dyco_probe.integrations.trl import DyCoGRPOTrainer, as_trl_reward, synthetic_dataset
from dyco_probe.models.loading import load
from dyco_probe.scoring import ScorerConfig

KEYS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "pixel_values",
    "image_grid_thw",
    "mm_token_type_ids",
    "dyco_group_ids",
)
# per process: a group of 4 completions straddles the two processes in both settings
SETTINGS = {
    "loss": dict(per_device_train_batch_size=6),  # 12 rows: groups 0-3 | 4-7 | 8-11
    "old_logps": dict(per_device_train_batch_size=3, steps_per_generation=2),  # the same 12 per generation
}


def text_reward(completions, answers):
    """A reward with a spread over any distinct completions of an untrained model."""
    return [sum(map(ord, c)) % 7 / 7 for c in completions]


class Recorder(DyCoGRPOTrainer):
    records: list

    def _apply_dyco(self, batch, trace, extra_forward):
        sequence_advantages = batch["advantages"].detach().cpu().clone()
        super()._apply_dyco(batch, trace, extra_forward)
        record = {k: batch[k].detach().cpu() for k in KEYS if k in batch}
        record.update(
            sequence_advantages=sequence_advantages,
            advantages=batch["advantages"].detach().cpu(),
            extra_forward=extra_forward,
            plan=self.dyco_capture_plan(),
            weights={k: v.detach().cpu().clone() for k, v in self._policy.state_dict().items()},
        )
        self.records.append(record)


def main(checkpoint: str, out: str, *runs: str) -> None:
    torch.set_num_threads(1)
    for run in runs:
        train(checkpoint, out, *run.split(":"))


def train(checkpoint: str, out: str, granularity: str, setting: str) -> None:
    args = GRPOConfig(
        output_dir=f"{out}/trainer-{granularity}-{setting}",
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        learning_rate=1e-3,
        beta=0.04,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        **SETTINGS[setting],
    )
    trainer = Recorder(
        model=checkpoint,
        processing_class=load(checkpoint).processor,
        reward_funcs=[as_trl_reward(text_reward)],
        args=args,
        train_dataset=synthetic_dataset("train", 16),
        dyco=ScorerConfig(granularity=granularity, alpha=0.5, tau_txt=0.0),
    )
    trainer.records = []
    trainer.train()
    final = {k: v.detach().cpu().clone() for k, v in trainer._policy.state_dict().items()}
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "records": trainer.records,
            "final": final,
            "world_size": trainer.accelerator.num_processes,
            "log": trainer.state.log_history,
        },
        f"{out}/{granularity}-{setting}-rank{rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
