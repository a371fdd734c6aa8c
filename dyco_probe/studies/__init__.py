"""The studies behind `figures/`: what each analysis computes, its tables, findings and files.

Each module is one study; `analyses/<name>.py` is its command line (arguments in, files out), and
the demo, the notebooks and the report call the same functions.

- `labellers`, `labeller_validation`, `labeller_dependency`: role labellers against the synthetic
  task's ground truth (`analyses/validate_labellers.py`);
- `interventions`: the headline intervention experiment (`analyses/interventions_headline.py`);
- `rl_comparison`: RLVR with and without DyCo over seeds (`analyses/rl_comparison.py`);
- `positive_control`: which signals see the failure planted in the built-in model
  (`analyses/positive_control.py`);
- `headroom`: what outcome-reward RL can learn from a checkpoint (`analyses/rl_headroom.py`);
- `model_check`: does the built-in model look at the image (`analyses/builtin_model_check.py`);
- `run_summary`: the derived parts of a run directory that the report shows (roles, token analysis,
  sweep summaries).
"""
