"""``python -m leaderboard``: the leaderboard's command line (:mod:`leaderboard.cli`)."""

from leaderboard.cli import cli

cli()
