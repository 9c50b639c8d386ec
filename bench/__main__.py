"""python -m bench: thin entry point; everything lives in bench.cli (spawned workers cannot
import functions defined in a __main__ module)."""

import sys

from bench.cli import main

sys.exit(main())
