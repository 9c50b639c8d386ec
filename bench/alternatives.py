"""What a Python user would otherwise reach for to notify another process, run as the stream
case runs evtchn: one sender process, one consumer process (pinned to the same two CPUs), a
common CLOCK_MONOTONIC start, the sender stops after `duration`, the consumer drains; rate =
events received / (last receipt - start). Flow control, so that no backlog piles up and a run
ends on time, is each channel's own where it has one: the queues are bounded (maxsize: `window`
events; put() blocks when full), a pipe's send blocks on its kernel buffer, a POSIX queue on its
message limit. An eventfd counter never blocks, so there the sender starts a chunk of 64 writes
only while at most `window` events are unread (the consumer publishes its count in shared
memory after every read), as evtchn's sender does in the stream case.

    mp_queue        multiprocessing.Queue, one put() per event (an int)
    mp_queue_batch  multiprocessing.Queue, one put() per list of `batch` ints; rate per event
    mp_pipe         multiprocessing.Pipe, one send() per event (an int)
    eventfd         os.eventfd: one write of 1 per event; the consumer's blocking read returns
                    the count written since its last read (events coalesce, like PENDING), and
                    the rate counts those events (reads, i.e. wake-ups, are reported apart)
    faster_fifo     faster_fifo.Queue, one put() per event        (only if importable)
    posix_mq        posix_ipc.MessageQueue, one send() per event   (only if importable)

Nothing is installed for this: an alternative that cannot be imported is skipped with a note.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import time
import traceback

from .cases import CTX, JOIN_TIMEOUT, RUN_MARGIN, START_DELAY, BenchError

SLOT = 8
DONE, SENT, DELIVERED, ELAPSED, READS, FAILED, START, READY_S, READY_C, PROGRESS = (
    i * SLOT for i in range(10)
)
CTL_SIZE = 10 * SLOT
CHUNK = 64  # events a sender makes between clock and flow-control checks

ALL = ("mp_queue", "mp_queue_batch", "mp_pipe", "eventfd", "faster_fifo", "posix_mq")
_NEEDS = {"faster_fifo": "faster_fifo", "posix_mq": "posix_ipc"}
DESCRIPTION = {
    "mp_queue": "multiprocessing.Queue, put per event",
    "mp_queue_batch": "multiprocessing.Queue, put per list of `batch`",
    "mp_pipe": "multiprocessing.Pipe, send per event",
    "eventfd": "os.eventfd, write per event, counter read",
    "faster_fifo": "faster_fifo.Queue, put per event",
    "posix_mq": "posix_ipc.MessageQueue, send per event",
}


def available(kind: str) -> str | None:
    """None if `kind` can run here, else why not."""
    mod = _NEEDS.get(kind)
    if mod and importlib.util.find_spec(mod) is None:
        return f"{mod} is not installed (not installed by the benchmark)"
    if kind == "eventfd" and not hasattr(os, "eventfd"):
        return "os.eventfd needs Linux and Python 3.10+"
    return None


class _Fd:
    """An fd handed to a spawned child: duplicated into it as a Connection's fd is."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _rebuild_fd, (reduction.DupFd(self.fd),)


def _rebuild_fd(dup) -> int:
    return dup.detach()


def _pin(cpu) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _ready_then_start(ctl, slot) -> int:
    """Say ready, wait for the parent's common start time, sleep until it; returns it."""
    ctl[slot] = 1
    while not ctl[START]:
        time.sleep(0.001)
    _sleep_until(ctl[START])
    return ctl[START]


def _sleep_until(t_ns: int) -> None:
    left = t_ns - time.monotonic_ns()
    if left > 0:
        time.sleep(left / 1e9)


def _guard(fn):
    @functools.wraps(fn)  # pickled by name: spawn must find it
    def run(kind, chan, ctl, *args):
        try:
            fn(kind, chan, ctl, *args)
        except BaseException:
            ctl[FAILED] = 1
            traceback.print_exc()
            raise

    return run


def _open_mq(name):
    import posix_ipc

    return posix_ipc.MessageQueue(name)


@_guard
def sender_main(kind, chan, ctl, duration, batch, window, cpu):
    _pin(cpu)
    clock = time.monotonic_ns
    sent = 0
    if kind == "posix_mq":
        chan = _open_mq(chan)
    start_ns = _ready_then_start(ctl, READY_S)
    deadline = start_ns + int(duration * 1e9)
    step = batch if kind == "mp_queue_batch" else CHUNK
    spin = window and kind == "eventfd"  # the others block on their own limits

    def go():  # flow control, then the deadline
        while spin and sent + step - ctl[PROGRESS] > window:
            if clock() >= deadline:
                return False
        return clock() < deadline

    if kind in ("mp_queue", "faster_fifo"):
        put = chan.put
        while go():
            for i in range(CHUNK):  # 64 events between clock reads
                put(i)
            sent += CHUNK
        put(None)
    elif kind == "mp_queue_batch":
        items = list(range(batch))
        put = chan.put
        while go():
            put(items)
            sent += batch
        put(None)
    elif kind == "mp_pipe":
        send = chan.send
        while go():
            for i in range(CHUNK):
                send(i)
            sent += CHUNK
        send(None)
    elif kind == "eventfd":
        write, fd = os.eventfd_write, chan
        while go():
            for _ in range(CHUNK):
                write(fd, 1)
            sent += CHUNK
        ctl[SENT] = sent
        ctl[DONE] = 1
        write(fd, 1)  # a last wake-up, not an event
    elif kind == "posix_mq":
        send = chan.send
        while go():
            for _ in range(CHUNK):
                send(b"1")
            sent += CHUNK
        send(b"")
    ctl[SENT] = sent
    ctl[DONE] = 1


@_guard
def consumer_main(kind, chan, ctl, duration, batch, window, cpu):
    _pin(cpu)
    clock = time.monotonic_ns
    got = reads = 0
    if kind == "posix_mq":
        chan = _open_mq(chan)
    start_ns = _ready_then_start(ctl, READY_C)
    last = start_ns
    if kind in ("mp_queue", "faster_fifo", "mp_pipe"):
        get = chan.recv if kind == "mp_pipe" else chan.get
        while True:
            item = get()
            if item is None:
                break
            got += 1
            reads += 1
            ctl[PROGRESS] = got
        last = clock()
    elif kind == "mp_queue_batch":
        get = chan.get
        while True:
            item = get()
            if item is None:
                break
            got += len(item)
            reads += 1
            ctl[PROGRESS] = got
        last = clock()
    elif kind == "eventfd":
        read, fd = os.eventfd_read, chan
        while True:
            got += read(fd)
            reads += 1
            ctl[PROGRESS] = got
            if ctl[DONE] and got >= ctl[SENT] + 1:
                break
        last = clock()
        got -= 1  # the sender's last wake-up
    elif kind == "posix_mq":
        receive = chan.receive
        while True:
            msg, _ = receive()
            if not msg:
                break
            got += 1
            reads += 1
            ctl[PROGRESS] = got
        last = clock()
    ctl[DELIVERED] = got
    ctl[READS] = reads
    ctl[ELAPSED] = last - start_ns


def run_one(kind: str, duration: float, batch: int, window: int, pin) -> dict:
    """One run of alternative `kind`; returns its counts and events_per_s."""
    ctl = CTX.RawArray("q", CTL_SIZE)
    cleanup = []
    if kind in ("mp_queue", "mp_queue_batch"):
        per_item = batch if kind == "mp_queue_batch" else 1
        q = CTX.Queue(max(2, window // per_item) if window else 0)
        chans = (q, q)
        cleanup.append(q.close)
    elif kind == "mp_pipe":
        a, b = CTX.Pipe(duplex=False)  # (receiving end, sending end)
        chans = (b, a)
        cleanup += [a.close, b.close]
    elif kind == "eventfd":
        fd = os.eventfd(0)
        chans = (_Fd(fd), _Fd(fd))
        cleanup.append(lambda: os.close(fd))
    elif kind == "faster_fifo":
        import faster_fifo

        q = faster_fifo.Queue(max_size_bytes=1 << 24)
        chans = (q, q)
        cleanup.append(q.close)
    elif kind == "posix_mq":
        import posix_ipc

        name = f"/evtchn-bench-{os.getpid()}"
        mq = posix_ipc.MessageQueue(name, posix_ipc.O_CREX)
        chans = (name, name)
        cleanup += [mq.close, mq.unlink]
    else:
        raise BenchError(f"unknown alternative {kind!r}")
    s_cpu, c_cpu = pin or (None, None)
    procs = []
    try:
        for target, chan, cpu in ((consumer_main, chans[1], c_cpu), (sender_main, chans[0], s_cpu)):
            p = CTX.Process(
                target=target,
                args=(kind, chan, ctl, duration, batch, window, cpu),
                name=f"{kind} {target.__name__}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        limit = time.monotonic() + RUN_MARGIN
        while not (ctl[READY_S] and ctl[READY_C]):  # both spawned and set up
            if time.monotonic() > limit or ctl[FAILED] or not all(p.is_alive() for p in procs):
                raise BenchError(f"alternative {kind}: a worker did not start")
            time.sleep(0.002)
        ctl[START] = time.monotonic_ns() + int(START_DELAY * 1e9)
        limit = time.monotonic() + START_DELAY + duration + RUN_MARGIN
        for p in procs:
            p.join(max(0.0, limit - time.monotonic()))
        if any(p.is_alive() for p in procs) or ctl[FAILED]:
            raise BenchError(
                f"alternative {kind} failed or overran (exit codes {[p.exitcode for p in procs]})"
            )
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(JOIN_TIMEOUT)
        for fn in cleanup:
            try:
                fn()
            except OSError:
                pass
    rec = {
        "impl": kind,
        "sent": ctl[SENT],
        "delivered": ctl[DELIVERED],
        "reads": ctl[READS],
        "elapsed_ns": ctl[ELAPSED],
    }
    rec["events_per_s"] = (
        rec["delivered"] / (rec["elapsed_ns"] / 1e9) if rec["elapsed_ns"] > 0 else 0.0
    )
    rec["ok"] = rec["delivered"] == rec["sent"]
    return rec
