import sys

from kaiflow.cli import main

sys.exit(main())
