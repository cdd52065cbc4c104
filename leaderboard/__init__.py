"""Records -> tables, beside the stages (DESIGN, "Layout"): the data model (:mod:`leaderboard.model`), the
builder (:mod:`~leaderboard.build`) and its cells (:mod:`~leaderboard.cells`), the Δ and mark statistics
(:mod:`~leaderboard.deltas`), normalisation (:mod:`~leaderboard.normalise`), the text / page / plot renderers
and the command line (``python -m leaderboard``).

Reads the store and the published numbers through :mod:`ringbench` only (records describe themselves: units,
headline metrics); it imports no stage.
"""
