"""dyco_probe.studies: the analyses' tables and findings from small hand-made results."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from dyco_probe.studies import interventions, rl_comparison
from dyco_probe.studies.model_check import guess_baselines
from dyco_probe.studies.positive_control import findings, render
from dyco_probe.studies.run_summary import sweep_effects
from dyco_probe.task.problems import make_split


def write_run(path, accuracies, rewards, note=None):
    path.mkdir(parents=True)
    records = [{"kind": "eval", "step": 0, "accuracy": accuracies[0], "n": 10, **(note or {})}]
    records += [{"kind": "train", "step": s + 1, "reward": r} for s, r in enumerate(rewards)]
    records.append({"kind": "eval", "step": len(rewards), "accuracy": accuracies[1], "n": 10, **(note or {})})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "done.json").write_text(json.dumps({"steps": len(rewards)}))


def test_rl_comparison_pairs_each_seed_with_its_baseline(tmp_path):
    for seed, (off, token) in enumerate(((0.5, 0.6), (0.4, 0.6))):
        write_run(rl_comparison.run_dir(tmp_path, "grpo", "off", seed), (0.3, off), [0.1, 0.2])
        write_run(rl_comparison.run_dir(tmp_path, "grpo", "token", seed), (0.3, token), [0.1, 0.3])
    rows, curves = rl_comparison.summarise(tmp_path, ["grpo"], [0, 1], 2)
    assert [r["dyco"] for r in rows] == ["off", "token"] and len(curves[("grpo", "token")]) == 2
    token = rows[1]
    assert token["final_accuracy"][0] == pytest.approx(0.6) and token["vs_off"][0] == pytest.approx(0.15)
    mean, half = rl_comparison.t_interval([0.1, 0.2])
    assert mean == pytest.approx(0.15) and half > 0 and math.isnan(rl_comparison.t_interval([1.0])[1])
    assert "DyCo ahead" in " ".join(rl_comparison.findings(rows)) or "no detectable" in " ".join(
        rl_comparison.findings(rows)
    )
    head = rl_comparison.headline(rows, {"steps": 2})
    assert head["rl_gain_points"]["mean"] == pytest.approx(100 * (0.45 - 0.3))


def headline_frame():
    rows = []
    rng = np.random.default_rng(0)
    for source in ("ground_truth", "fisher_rao"):
        for layers in ("0", "1", "all"):
            for target in ("visual", "random:visual", "text"):
                for item in range(6):
                    drop = -0.5 if target == "visual" and layers == "all" else 0.0
                    rows.append(
                        dict(
                            condition_id=f"{source}-{layers}-{target}",
                            kind="knockout",
                            keys="image",
                            strength=0.0,
                            role_source=source,
                            layers=layers,
                            target=target,
                            item_index=item,
                            status="ok",
                            n_targets=2.0,
                            correct_ref=True,
                            dacc=drop + rng.normal(0, 0.01),
                            dlogp_answer=drop + rng.normal(0, 0.01),
                            dlogp_target=rng.normal(0, 0.01),
                        )
                    )
    return pd.DataFrame(rows)


def test_the_headline_tables_and_what_they_show():
    table = interventions.tables(headline_frame(), n_boot=50, say=lambda line: None)
    assert set(table["readout"]) == set(interventions.READOUT_LABELS)
    first = table[(table["readout"] == "dacc") & (table["role_source"] == "ground_truth")]
    assert list(first["layers"].unique()) == ["0", "1", "all"]  # the layer windows in order
    assert list(first[first["layers"] == "all"]["target"]) == ["visual", "random:visual", "text"]
    meta = {"model": "m", "n": 6, "trajectory": "greedy", "accuracy": 1.0, "weights": "w", "num_layers": 2}
    text = interventions.markdown(table, meta)
    assert "a larger drop at all layers at once" in text and "no detectable difference at layers 0, 1" in text


def test_sweep_effects_say_why_a_condition_is_not_drawn(tmp_path):
    frame = headline_frame()
    frame.loc[frame["condition_id"] == "fisher_rao-0-text", "n_targets"] = 0.0
    frame.loc[frame["condition_id"] == "fisher_rao-0-text", ["dacc", "dlogp_answer"]] = np.nan
    frame.to_parquet(tmp_path / "results.parquet")
    effects = sweep_effects(tmp_path, n_boot=20)
    assert (effects["items"], effects["conditions"], effects["rows"], effects["errors"]) == (6, 18, 108, 0)
    dacc = effects["readouts"]["dacc"]
    assert len(dacc["effects"]) == 18 and dacc["label"] == interventions.READOUT_LABELS["dacc"]
    assert list(dacc["not_drawn"]) == [
        "no item had a target token (none of the completions has a token of that role)"
    ]


def test_guess_baselines_are_chance_level():
    g = guess_baselines(make_split("test", 20))
    assert 0 < g["majority_attribute_guess"] < 0.6 and 0 < g["best_guess_without_image"] < 0.6


def test_positive_control_report_renders_from_its_json():
    d = {"description": "s_t", "auroc": 0.8, "ci_low": 0.7, "ci_high": 0.9, "mean_read": 0.5}
    d.update(mean_copied=0.2, prompts_read_higher=3, prompts_with_both=4, n_read=10, n_copied=5)
    rate = {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10}
    auc = {"auroc": 0.6, "ci_low": 0.55, "ci_high": 0.7, "n_pos": 5, "n_neg": 5}
    report = {
        "model": "builtin",
        "weights_sha256": "ab" * 32,
        "greedy_accuracy": {"overall": rate},
        "false_note_copy_rate": rate,
        "lookups": {"n_prompts": 2, "samples": 2, "n_read": 10, "n_copied": 5},
        "detection": {"s": d},
        "trajectory_auroc": {"greedy": {"mean_s": auc}},
        "interventions": [],
        "findings": findings({"s": d}, {"greedy": {"mean_s": auc}}),
    }
    text = render(report)
    assert "| s_t | 0.800 (0.700-0.900)" in text and "mean_s" in report["findings"][-1]
