"""``python -m steps.deploy``: see DEVELOPERS.md ("Step command lines") and ``steps.deploy``."""

import sys

from stepkit.common import run_step
from steps.deploy import main

if __name__ == "__main__":
    sys.exit(run_step(main))
