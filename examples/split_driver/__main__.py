"""python -m examples.split_driver: run a frontend/backend pair and print what it cost.

    python -m examples.split_driver --requests 20000          # backend loop on Python handles
    python -m examples.split_driver --requests 200000 --njit  # backend loop compiled (@njit)

Exit status: 0 every request answered exactly once; 1 a driver failed or died (the error is
printed); 2 bad arguments; 130 interrupted. Nothing is left in /dev/shm in any case but a
SIGKILL of this process itself (then: python -m stress cleanup).
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

import evtchn

from .measure import per_event_ns
from .ring import RING_SIZE
from .toolstack import Outcome, Toolstack


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m examples.split_driver",
        description="A Xen-style split driver (frontend in domU, backend in dom0) on evtchn: "
        "a shared request/response ring, notifications over an interdomain event channel.",
    )
    ap.add_argument("--requests", type=int, default=20000, help="requests to issue (20000)")
    ap.add_argument(
        "--njit", action="store_true", help="run the backend's handler loop compiled (@njit)"
    )
    ap.add_argument(
        "--in-flight",
        type=int,
        default=RING_SIZE,
        help=f"requests outstanding at most (1..{RING_SIZE}; {RING_SIZE}: 1 is ping-pong)",
    )
    ap.add_argument("--abi", choices=("fifo", "2l", "3l"), default="fifo", help="(fifo)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=20000,
        help="events per timing of the per-event cost (20000; 0 skips it)",
    )
    args = ap.parse_args(argv)
    if args.requests < 1:
        ap.error(f"--requests must be at least 1, not {args.requests}")
    if not 1 <= args.in_flight <= RING_SIZE:
        ap.error(f"--in-flight must be from 1 to {RING_SIZE}, not {args.in_flight}")
    if args.rounds < 0:
        ap.error(f"--rounds must be >= 0, not {args.rounds}")
    return args


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwind: the finally blocks release the shared memory


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    loop = "@njit through evtchn.numba" if args.njit else "evtchn's Python handles"
    print(
        f"split driver: {args.requests} requests, {args.abi} event channels, "
        f"ring of {RING_SIZE} slots, {args.in_flight} in flight, backend loop on {loop}",
        flush=True,
    )
    try:
        with evtchn.Host() as host:
            ts = Toolstack(host, args.requests, args.in_flight, args.njit, args.abi)
            out = ts.run(on_connected=_connected)
            if out.errors:
                for err in out.errors:
                    print(f"split_driver: error: {err}", file=sys.stderr)
                return 1
            ok = report(out, args.requests)
            if args.rounds and ok:
                measure(ts, args.rounds, args.njit)
            return 0 if ok else 1
    except KeyboardInterrupt:
        print("split_driver: interrupted; shared memory released", file=sys.stderr)
        return 130


def _connected(ts: Toolstack) -> None:
    print(
        f"connected: frontend pid {ts.front.pid} (domain {ts.domu.domid}, port "
        f"{ts.ports['frontend']}), backend pid {ts.back.pid} (domain {ts.dom0.domid}, port "
        f"{ts.ports['backend']}), host /dev/shm/{ts.host.name}, ring /dev/shm/{ts.ring_name}",
        flush=True,
    )


def report(out: Outcome, n: int) -> bool:
    """Print the run's figures; True if every request was answered exactly once."""
    front, back = out.front, out.back
    if front is None or back is None:
        print("split_driver: error: a driver ended without its report", file=sys.stderr)
        return False
    once, handled = front["answered_once"], back["handled"]
    print(f"answered exactly once: {once} of {n} (backend handled {handled})")
    print(f"requests/s: {n / front['seconds']:,.0f} ({front['seconds']:.3f} s)")
    sends = front["sends"] + back["sends"]
    print(
        f"notifications sent per request: {sends / n:.4f} "
        f"(frontend {front['sends']}, backend {back['sends']})"
    )
    print(
        f"wake-ups per request: frontend {front['wakeups'] / n:.4f}, "
        f"backend {back['wakeups'] / n:.4f} ({back['idle_handlers']} found nothing new)"
    )
    print(f"wait timeouts: frontend {front['timeouts']}, backend {back['timeouts']}")
    return bool(once == n and handled == n)


def measure(ts: Toolstack, rounds: int, use_njit: bool) -> None:
    """Print the per-event cost of the handler loop on both paths (or the Python one)."""
    paths = [("Python handles", False)] + ([("@njit", True)] if use_njit else [])
    figures = []
    for name, jit in paths:
        ns = per_event_ns(ts.dom0, ts.domu, rounds, 5, jit)
        figures.append(f"{name} {ns:,.0f} ns")
    print(
        "per-event cost (send, wait, consume, mask, unmask; one process, median of 5 x "
        f"{rounds}): " + ", ".join(figures)
    )


if __name__ == "__main__":
    sys.exit(main())
