"""What the two drivers tell each other outside the ring, through the toolstack (xenstore's
part in Xen: ring-ref, event-channel, state), and the errors both sides raise."""

from __future__ import annotations

from typing import Any

import evtchn

POLL_S = 0.1  # how often a sleeping driver looks whether its peer is still connected


class PeerGone(RuntimeError):
    """The other driver went away: its end of the event channel was closed (by the toolstack,
    as Linux's /dev/xen/evtchn unbinds a dead process's ports) before the work was done."""


class ProtocolError(RuntimeError):
    """The other side broke the ring protocol (a response answered twice, a wrong result,
    an index that overtakes the ring)."""


def check_connected(dom: evtchn.Domain, port: int, peer: str, progress: str) -> None:
    """Raise PeerGone unless `port` is still an interdomain channel (EVTCHNOP_status)."""
    try:
        state = dom.status(port).state
    except evtchn.EvtchnError as exc:  # the host itself is gone (EBADF) or the port is invalid
        raise PeerGone(f"the {peer} went away ({exc.errname}: {exc}); {progress}") from exc
    if state != "interdomain":
        raise PeerGone(
            f"the {peer} went away: event channel port {port} of domain {dom.domid} is "
            f"{state} now; {progress}"
        )


def message(conn: Any, kind: str) -> tuple[Any, ...]:
    """Receive the next toolstack message, which must be of `kind`."""
    msg = conn.recv()
    if not isinstance(msg, tuple) or not msg or msg[0] != kind:
        raise ProtocolError(f"expected a {kind!r} message from the toolstack, got {msg!r}")
    return msg
