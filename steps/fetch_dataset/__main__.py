"""``python -m steps.fetch_dataset``: see DEVELOPERS.md ("Step command lines") and ``steps.fetch_dataset``."""

import sys

from stepkit.common import run_step
from steps.fetch_dataset import main

if __name__ == "__main__":
    sys.exit(run_step(main))
