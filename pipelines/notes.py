"""The notes pipeline: `python -m pipelines.notes --input PATTERN --model DIR --output PREFIX [Beam options]`."""

import sys

from .common import main, run  # noqa: F401 - run() is the entry point tests call

if __name__ == "__main__":
    sys.exit(main("notes"))
