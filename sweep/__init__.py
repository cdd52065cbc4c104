"""Sweeps: plans of cards or recipes x tasks x seeds run as jobs (submitit: local workers or Slurm), above both
stages, which it asks library questions (``python -m sweep``).

``plan`` (the YAML schema, the files' layout) -> ``expand`` (jobs, finished work) -> ``schedule`` (executors,
the :class:`~sweep.schedule.Sweep` scheduler) running ``jobs`` (the submitit callable, state files);
``status`` reads them back for ``--status``; ``cli`` is the command."""
