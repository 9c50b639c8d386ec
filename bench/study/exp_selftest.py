"""Internal: a configuration that tests the runner (used by tests/test_study.py only).

params: {"kill": "none" | "once" | "always", "marker": DIR}. It creates a host (so that shared
memory exists), records its pid in DIR, and with "kill" takes its Dask worker down with it:
"once" only on its first attempt (DIR/attempted does not exist yet), "always" every time.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from evtchn import Host

from .experiments import Config, Summary, by_config

NAME = "selftest"
TITLE = "Self-test of the runner"
DETERMINISTIC = False


def configs(opts) -> list[Config]:
    return [Config("plain", {"kill": "none", "marker": None}, timeout=120)]


def run(params: dict, seed: int) -> dict:
    marker = Path(params["marker"]) if params.get("marker") else None
    with Host() as host:
        dom = host.create_domain("fifo")
        port = dom.alloc_unbound(dom.domid)
        if marker is not None:
            marker.mkdir(parents=True, exist_ok=True)
            (marker / f"pid-{os.getpid()}").write_text(host.name)
            first = not (marker / "attempted").exists()
            (marker / "attempted").write_text("1")
            kill = params.get("kill")
            if kill == "always" or (kill == "once" and first):
                os.kill(os.getppid(), signal.SIGKILL)  # the Dask worker running this task
                signal.pause()  # the watchdog takes this process group down
        return {"port": int(port), "pid": os.getpid()}


def summarize(entries, opts) -> Summary:
    s = Summary()
    s.tables.append(
        (
            "runs",
            ["config", "seeds ok"],
            [[k, str(len(v))] for k, v in by_config(entries).items()],
            "",
        )
    )
    return s


def describe(opts) -> str:
    return "Internal check of the runner: each run creates a host and binds one port."
