"""A small program written against evtchn's public API only, as another simulator would.

tests/test_typing.py type-checks it with ``mypy --strict`` (together with everything under
examples/) and runs it; .ci/run type-checks it again against the installed wheel, from outside
the checkout. ``assert_type`` fails the check where the API would hand out ``Any`` or a wrong
type, so a lost annotation cannot pass unnoticed.

    python tests/typing/user_script.py [cython|numba|reference]
"""

from __future__ import annotations

import errno
import sys

import numpy as np
import numpy.typing as npt

import evtchn
import evtchn.numba
from evtchn import layout

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # mypy ships typing_extensions; at run time this script needs Python >= 3.11 or it
    from typing_extensions import assert_type

U32 = npt.NDArray[np.uint32]


def ping(host: evtchn.Host) -> tuple[int, int]:
    """One interdomain channel dom0 <- domU; returns (dom0's port, domU's port), drained."""
    dom0 = host.create_domain(abi="fifo", vcpus=2)
    domu = host.create_domain("fifo")
    assert_type(dom0, evtchn.Domain)
    port = dom0.alloc_unbound(domu.domid)
    local = domu.bind_interdomain(dom0.domid, port)
    assert_type(port, int)
    drained = domu.consume(0)  # the bind set the new local port pending
    assert_type(drained, U32)
    domu.send(local)
    assert dom0.upcall_pending(0) and dom0.wait(0, timeout=1.0)
    got = dom0.consume(0)
    assert got.tolist() == [port], got
    return port, local


def batches(dom0: evtchn.Domain, domu: evtchn.Domain, port: int, local: int) -> None:
    edges = np.zeros(3, np.uint8)
    sent = domu.send_many(np.full(3, local, np.uint32), edges)
    assert_type(sent, int)
    assert sent == 3 and edges.tolist() == [1, 0, 0]  # PENDING is a bit: two coalesce
    out = np.empty(8, np.uint32)
    n = dom0.consume(0, out=out)
    assert_type(n, int)
    assert out[:n].tolist() == [port]
    n = dom0.consume_into(0, out)
    assert n == 0


def control(dom0: evtchn.Domain, port: int) -> None:
    status = dom0.status(port)
    assert_type(status, evtchn.PortStatus)
    assert_type(status.remote_port, int | None)
    assert status.state == "interdomain" and status.priority == layout.FIFO_PRIORITY_DEFAULT
    dom0.set_priority(port, layout.FIFO_PRIORITY_MAX)
    moved = dom0.bind_vcpu(port, 1)
    assert_type(moved, int)
    result = dom0.poll(1, [port], timeout=0.0)
    assert_type(result, evtchn.PollResult)
    assert not result and result.reason == "timeout"
    timer = dom0.bind_virq(layout.VIRQ_TIMER, vcpu=1)
    dom0.raise_virq(layout.VIRQ_TIMER, vcpu=1)
    assert dom0.consume(1).tolist() == [timer]
    regions = dom0.layout()
    for name, (segment, offset, size) in regions.items():
        assert_type(segment, str)
        assert offset % layout.PAGE_SIZE == 0 or name.startswith("control"), (name, offset)
        assert size > 0
    pages: int = dom0.mapped_pages()
    assert pages >= dom0.vcpus


def refused(dom0: evtchn.Domain) -> None:
    try:
        dom0.close(dom0.max_ports + 1)
    except evtchn.EvtchnError as exc:
        assert_type(exc.errname, str)
        assert exc.errno == errno.EINVAL and exc.errname == "EINVAL"
    else:
        raise AssertionError("closing a port beyond the limit must fail")


def jitted_side(dom0: evtchn.Domain) -> None:
    """evtchn.numba's kernels called from Python (they are for @njit code too)."""
    views = evtchn.numba.views(dom0)
    assert_type(views, evtchn.numba.Views)
    ipi = dom0.bind_ipi(0)
    edge = evtchn.numba.send(views, ipi)
    assert_type(edge, int)
    out = np.empty(4, np.uint32)
    assert evtchn.numba.consume(views, 0, out) == 1 and out[0] == ipi


def main(backend: str) -> int:
    assert backend in evtchn.BACKENDS
    assert_type(evtchn.__version__, str)
    with evtchn.Host(backend=backend) as host:
        assert host.is_owner and host.backend == backend
        port, local = ping(host)
        dom0, domu = host.domains()
        batches(dom0, domu, port, local)
        control(dom0, port)
        refused(dom0)
        if backend == "numba":
            jitted_side(dom0)
        assert host.ndomains == 2
    print(f"evtchn {evtchn.__version__} ({backend}): the user script passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cython"))
