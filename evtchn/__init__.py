"""evtchn: Xen's event channels (2-level, 3-level, FIFO) on real shared memory.

with evtchn.Host() as host:
    dom0 = host.create_domain(abi="fifo", vcpus=2)
    domu = host.create_domain(abi="fifo")
    port = dom0.alloc_unbound(domu.domid)
    local = domu.bind_interdomain(dom0.domid, port)
    domu.send(local)
    dom0.consume(0)          # -> array([port, ...])
"""

from . import layout
from ._version import __version__ as __version__  # the one source: evtchn/_version.py
from .domain import Domain
from .errors import BatchError, EvtchnError, HostGoneError
from .host import BACKENDS, Host
from .results import PollResult, PortStatus

__all__ = [
    "BACKENDS",
    "BatchError",
    "Domain",
    "EvtchnError",
    "Host",
    "HostGoneError",
    "PollResult",
    "PortStatus",
    "layout",
]
