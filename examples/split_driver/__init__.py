"""A Xen-style split driver on evtchn's public API: a frontend process (domU) and a backend
process (dom0) share a request/response ring (Xen's io/ring.h) in their own shared memory and
notify each other over an interdomain event channel.

    python -m examples.split_driver --requests 20000 [--njit]

Modules: ring (the shared ring), frontend, backend (Python handler loop), njit_backend (the
same loop compiled with @njit through evtchn.numba), toolstack (creates the host and the
domains, starts and watches the drivers, cleans up), measure (the per-event cost).
"""
