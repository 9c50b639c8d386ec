"""Smoke test of an installed evtchn, as a user gets it: run it with the Python of a fresh
virtual environment that installed the wheel (or the sdist), from a directory outside the
checkout. .ci/run does; by hand:

    python -m venv /tmp/v && /tmp/v/bin/pip install dist/evtchn-*.whl
    cd /tmp && /tmp/v/bin/python /path/to/scripts/smoke_wheel.py

For each backend: bind, send and consume on every ABI; numba's warm-up; a second process
(spawned) attaches to the host and sends, and this one sees the event. Exit 0 when all pass.
"""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import os
import sys
import time
from pathlib import Path

import evtchn

ABIS = ("fifo", "2l", "3l")
TIMEOUT = 60.0


def check_installed() -> None:
    """evtchn comes from this environment's site-packages, whole: not from a checkout."""
    package = Path(evtchn.__file__).resolve().parent
    assert Path(sys.prefix).resolve() in package.parents, f"evtchn imported from {package}"
    assert importlib.metadata.version("evtchn") == evtchn.__version__
    for name in ("py.typed", "_core.pyi", "_atomics.pxd"):
        assert (package / name).is_file(), f"{name} missing from the installed package"
    assert list(package.glob("_core.*.so")), "the compiled extension is missing"
    print(f"evtchn {evtchn.__version__} from {package}")


def ping(backend: str, abi: str) -> None:
    with evtchn.Host(backend) as host:
        dom0 = host.create_domain(abi, vcpus=2)
        domu = host.create_domain(abi)
        port = dom0.alloc_unbound(domu.domid)
        local = domu.bind_interdomain(dom0.domid, port)
        domu.consume(0)  # the bind set the new local port pending
        domu.send(local)
        got = dom0.consume(0).tolist()
        assert got == [port], f"{backend}/{abi}: consumed {got}, expected [{port}]"


def _send_from_child(domu: evtchn.Domain, local: int) -> None:
    """Runs in the spawned process: domu arrives pickled by name and attaches to the host."""
    assert not domu.host.is_owner
    domu.send(local)


def attach_from_second_process(backend: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    with evtchn.Host(backend) as host:
        dom0 = host.create_domain("fifo")
        domu = host.create_domain("fifo")
        port = dom0.alloc_unbound(domu.domid)
        local = domu.bind_interdomain(dom0.domid, port)
        domu.consume(0)
        child = spawn.Process(target=_send_from_child, args=(domu, local))
        child.start()
        child.join(TIMEOUT)
        if child.is_alive():
            child.kill()
            child.join()
            raise AssertionError(f"{backend}: the attaching process hung")
        assert child.exitcode == 0, f"{backend}: the attaching process exited {child.exitcode}"
        assert dom0.wait(0, timeout=TIMEOUT), f"{backend}: no upcall from the other process"
        got = dom0.consume(0).tolist()
        assert got == [port], f"{backend}: consumed {got} after the other process sent"


def numba_warm_up() -> float:
    start = time.monotonic()
    with evtchn.Host("numba") as host:
        host.warm_up()
    return time.monotonic() - start


def our_segments() -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"evtchn-{os.getpid()}-")]


def main() -> int:
    check_installed()
    print(f"numba warm-up: {numba_warm_up():.1f} s (compiles on a cold cache)")
    for backend in evtchn.BACKENDS:
        start = time.monotonic()
        for abi in ABIS:
            ping(backend, abi)
        if backend != "reference":  # the oracle runs in one process only
            attach_from_second_process(backend)
        what = "bind/send/consume on " + ", ".join(ABIS)
        if backend != "reference":
            what += "; a spawned process attached and sent"
        print(f"{backend}: {what} ({time.monotonic() - start:.1f} s)")
    left = our_segments()
    assert not left, f"shared memory left in /dev/shm: {left}"
    print("smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
