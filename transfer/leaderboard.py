"""``python transfer/leaderboard.py``: kept so that the command of earlier versions still works.

The leaderboard lives in ``leaderboard/`` (``python -m leaderboard``). A command, not a module: nothing imports it."""

import sys
from pathlib import Path

if __name__ == "__main__":
    # The repository first, so that ``leaderboard`` is the package, not this file (whose folder is on sys.path).
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from leaderboard.cli import cli

    cli()
