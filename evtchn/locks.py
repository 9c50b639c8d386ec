"""Locks taken from Python (the control plane's event, channel, handler, reset and host locks).

The words are the kernels' robust spinlocks (evtchn.layout, "Lock words"): owned by the calling
thread, taken over from a dead owner, waited for without the GIL in slices that let Ctrl-C in.
``Held`` scopes them to a ``with`` block so that no way out of the block leaves one owned; it
is evtchn._core.Held when the Cython extension is built (any backend: the lock words are the
same), else the pure-Python _PyHeld.
"""

from __future__ import annotations

import errno as E
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .errors import EvtchnError


class _PyHeld:
    """Hold the locks at `addresses` for a ``with`` block: taken in the order given (read-type
    channel locks with `reader`; with `busy` only tried, and EvtchnError(EBUSY, busy) if a
    live owner holds one), released on every way out of the block.

    Release is one kernel call (``unlock_owned``) that frees each of the addresses the calling
    thread holds and nothing else: a lock this thread did not get (a signal arrived while it
    waited) or that another thread holds is left alone. A KeyboardInterrupt raised just after a
    lock was taken (Python looks for signals when a call returns) still reaches the handler
    below, which releases it (the address is recorded before the call).

    This pure-Python version is used only without the Cython extension; evtchn._core.Held
    does the same compiled, which also closes the window that remains here: Python looks for
    signals on entry to __exit__, before it releases.
    """

    __slots__ = ("_k", "_addrs", "_reader", "_busy")

    def __init__(
        self,
        kernels: Any,
        addresses: Iterable[int],
        reader: bool = False,
        busy: str | None = None,
    ) -> None:
        self._k = kernels
        self._addrs = list(addresses)
        self._reader = reader
        self._busy = busy

    def __enter__(self) -> _PyHeld:
        k, taken = self._k, list[int]()
        try:
            for address in self._addrs:
                taken.append(address)
                if self._busy is None:
                    k.lock(address, self._reader)
                elif not k.trylock(address):
                    taken.pop()
                    raise EvtchnError(E.EBUSY, self._busy)
        except EvtchnError as exc:
            if exc.errno == E.EDEADLK:  # held by this thread outside this block: not ours
                taken.pop()
            k.unlock_owned(taken)
            raise
        except BaseException:
            k.unlock_owned(taken)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._k.unlock_owned(self._addrs)


if TYPE_CHECKING:  # one type for both: evtchn._core.Held has _PyHeld's interface
    Held = _PyHeld
else:
    try:
        from ._core import Held
    except ImportError:  # the Cython extension is not built: the reference or numba backend
        Held = _PyHeld

__all__ = ["Held"]
