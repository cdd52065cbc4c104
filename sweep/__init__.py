"""Sweeps: plans of cards or recipes x tasks x seeds run as jobs (submitit: local workers or Slurm), above both
stages, which it asks library questions (``python -m sweep``)."""
