"""python -m stress: thin entry point; everything lives in stress.cli (spawned workers cannot
import functions defined in a __main__ module)."""

import signal
import sys

from stress.cli import main

code = main()
# The verdict is printed and every segment released: a Ctrl-C while the interpreter shuts down
# must not turn the exit code into a signal death.
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.exit(code)
