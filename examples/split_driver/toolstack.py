"""The toolstack (dom0's xl and xenstored, in one parent process): creates the host and both
domains, starts the two driver processes, relays the xenstore handshake, watches them, and
cleans up after them whatever happens.

Lifecycle: this process creates the evtchn Host, so it alone unlinks the host's segments
(``with evtchn.Host()``: also on an exception or Ctrl-C). The frontend creates the ring
segment and unlinks it when it exits; if it is killed first, the toolstack unlinks it (it
named it, ``evtchn-<toolstack pid>-splitdrv-<hex>``, so ``python -m stress cleanup`` also
finds it should the toolstack itself be killed). When a driver dies, the toolstack closes its
end of the event channel, as Linux's /dev/xen/evtchn unbinds the ports of a process that
exits: the other driver sees its port go back to unbound and stops with an error.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import secrets
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import evtchn

from . import backend, frontend
from .ring import unlink_ring

GRACE_S = 10.0  # how long a driver may take to notice its peer is gone before it is stopped


class DriverDied(RuntimeError):
    """A driver process ended before it reported."""


@dataclasses.dataclass
class Outcome:
    """What the run produced: each driver's report (None if it had none) and the errors."""

    front: dict[str, Any] | None = None
    back: dict[str, Any] | None = None
    errors: list[str] = dataclasses.field(default_factory=list)


def _exit_text(proc: BaseProcess) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        return f"died, killed by {signal.Signals(-code).name}"
    return f"stopped with exit code {code}"


def _recv(conn: Connection, procs: Sequence[BaseProcess], what: str) -> Any:
    """The next message on `conn`; DriverDied if one of `procs` ends first."""
    while True:
        if conn.poll():
            return conn.recv()
        ready = wait([conn, *(p.sentinel for p in procs)], timeout=1.0)
        if conn in ready:
            continue
        for p in procs:
            if p.exitcode is not None:
                raise DriverDied(f"the {p.name} {_exit_text(p)} before {what}")


class Toolstack:
    """Runs one frontend/backend pair on `host` (domU -> dom0)."""

    def __init__(self, host: evtchn.Host, requests: int, in_flight: int, use_njit: bool, abi: str):
        self.host, self.requests, self.use_njit = host, requests, use_njit
        self.dom0 = host.create_domain(abi)  # the backend's domain
        self.domu = host.create_domain(abi)  # the frontend's guest
        self.ring_name = f"evtchn-{os.getpid()}-splitdrv-{secrets.token_hex(4)}"
        self.ctx = mp.get_context("spawn")
        self.front_xs, front_end = self.ctx.Pipe()
        self.back_xs, back_end = self.ctx.Pipe()
        self.front = self.ctx.Process(
            target=frontend.main,
            args=(
                host.name,
                self.domu.domid,
                self.dom0.domid,
                self.ring_name,
                requests,
                in_flight,
                front_end,
            ),
            name="frontend",
        )
        self.back = self.ctx.Process(
            target=backend.main,
            args=(host.name, self.dom0.domid, self.domu.domid, use_njit, back_end),
            name="backend",
        )
        self.ports: dict[str, int] = {}
        self.out = Outcome()
        self._reported_dead: set[str] = set()

    def run(self, on_connected: Callable[[Toolstack], None] | None = None) -> Outcome:
        """Start, connect and watch both drivers; always stops them and removes the ring."""
        try:
            self.front.start()
            self.back.start()
            self._connect()
            if on_connected is not None:
                on_connected(self)
            self._watch()
        except DriverDied as exc:  # before the drivers were connected: nothing to wait for
            self.out.errors.append(str(exc))
            self._stop(grace=0.0)
        except KeyboardInterrupt:  # the drivers got it too (one job), or we stop them now
            self._stop(grace=1.0)
            raise
        finally:
            self._stop(grace=GRACE_S)
            unlink_ring(self.ring_name)
        return self.out

    def _connect(self) -> None:
        both = [self.front, self.back]
        _, ring_name, fport = _recv(self.front_xs, both, "it offered its ring")
        self.ports["frontend"] = fport
        self.back_xs.send(("ring", ring_name, fport))
        _, bport = _recv(self.back_xs, both, "it connected")
        self.ports["backend"] = bport
        self.front_xs.send(("connected",))

    def _watch(self) -> None:
        """Collect the reports; when a driver dies, unbind its port so its peer notices."""
        pending = {self.front: self.front_xs, self.back: self.back_xs}
        deadline: float | None = None
        while any(p.exitcode is None for p in pending):
            conns = [c for p, c in pending.items() if not c.closed]
            wait([*conns, *(p.sentinel for p in pending)], timeout=1.0)
            for p, conn in pending.items():
                self._drain(p, conn)
                if p.exitcode not in (None, 0) and p.name not in self._reported_dead:
                    self._reported_dead.add(p.name)  # once per driver
                    self.out.errors.append(f"the {p.name} {_exit_text(p)}")
                    self._unbind_dead()
                    deadline = time.monotonic() + GRACE_S
            if deadline is not None and time.monotonic() > deadline:
                return  # _stop() ends whoever is left
        for p, conn in pending.items():
            self._drain(p, conn)

    def _drain(self, proc: BaseProcess, conn: Connection) -> None:
        try:
            while not conn.closed and conn.poll():
                msg = conn.recv()
                if isinstance(msg, tuple) and msg and msg[0] == "stats":
                    setattr(self.out, "front" if proc is self.front else "back", msg[1])
        except (EOFError, OSError):
            conn.close()

    def _unbind_dead(self) -> None:
        """Close the event-channel end of every driver that has died (its kernel would)."""
        for proc, dom in ((self.front, self.domu), (self.back, self.dom0)):
            port = self.ports.get(proc.name)
            if proc.exitcode not in (None, 0) and port:
                try:
                    dom.close(port)
                except evtchn.EvtchnError:
                    pass  # already closed by the driver itself
                self.ports.pop(proc.name)

    def _stop(self, grace: float) -> None:
        """Join both drivers, giving each `grace` seconds, then SIGTERM, then SIGKILL."""
        for p in (self.front, self.back):
            if p.pid is None:
                continue
            p.join(grace if p.exitcode is None else 0)
            if p.exitcode is None:
                p.terminate()
                p.join(5)
            if p.exitcode is None:
                p.kill()
                p.join()
