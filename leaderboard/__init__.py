"""Records -> tables: the data model and builder (:mod:`leaderboard.compare`), the Δ and mark statistics,
normalisation, the text / page / plot renderers and the command line (``python -m leaderboard``).

Reads the store through :mod:`ringbench.store` only; it imports no stage."""
