"""``python -m sweep``: the sweep's command line (:mod:`sweep.cli`)."""

from sweep.cli import cli

cli()
