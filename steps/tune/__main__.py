"""``python -m steps.tune``: see DEVELOPERS.md ("Step command lines") and ``steps.tune``."""

import sys

from stepkit.common import run_step
from steps.tune.run import main

if __name__ == "__main__":
    sys.exit(run_step(main))
