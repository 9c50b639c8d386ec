"""EvtchnError: an OSError that carries the errno Xen returns for the same misuse."""

from __future__ import annotations

import errno as _errno
import operator
import os
from typing import Any


class EvtchnError(OSError):
    """A refused event-channel operation; ``.errno`` is Xen's (EINVAL, ENOSPC, ENOENT, ...)."""

    def __init__(self, code: int, message: str):
        super().__init__(code, f"{_errno.errorcode.get(code, code)}: {message}")

    @property
    def errname(self) -> str:
        """The errno's symbolic name, e.g. "EINVAL"."""
        code = self.errno
        return str(code) if code is None else _errno.errorcode.get(code, str(code))


class BatchError(EvtchnError):
    """A batch call (Domain.alloc_unbound_many, bind_interdomain_many) refused: ``.index`` is
    the first element the single op would have refused, ``.errno`` what it would have
    returned. A refused batch binds none of its elements."""

    def __init__(self, code: int, message: str, index: int):
        super().__init__(code, message)
        #: The first refused element (0-based); none of the batch was bound.
        self.index = index


class HostGoneError(EvtchnError):
    """The named host does not exist (any more), is not an evtchn host of this version, or was
    created in another pid namespace (its lock owners are thread ids of that namespace)."""


def fail(code: int, message: str) -> EvtchnError:
    return EvtchnError(code, message)


def strerror(code: int) -> str:
    return os.strerror(code)


def as_int(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise EvtchnError(_errno.EINVAL, f"{what} {value!r} is not an integer") from None
