"""Benchmark cases. Each case sets up one evtchn host per ABI and runs, on the same memory,
evtchn (a compiled backend, in spawned worker processes) and the C yardstick, alternately.

stream1x1  one sender domain, one receiving vCPU (dom0 vCPU 0), `ports` interdomain ports.
           The sender calls send_many over the ports in batches of `batch`; the vCPU calls
           consume_into with a buffer of `cap` ports and, when a call delivers nothing, polls
           its upcall flag for up to `spin_us` and then blocks in wait(). Flow control: the
           sender starts a batch only while at most `window` events would be in flight
           (sent edges - delivered), so sends do not pile up on ports still pending
           (window=0: no flow control). Rate = events delivered / time from the common start
           to the last delivery. After every run the port state is checked: every new edge
           the sender made was delivered exactly once and nothing is left pending or linked.

isolated   the same host and ports, one process, nothing racing: send_many one batch, then
           consume_into until drained, repeat; the send and the consume time are summed
           separately. No cache line moves between CPUs and nobody waits, so these rates are
           the kernels' own cost per event plus each call's overhead (a diagnostic for the
           stream figures, which are dominated by what the two processes do to each other).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import subprocess
import time

import numpy as np

from evtchn import Host
from evtchn import layout as L
from evtchn.memory import DomainMemory, Segment

from . import workers as W

CTX = multiprocessing.get_context("spawn")
START_DELAY = 0.05  # s between handing out a run and its common start
JOIN_TIMEOUT = 10.0  # s to wait for a worker to stop before killing it
RUN_MARGIN = 60.0  # s a run may take beyond its duration before it is abandoned
ISOLATED_SHARE = 0.5  # an isolated run lasts this fraction of a stream run
WARMUP = 0.1  # s of untimed evtchn run before the measured ones


class BenchError(RuntimeError):
    pass


@dataclasses.dataclass
class StreamConfig:
    ports: int = 1024
    batch: int = 1024
    window: int = 1024
    cap: int = 4096
    spin_us: float = 50.0
    duration: float = 1.0
    wait_timeout: float = 0.01
    pin: tuple | None = None  # (sender cpu, vcpu cpu), or None: let the scheduler place

    def check(self) -> None:
        if self.ports < 1 or self.batch < 1 or self.ports % self.batch:
            raise BenchError(
                f"ports ({self.ports}) must be a positive multiple of batch ({self.batch})"
            )
        if self.window and self.window < self.batch:
            raise BenchError(f"window ({self.window}) must be 0 or at least batch ({self.batch})")
        if self.cap < 1 or self.duration <= 0 or self.spin_us < 0 or self.wait_timeout <= 0:
            raise BenchError("cap, duration and wait_timeout must be positive, spin_us >= 0")


def _ranges(ports) -> str:
    """[1, 2, 3, 7] -> '1-3,7' (the C program's --ports syntax)."""
    out, ports = [], sorted(ports)
    lo = prev = ports[0]
    for p in ports[1:] + [None]:
        if p is not None and p == prev + 1:
            prev = p
            continue
        out.append(f"{lo}-{prev}" if lo != prev else f"{lo}")
        if p is not None:
            lo = prev = p
    return ",".join(out)


class _Worker:
    """A spawned worker process and the parent's end of its pipe."""

    def __init__(self, target, args, what: str):
        self.what = what
        self.conn, child = CTX.Pipe()
        self.proc = CTX.Process(target=target, args=(child, *args), name=what, daemon=True)
        self.proc.start()
        child.close()

    def expect(self, timeout: float):
        if not self.conn.poll(timeout):
            raise BenchError(f"{self.what} did not answer within {timeout:.0f} s")
        try:
            kind, value = self.conn.recv()
        except EOFError:
            raise BenchError(f"{self.what} died (exit code {self.proc.exitcode})") from None
        if kind == "error":
            raise BenchError(f"{self.what} failed:\n{value}")
        return value

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(JOIN_TIMEOUT)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(JOIN_TIMEOUT)
        self.conn.close()


class Stream:
    """The stream1x1 case on one ABI: the host, its bound ports, and the evtchn workers."""

    name = "stream1x1"

    def __init__(self, abi: str, backend: str | None, cfg: StreamConfig):
        cfg.check()
        self.abi, self.backend, self.cfg = abi, backend, cfg
        self.workers: list[_Worker] = []
        self._dm0 = None
        # Without an evtchn side (C only) the oracle backend is enough to set up and check.
        self.host = Host(backend or "reference")
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg = self.cfg
        self.dom0 = self.host.create_domain(abi=self.abi, vcpus=1)
        self.domu = self.host.create_domain(abi=self.abi, vcpus=1)
        recv = self.dom0.alloc_unbound_many(self.domu.domid, cfg.ports)
        self.recv_ports = recv.tolist()
        self.send_ports = self.domu.bind_interdomain_many(self.dom0.domid, recv).tolist()
        self.vcpu = 0
        # Read-only view of dom0 for the kick counter (the same memory; never unlinked here).
        self._dm0 = DomainMemory(Segment(L.domain_segment_name(self.host.name, self.dom0.domid)))
        self._drain()

    # -- checks ---------------------------------------------------------------------------
    def _drain(self) -> int:
        """Consume whatever is left on the vCPU; returns how many events that was."""
        return len(self.dom0.consume(self.vcpu))

    def _kicks(self) -> int:
        return self._dm0.xen_vcpu_u32(self.vcpu, L.X_KICK)

    def _left(self) -> int:
        d = self.dom0
        return sum(1 for p in self.recv_ports if d.is_pending(p) or d.is_linked(p))

    def _after(self, rec: dict, kicks_before: int) -> dict:
        rec["kicks"] = (self._kicks() - kicks_before) & 0xFFFFFFFF
        rec["left_pending"] = self._left()
        rec["drained_after"] = self._drain()
        rec["lost"] = rec["edges"] - rec["delivered"]
        rec["events_per_s"] = (
            rec["delivered"] / (rec["elapsed_ns"] / 1e9) if rec["elapsed_ns"] > 0 else 0.0
        )
        rec["events_per_call"] = rec["delivered"] / max(1, rec["nonempty_calls"])
        rec["ok"] = rec["lost"] == 0 and rec["left_pending"] == 0 and rec["drained_after"] == 0
        return rec

    # -- evtchn ---------------------------------------------------------------------------
    def start_workers(self) -> None:
        self.ctl = CTX.RawArray("q", W.CTL_SIZE)
        sender_cpu, vcpu_cpu = self.cfg.pin or (None, None)
        self.sender = _Worker(
            W.sender_main,
            (self.host.name, self.backend, self.domu.domid, self.send_ports, self.ctl, sender_cpu),
            f"{self.abi} sender",
        )
        self.workers.append(self.sender)
        self.vcpu_w = _Worker(
            W.vcpu_main,
            (self.host.name, self.backend, self.dom0.domid, self.vcpu, self.ctl, vcpu_cpu),
            f"{self.abi} vcpu",
        )
        self.workers.append(self.vcpu_w)
        for w in self.workers:
            w.expect(RUN_MARGIN)

    def warm_up(self) -> None:
        """One short untimed run: worker start-up, first touches, a JIT backend's compiles."""
        duration = self.cfg.duration
        self.cfg.duration = WARMUP
        try:
            self.run_evtchn()
        finally:
            self.cfg.duration = duration

    def run_evtchn(self) -> dict:
        cfg = self.cfg
        if not self.workers:
            self.start_workers()
        self.ctl[W.DONE] = 0
        self.ctl[W.PROGRESS] = 0
        kicks = self._kicks()
        params = {
            "start_ns": time.monotonic_ns() + int(START_DELAY * 1e9),
            "duration": cfg.duration,
            "batch": cfg.batch,
            "window": cfg.window,
            "cap": cfg.cap,
            "spin_ns": int(cfg.spin_us * 1000),
            "wait_timeout": cfg.wait_timeout,
        }
        for w in self.workers:
            w.conn.send(params)
        limit = START_DELAY + cfg.duration + RUN_MARGIN
        rec = {"impl": self.backend, **self.sender.expect(limit), **self.vcpu_w.expect(limit)}
        return self._after(rec, kicks)

    def run_isolated_evtchn(self) -> dict:
        """The isolated case in this process (the parent's Host uses the measured backend)."""
        cfg = self.cfg
        arr = np.ascontiguousarray(self.send_ports, dtype=np.uint32)
        chunks = [arr[i : i + cfg.batch] for i in range(0, len(arr), cfg.batch)]
        edges = np.zeros(cfg.batch, np.uint8)
        buf = np.empty(cfg.cap, np.uint32)
        send_many, consume_into, vcpu = self.domu.send_many, self.dom0.consume_into, self.vcpu
        clock = time.monotonic_ns
        sent = nedges = delivered = calls = batches = send_ns = consume_ns = 0
        affinity = os.sched_getaffinity(0)
        if cfg.pin:  # where the C program runs it too
            os.sched_setaffinity(0, {cfg.pin[0]})
        try:
            send_many(chunks[0], edges)  # untimed: a JIT backend compiles here
            self._drain()
            end = clock() + int(cfg.duration * ISOLATED_SHARE * 1e9)
            i = 0
            while clock() < end:
                t0 = clock()
                send_many(chunks[i], edges)
                t1 = clock()
                while True:
                    n = consume_into(vcpu, buf)
                    delivered += n
                    calls += 1
                    if n < cfg.cap:
                        break
                consume_ns += clock() - t1
                send_ns += t1 - t0
                nedges += int(np.count_nonzero(edges))
                sent += cfg.batch
                batches += 1
                i = i + 1 if i + 1 < len(chunks) else 0
        finally:
            os.sched_setaffinity(0, affinity)
        rec = {
            "impl": self.backend,
            "sent": sent,
            "edges": nedges,
            "delivered": delivered,
            "consume_calls": calls,
            "batches": batches,
            "send_ns": send_ns,
            "consume_ns": consume_ns,
        }
        return self._after_isolated(rec)

    def _after_isolated(self, rec: dict) -> dict:
        rec["left_pending"] = self._left()
        rec["drained_after"] = self._drain()
        rec["lost"] = rec["edges"] - rec["delivered"]
        rec["send_events_per_s"] = rec["edges"] / (rec["send_ns"] / 1e9)
        rec["consume_events_per_s"] = rec["delivered"] / (rec["consume_ns"] / 1e9)
        rec["ok"] = rec["lost"] == 0 and rec["left_pending"] == 0 and rec["drained_after"] == 0
        return rec

    # -- C --------------------------------------------------------------------------------
    def _c_command(self, exe) -> list:
        cfg = self.cfg
        cmd = [
            str(exe),
            "--host",
            self.host.name,
            "--sender",
            str(self.domu.domid),
            "--receiver",
            str(self.dom0.domid),
            "--vcpu",
            str(self.vcpu),
            "--ports",
            _ranges(self.send_ports),
            "--batch",
            str(cfg.batch),
            "--window",
            str(cfg.window),
            "--cap",
            str(cfg.cap),
            "--spin-ns",
            str(int(cfg.spin_us * 1000)),
            "--duration",
            str(cfg.duration),
            "--wait-timeout",
            str(cfg.wait_timeout),
        ]
        if cfg.pin:
            cmd += ["--pin", f"{cfg.pin[0]},{cfg.pin[1]}"]
        return cmd

    def _run_c(self, cmd) -> dict:
        cfg = self.cfg
        try:
            r = subprocess.run(
                cmd, capture_output=True, text=True, timeout=cfg.duration + RUN_MARGIN
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"the C program overran {cfg.duration + RUN_MARGIN:.0f} s") from None
        if r.returncode != 0:
            raise BenchError(f"the C program failed ({r.returncode}):\n{r.stderr}")
        rec = {"impl": "c", **json.loads(r.stdout)}
        rec["c_left_pending"] = rec.pop("left_pending")
        return rec

    def run_isolated_c(self, exe) -> dict:
        cmd = self._c_command(exe)
        cmd[cmd.index("--duration") + 1] = str(self.cfg.duration * ISOLATED_SHARE)
        return self._after_isolated(self._run_c(cmd + ["--isolated"]))

    def run_c(self, exe) -> dict:
        kicks = self._kicks()
        return self._after(self._run_c(self._c_command(exe)), kicks)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []
        self._dm0 = None
        self.host.close()
