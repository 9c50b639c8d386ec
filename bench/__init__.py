"""evtchn's benchmarks: ``python -m bench`` (see bench/cli.py); not part of the wheel."""
