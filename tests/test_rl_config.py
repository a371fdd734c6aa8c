"""dyco_probe.rl_config: RLConfig composes the scorer's and the loss's settings, and keeps its flat
keywords and config.json."""

import dataclasses
import json

import pytest

from dyco_probe.losses import LossConfig
from dyco_probe.rl import RLConfig
from dyco_probe.scoring import ScorerConfig

# config.json as the runs made before the scorer and loss settings were composed wrote it (every key)
OLD_CONFIG_KEYS = (
    "out_dir model device dtype seed steps resume threads data n_train eval_data eval_split n_eval "
    "eval_every eval_max_new_tokens eval_batch_size prompts_per_step num_generations max_new_tokens "
    "temperature top_p reward_weights dyco alpha normalise_over min_length tau_vis tau_txt trace_layers "
    "roles role_options trace_when_off algo beta eps eps_low eps_high gspo_eps_low gspo_eps_high "
    "sapo_tau_pos sapo_tau_neg num_iterations grad_accum lr weight_decay adam_betas warmup_steps "
    "max_grad_norm freeze_vision dynamic_sampling dynamic_sampling_rounds mask_truncated "
    "checkpoint_every tensorboard"
).split()


def test_flat_keywords_set_the_composed_configs():
    config = RLConfig(dyco="sequence", alpha=0.3, tau_txt=0.1, eps_high=0.3, lr=1e-4)
    assert config.scorer == ScorerConfig(granularity="sequence", alpha=0.3, tau_txt=0.1)
    assert config.loss == dataclasses.replace(LossConfig(), eps_high=0.3)
    assert (config.dyco, config.alpha, config.eps_high, config.lr) == ("sequence", 0.3, 0.3, 1e-4)
    same = RLConfig(
        scorer=ScorerConfig(granularity="sequence", alpha=0.3, tau_txt=0.1), loss=config.loss, lr=1e-4
    )
    assert same == config
    assert dataclasses.replace(config, alpha=0.5, steps=3).scorer.alpha == 0.5


def test_defaults_live_in_the_composed_configs():
    config = RLConfig()
    for name, inner in (
        ("alpha", "alpha"),
        ("tau_vis", "tau_vis"),
        ("tau_txt", "tau_txt"),
        ("dyco", "granularity"),
    ):
        assert getattr(config, name) == getattr(ScorerConfig(), inner)
    for name in ("eps", "eps_low", "eps_high", "gspo_eps_low", "sapo_tau_neg"):
        assert getattr(config, name) == getattr(LossConfig(), name)


def test_config_json_keeps_its_format_and_old_runs_resume(tmp_path):
    config = RLConfig(dyco="off", eps=0.1, trace_layers=(0, -1))
    saved = config.to_dict()
    assert list(saved) == OLD_CONFIG_KEYS and [name for name, _, _ in RLConfig.settings()] == OLD_CONFIG_KEYS
    assert saved["trace_layers"] == [0, -1] and saved["adam_betas"] == [0.9, 0.99]
    assert RLConfig(**json.loads(json.dumps(saved))) == config
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**saved, "out_dir": str(run)}))
    resumed = RLConfig.from_run(run, steps=300)
    assert resumed.resume and resumed.steps == 300 and resumed.loss.eps == 0.1 and resumed.dyco == "off"
    with pytest.raises(ValueError, match="alpha: the run has 0.2, now 0.5"):
        RLConfig.from_run(run, alpha=0.5)


def test_settings_a_run_does_not_record_are_refused():
    with pytest.raises(ValueError, match="clamp is not a setting of a run"):
        RLConfig(scorer=ScorerConfig(clamp=(0.5, 1.5)))
    with pytest.raises(ValueError, match="beta is not a setting of a run"):
        RLConfig(loss=LossConfig(beta=0.1))
    with pytest.raises(ValueError, match="unknown DyCo granularity"):
        RLConfig(dyco="tokens")
