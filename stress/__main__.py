"""python -m stress: thin entry point; everything lives in stress.cli (spawned workers cannot
import functions defined in a __main__ module)."""

import sys

from stress.cli import main

sys.exit(main())
