"""Locks taken from Python (the control plane's event, channel, handler and host locks).

The words are the kernels' robust spinlocks (evtchn.layout, "Lock words"): owned by the calling
thread, taken over from a dead owner, waited for without the GIL in slices that let Ctrl-C in.
``Held`` scopes them to a ``with`` block so that no way out of the block leaves one owned.
"""

from __future__ import annotations

import errno as E

from .errors import EvtchnError


class Held:
    """Hold the locks at `addresses` for a ``with`` block: taken in the order given (read-type
    channel locks with `reader`), released on every way out of the block.

    Release is one kernel call (``unlock_owned``) that frees each of the addresses the calling
    thread holds and nothing else: a lock this thread did not get (a signal arrived while it
    waited) or that another thread holds is left alone, and no signal can stop the release
    halfway. A KeyboardInterrupt raised just after a lock was taken (Python looks for signals
    when a call returns) still reaches the handler below, which releases it; once __enter__
    has returned, the ``with`` statement guarantees __exit__.
    """

    __slots__ = ("_k", "_addrs", "_reader")

    def __init__(self, kernels, addresses, reader: bool = False):
        self._k = kernels
        self._addrs = list(addresses)
        self._reader = reader

    def __enter__(self) -> Held:
        k, taken = self._k, []
        try:
            for address in self._addrs:
                taken.append(address)
                k.lock(address, self._reader)
        except EvtchnError as exc:
            if exc.errno == E.EDEADLK:  # held by this thread outside this block: not ours
                taken.pop()
            k.unlock_owned(taken)
            raise
        except BaseException:
            k.unlock_owned(taken)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._k.unlock_owned(self._addrs)
