"""Throughput with N senders and N vCPUs: N sender processes, N vCPU processes (2N in all).

The receiving domain has N vCPUs; the sending domain has N x `ports` interdomain ports to it
(`ports` = 256 per pair, or fewer so that 2l's 4095 fit: 64 at N = 32; the same for every ABI),
`ports` of them bound (bind_vcpu) to each vCPU. Pair j is sender process j sending (send_many,
batches of `ports`) to the ports of vCPU j, with the stream case's flow control (at most
`ports` events in flight per pair), and vCPU process j consuming them; every pair runs the same
loops as stream1x1 (bench/workers.py) with its own control array, all from a common start.
Nothing is pinned: with more processes than CPUs the scheduler shares them out, so a sender
waiting on flow control yields its CPU (sched_yield) and a vCPU blocks in wait() at once
instead of polling first. Rate = all events delivered / the latest pair's last delivery -
start. After every run every edge must have been delivered exactly once, nothing left.
"""

from __future__ import annotations

import time

from evtchn import Host

from . import workers as W
from .cases import CTX, RUN_MARGIN, START_DELAY, BenchError, _Worker

PAIRS = (1, 2, 32)  # N: 2, 4 and 64 processes
QUICK_PAIRS = (1, 2)
PORTS = 256  # per pair at most, also the batch and the window
L2_USABLE = 64 * 64 - 1  # 2l's port limit (port 0 reserved)


def ports_per_pair(pairs: int) -> int:
    """The same for every ABI at a given N, so 2l's 4095 ports fit: 256, or the largest power
    of two that fits (64 at N = 32)."""
    n = PORTS
    while n * pairs > L2_USABLE:
        n //= 2
    return n


class Multi:
    """N sender + N vCPU worker processes on one host and ABI, kept across runs."""

    def __init__(
        self,
        abi: str,
        backend: str,
        pairs: int,
        ports: int | None = None,
        wait_timeout: float = 0.01,
    ):
        ports = ports or ports_per_pair(pairs)
        self.abi, self.backend, self.pairs, self.ports = abi, backend, pairs, ports
        self.wait_timeout = wait_timeout
        self.workers: list[_Worker] = []
        self.host = Host(backend)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        self.dom0 = self.host.create_domain(abi=self.abi, vcpus=self.pairs)
        self.domu = self.host.create_domain(abi=self.abi, vcpus=1)
        self.recv, self.send = [], []
        for j in range(self.pairs):
            r = self.dom0.alloc_unbound_many(self.domu.domid, self.ports).tolist()
            for rport in r:
                self.dom0.bind_vcpu(rport, j)
            self.recv.append(r)
            self.send.append(self.domu.bind_interdomain_many(self.dom0.domid, r).tolist())
        self._drain()
        self.ctls = [CTX.RawArray("q", W.CTL_SIZE) for _ in range(self.pairs)]
        name = self.host.name
        for j in range(self.pairs):  # vCPUs first: they must be there for the senders
            self.workers.append(
                _Worker(
                    W.vcpu_main,
                    (name, self.backend, self.dom0.domid, j, self.ctls[j], None),
                    f"{self.abi} vcpu {j}/{self.pairs}",
                )
            )
        for j in range(self.pairs):
            self.workers.append(
                _Worker(
                    W.sender_main,
                    (name, self.backend, self.domu.domid, self.send[j], self.ctls[j], None),
                    f"{self.abi} sender {j}/{self.pairs}",
                )
            )
        for w in self.workers:
            w.expect(RUN_MARGIN)

    def _drain(self) -> int:
        return sum(len(self.dom0.consume(v)) for v in range(self.pairs))

    def run(self, duration: float) -> dict:
        for ctl in self.ctls:
            ctl[W.DONE] = 0
            ctl[W.PROGRESS] = 0
        # Spawned processes may still be settling: start far enough ahead for all of them.
        start = time.monotonic_ns() + int((START_DELAY + 0.005 * len(self.workers)) * 1e9)
        params = {
            "start_ns": start,
            "duration": duration,
            "batch": self.ports,
            "window": self.ports,
            "cap": 4 * self.ports,
            "spin_ns": 0,
            "wait_timeout": self.wait_timeout,
            "yield": True,
        }
        for w in self.workers:
            w.conn.send(params)
        limit = START_DELAY + duration + RUN_MARGIN
        answers = [w.expect(limit) for w in self.workers]
        vcpus, senders = answers[: self.pairs], answers[self.pairs :]
        rec = {
            "impl": self.backend,
            "abi": self.abi,
            "pairs": self.pairs,
            "processes": 2 * self.pairs,
            "delivered": sum(a["delivered"] for a in vcpus),
            "edges": sum(a["edges"] for a in senders),
            "sent": sum(a["sent"] for a in senders),
            "waits": sum(a["waits"] for a in vcpus),
            "elapsed_ns": max(a["elapsed_ns"] for a in vcpus),
        }
        rec["left_pending"] = sum(
            1 for r in self.recv for p in r if self.dom0.is_pending(p) or self.dom0.is_linked(p)
        )
        rec["drained_after"] = self._drain()
        rec["lost"] = rec["edges"] - rec["delivered"]
        rec["events_per_s"] = (
            rec["delivered"] / (rec["elapsed_ns"] / 1e9) if rec["elapsed_ns"] > 0 else 0.0
        )
        rec["ok"] = (
            rec["lost"] == 0
            and rec["left_pending"] == 0
            and rec["drained_after"] == 0
            and rec["delivered"] > 0
        )
        return rec

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []
        self.host.close()


def check_pairs(pairs) -> None:
    for n in pairs:
        if n < 1 or n > 64:
            raise BenchError(f"pairs must be from 1 to 64, not {n}")
