"""dyco_probe: per-token cross-modal attention tracing, role labelling, alignment scoring and causal
interventions for vision-language models, after DyCo-RL (arXiv 2606.08035)."""

__version__ = "0.1.0"
