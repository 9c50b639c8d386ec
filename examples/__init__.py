"""Runnable examples of evtchn's public API (``python -m examples.<name>`` from the checkout)."""
