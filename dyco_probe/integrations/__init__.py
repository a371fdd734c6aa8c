"""Integrations with other training libraries (optional extras).

- ``dyco_probe.integrations.trl``: ``DyCoGRPOTrainer``, a TRL ``GRPOTrainer`` with DyCo per-token
  advantages (``pip install "dyco-probe[trl]"``).
"""
