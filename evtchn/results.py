"""What hypercalls return: EVTCHNOP_status's PortStatus and SCHEDOP_poll's PollResult."""

from __future__ import annotations

import dataclasses
from typing import cast


@dataclasses.dataclass(frozen=True)
class PortStatus:
    """EVTCHNOP_status: state, notify vCPU, the peer or VIRQ, plus the FIFO priority."""

    state: str
    vcpu: int
    remote_domid: int | None = None
    remote_port: int | None = None
    virq: int | None = None
    priority: int | None = None

    def __getitem__(self, key: str) -> str | int | None:
        """``status["state"]``: the fields read as a mapping too."""
        return cast("str | int | None", getattr(self, key))


@dataclasses.dataclass(frozen=True)
class PollResult:
    """Why SCHEDOP_poll returned. Xen's hypercall returns 0 in every case below; the model
    tells the guest which one it was.

    reason: "pending" (a polled port was pending on entry, masked or not), "event" (a send
    set PENDING 0 -> 1 on a polled port, or on any port when several are polled, and woke
    the vCPU), "upcall" (the vCPU had an unmasked upcall pending on entry, or was kicked by
    one while it slept) or "timeout". port: the port found pending or whose event woke the
    vCPU, else 0. True unless the poll timed out."""

    reason: str
    port: int = 0

    def __bool__(self) -> bool:
        return self.reason != "timeout"
