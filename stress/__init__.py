"""evtchn's stress harness: ``python -m stress`` (see stress/cli.py); not part of the wheel.

Real processes race as dom0's vCPUs, sender domains and chaos workers on one evtchn host;
every invariant of the ABIs is checked at quiescent points and at the end of the run.
"""
