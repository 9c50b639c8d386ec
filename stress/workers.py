"""The racing actors: senders (with their closers), vCPUs and chaos workers (maskers, movers).

Each actor is an object whose ``step()`` does one unit of work; ``worker_main`` runs one actor
in its own process (spawned or forked from a clean forkserver, never from the parent) and obeys
the parent's control words; the single-process crew (backends without cross-process atomics)
calls the same ``step()`` methods in turn. Worker functions live here, not in ``__main__``,
so that spawned children can import them.

Every counter an actor keeps lives in the stats segment (stress.shm) in rows only that actor
writes, so the parent can add them up without atomics once the actor acknowledged a pause.
"""

from __future__ import annotations

import errno
import gc
import os
import signal
import sys
import time
import traceback

import numpy as np
import numpy.random  # noqa: F401  (loaded now, not lazily in the middle of a run: stress.run)

from evtchn import EvtchnError, Host
from evtchn import layout as L
from evtchn.memory import DomainMemory, Segment

from . import duels as DU
from . import fast as F
from . import resetter as RS
from . import shm as S

monotonic_ns = time.monotonic_ns

# Violations found while racing (codes stored in the workers' rings; names in checks.py).
V_PERMA_DELIVERED = 1
V_WRONG_VCPU = 2
# 3 was "double-handled": now covered by V_WRONG_VCPU (see stress.checks)
V_LINKED_REUSE = 4
V_ENGINE_ERROR = 5
V_CLOSE_STUCK = 6
V_DEAD_DELIVERED = 7

WAIT_TIMEOUT = 0.05  # a blocked vCPU looks at the control words this often
PAUSE_SLEEP = 0.002
DUEL_NAP = 0.02


class Env:
    """One process's handles: the host, dom0, the sender domains and the stats segment."""

    def __init__(self, cfg, host: Host, stats: S.Stats):
        self.cfg, self.host, self.stats = cfg, host, stats
        self.dom0 = host.domain(0)
        self.sdoms = [host.domain(1 + i) for i in range(cfg.senders)]
        self.fifo = cfg.abi == "fifo"
        self.extra_sent = 0  # sends the parent made itself (ordered phase, duel set-up)
        self.kdom = host.domain(RS.kdomid(cfg)) if cfg.kchans else None  # stress.resetter
        # the compiled accounting (stress/fast.py), or None: the numpy code
        self.fast = F.load(cfg.fast_lib) if getattr(cfg, "fast_lib", None) else None


def words(row: np.ndarray) -> memoryview:
    """A u64 row of the stats segment as a memoryview: an element update costs ~80 ns, a
    numpy scalar one ~350 ns (the workers update their header a few times per batch)."""
    return memoryview(row).cast("B").cast("Q")


# ---------------------------------------------------------------------------------------------
class Sender:
    """Raises events on its own channels (each channel has exactly one sender), counts every
    new edge per dom0 port, stamps the first send after a port's last handling, and - as its
    closer - closes and rebinds some of its channels (it owns them, so no send is in flight)."""

    role = "sender"

    def __init__(self, env: Env, index: int, rng: np.random.Generator):
        self.env, self.index, self.rng = env, index, rng
        st, cfg = env.stats, env.cfg
        self.slot = st.sender_slot(index)
        self.hdr = st.hdr[self.slot]
        self.dom = env.sdoms[index]
        self.chans = np.flatnonzero(st.ch_sender == index).astype(np.int64)
        self.lport = st.ch_lport[self.chans].copy()
        self.dport = st.ch_dport[self.chans].copy()
        self.n = len(self.chans)
        self.edges = st.edges[index]
        self.destroyed = st.destroyed[index]
        self.stamp = st.stamp
        self.sampled = st.port_sampled if st.ctrl[S.C_SAMPLE_MASK] else None
        self.batch = cfg.batch
        self.buf_edges = np.zeros(max(cfg.batch, 8192), np.uint8)
        self.ones = np.ones(max(cfg.batch, 8192), np.uint32)
        self.hw = words(self.hdr)
        self.fast = None
        if env.fast is not None:
            self.fast = F.SenderAccount(
                env.fast,
                k_max=len(self.buf_edges),
                sampled=self.sampled,
                stamp=self.stamp,
                edges_row=self.edges,
                edges=self.buf_edges,
            )
        self.workload = cfg.workload
        # hot spot: a few channels take 90% of the sends
        hot_n = max(1, min(8, self.n // 64 or 1))
        self.hot = rng.choice(self.n, size=hot_n, replace=False) if self.n else np.zeros(0, int)
        # closed in decreasing port order, so that each allocation finds the port it needs at
        # evtchn's allocation hint (the lowest port freed) instead of scanning up to it
        self.closable = self._closable_order()
        self.close_at = 0
        rate = cfg.closes / max(1, cfg.senders)
        self.close_every = (1.0 / rate) if rate > 0 and len(self.closable) else None
        self.next_close = time.monotonic() + (self.close_every or 0) * rng.random()
        self.storming = cfg.workload == "storm" and index == 0

    # -- the workload --------------------------------------------------------------------------
    def pick(self, k: int) -> np.ndarray:
        rng = self.rng
        if self.workload == "hotspot":
            pos = rng.integers(0, self.n, k)
            hot = rng.random(k) < 0.9
            pos[hot] = self.hot[rng.integers(0, len(self.hot), int(hot.sum()))]
            return pos
        if self.storming:
            return self.hot[rng.integers(0, len(self.hot), k)]
        return rng.integers(0, self.n, k)

    def pace(self) -> tuple[int, float]:
        """(batch size, seconds to sleep after it) for this sender under the workload."""
        if self.workload == "bursts":
            # Every sender bursts in the same 20 ms of each 100 ms: all vCPUs wake at once.
            phase = (monotonic_ns() // 1_000_000) % 100
            if phase >= 20:
                return 0, min(0.005, (100 - phase) / 1000)
            return self.batch, 0.0
        if self.workload == "storm":
            if self.storming:
                return max(self.batch, 8192), 0.0
            return 64, 0.002
        return self.batch, 0.0

    def step(self) -> bool:
        if self.close_every is not None:
            now = time.monotonic()
            if now >= self.next_close:  # no catching up after a pause
                self.next_close = now + self.close_every * (0.5 + self.rng.random())
                self.close_and_rebind()
        if not self.n:
            return False
        k, nap = self.pace()
        if k:
            self.send_batch(k)
        if nap:
            time.sleep(nap)
        return k > 0

    def send_batch(self, k: int) -> None:
        """Stamp the sampled ports that carry no stamp (their first send since their last
        handling), send_many the k picked channels, tally the new edges per dom0 port."""
        pos = self.pick(k)
        t0 = monotonic_ns()
        fast = self.fast
        if fast is not None:
            fast.pick(pos, self.lport, self.dport, t0)
            lp = fast.lp[:k]
        else:
            lp = self.lport[pos]
            dp = self.dport[pos]
            sp = dp[self.sampled[dp]] if self.sampled is not None else dp
            fresh = sp[self.stamp[sp] == 0]
            self.stamp[fresh] = t0
        edges = self.buf_edges[:k]
        try:
            self.dom.send_many(lp, edges)
        except EvtchnError as exc:
            # A sender's own channels are never refused: that is an engine fault.
            self.env.stats.record(self.slot, V_ENGINE_ERROR, 0, 0, exc.errno or 0)
            self.hdr[S.H_ERRNO] = exc.errno or 0
            return
        if fast is not None:
            ne = fast.tally(k)
        else:
            hit = edges.view(bool)
            ne = int(np.count_nonzero(hit))
            if ne:
                np.add.at(self.edges, dp[hit], self.ones[:ne])
        h = self.hw
        h[S.H_SENT] += k
        h[S.H_EDGES] += ne
        h[S.H_BATCHES] += 1
        h[S.H_BUSY_NS] += monotonic_ns() - t0

    # -- the closer ----------------------------------------------------------------------------
    def close_and_rebind(self) -> None:
        """Linux's unbind then a fresh bind, on one of this sender's CLOSE-class channels.

        Mostly the sender's end is closed (dom0's port goes back to unbound, its pending
        event stays) and bound again to the same dom0 port. One time in four dom0's end is
        closed: masked first (as Linux's unbind does), the port's vCPU let finish any handler
        that may have seen it unmasked, a still-pending edge counted as destroyed (close
        clears PENDING), both ends closed, and a new dom0 port allocated - usually after the
        old one left its queue, sometimes at once, so that the engine must skip a closed port
        that is still LINKED (R12); a LINKED port handed out is a violation."""
        env, st, rng = self.env, self.env.stats, self.rng
        dom0 = env.dom0
        i = int(self.closable[self.close_at % len(self.closable)])
        self.close_at += 1
        c = int(self.chans[i])
        p, lp = int(self.dport[i]), int(self.lport[i])
        v = int(st.ch_vcpu[c])
        if rng.random() < 0.75:
            self.dom.close(lp)
            lp2 = self._bind(p)
            self.lport[i] = st.ch_lport[c] = lp2
            self.hdr[S.H_CLOSES] += 1
            return
        dom0.mask(p)
        self._wait_vcpu_quiet(v)
        if dom0.is_pending(p):
            self.destroyed[p] += 1
            self.hdr[S.H_DESTROYED] += 1
        st.port_class[p] = 0
        st.port_tag[p] = S.TAG_DEAD
        dom0.close(p)
        self.dom.close(lp)
        self.stamp[p] = 0
        if rng.random() < 0.75:  # let the closed port leave its queue
            deadline = time.monotonic() + 0.2
            while dom0.is_linked(p) and time.monotonic() < deadline and not st.ctrl[S.C_HOLD]:
                time.sleep(0.001)
        deadline = time.monotonic() + 5.0
        while True:
            try:
                p2 = dom0.alloc_unbound(self.dom.domid)
                break
            except EvtchnError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if time.monotonic() > deadline or st.ctrl[S.C_STOP]:
                    # No port came free: closed ports stay LINKED (R20). Leave the channel
                    # down and report it.
                    st.record(self.slot, V_CLOSE_STUCK, p, v, 0, 0, monotonic_ns())
                    self._retire(i)
                    return
                time.sleep(0.002)
        if dom0.is_linked(p2):
            st.record(self.slot, V_LINKED_REUSE, p2, v, p, 0, monotonic_ns())
        dom0.bind_vcpu(p2, v)
        if env.fifo:
            dom0.set_priority(p2, int(st.ch_prio[c]))
        st.port_tag[p2] = v
        st.port_class[p2] = S.CL_CLOSE | S.CL_LIVE
        self.stamp[p2] = 0
        lp2 = self._bind(p2)
        self.dport[i], self.lport[i] = p2, lp2
        st.ch_dport[c], st.ch_lport[c] = p2, lp2
        self.hdr[S.H_CLOSES] += 1

    def _bind(self, dport: int) -> int:
        """bind_interdomain to dom0's `dport`; the new local port is always set pending (the
        spurious bind edge lands on this sender's domain): drain it, so that the sender
        domain's closed ports leave its queue and can be allocated again."""
        lp = self.dom.bind_interdomain(0, dport)
        self.dom.consume(0)
        return lp

    def _closable_order(self) -> np.ndarray:
        pos = np.flatnonzero(self.env.stats.ch_class[self.chans] & S.CL_CLOSE)
        return pos[np.argsort(-self.dport[pos].astype(np.int64), kind="stable")]

    def _retire(self, i: int) -> None:
        if len(self.closable) <= 1:
            self.close_every = None
        keep = np.ones(self.n, bool)
        keep[i] = False
        self.chans, self.lport, self.dport = self.chans[keep], self.lport[keep], self.dport[keep]
        self.n -= 1
        self.closable = self._closable_order()
        if self.n:
            self.hot = self.hot[self.hot < self.n]
            if not len(self.hot):
                self.hot = np.zeros(1, np.int64)

    def _wait_vcpu_quiet(self, v: int) -> None:
        """Wait until vCPU v is not inside consume + handler (its seqcount is even), so no
        consume that read the port before the mask can still deliver it."""
        seq = self.env.stats.hdr[self.env.stats.vcpu_slot(v)]
        s0 = int(seq[S.H_SEQ])
        if not s0 & 1:
            return
        deadline = time.monotonic() + 10.0
        while int(seq[S.H_SEQ]) == s0:
            if time.monotonic() > deadline or self.env.stats.ctrl[S.C_STOP]:
                return
            time.sleep(0.0002)


# ---------------------------------------------------------------------------------------------
def hist_index(lat: np.ndarray) -> np.ndarray:
    """Log2 buckets with HIST_SUB linear sub-buckets (about 6% resolution) for ns values."""
    x = np.maximum(lat, 1).astype(np.float64)
    m, e = np.frexp(x)  # x = m * 2**e, m in [0.5, 1)
    sub = ((m * 2 - 1) * S.HIST_SUB).astype(np.int64)
    idx = (e.astype(np.int64) - 1) * S.HIST_SUB + sub
    return np.clip(idx, 0, S.HIST_BUCKETS - 1)


def hist_value(idx: np.ndarray) -> np.ndarray:
    """The middle of each bucket, in ns."""
    e = idx // S.HIST_SUB
    sub = idx % S.HIST_SUB
    return np.ldexp(1 + (sub + 0.5) / S.HIST_SUB, e)


class VCPU:
    """dom0's vCPU `v`: blocks until its upcall is pending, runs the upcall handler (consume)
    in batches, and accounts every delivered port: count, latency sample, and the checks that
    can be made on the spot (masked-for-the-whole-run port delivered, delivered on a vCPU the
    port is not bound to, the same port in two vCPUs' handlers at once)."""

    role = "vcpu"

    def __init__(self, env: Env, v: int, inline: bool = False):
        self.env, self.v, self.inline = env, v, inline
        st, cfg = env.stats, env.cfg
        self.slot = st.vcpu_slot(v)
        self.hdr = st.hdr[self.slot]
        self.dom0 = env.dom0
        self.buf = np.zeros(cfg.consume_batch, np.uint32)
        self.ones = np.ones(cfg.consume_batch, np.uint32)
        self.delivered = st.delivered[v]
        self.lat_sum = st.lat_sum[v]
        self.lat_cnt = st.lat_cnt[v]
        self.hist = st.hist[v]
        self.stamp = st.stamp
        self.port_tag = st.port_tag
        self.sampled = st.port_sampled if st.ctrl[S.C_SAMPLE_MASK] else None
        self.active = st.active
        self.tag = v + 1
        self.lat_max = 0
        self._lat_ports, self._lat_stamps, self._lat_now, self._lat_n = [], [], [], 0
        self.nap = 0.0 if inline else cfg.nap
        self.hw = words(self.hdr)
        self._dm = None
        self.fast = None
        if env.fast is not None:
            self.fast = F.VcpuAccount(
                env.fast,
                buf=self.buf,
                delivered=self.delivered,
                port_tag=self.port_tag,
                sampled=None if self.sampled is None else self.sampled.view(np.uint8),
                stamp=self.stamp,
                lat_sum=self.lat_sum,
                lat_cnt=self.lat_cnt,
                hist=self.hist,
                active=self.active,
                hdr=self.hdr,
                v=v,
                tag=self.tag,
                tag_any=S.TAG_ANY,
                tag_dead=S.TAG_DEAD,
                hist_sub=S.HIST_SUB,
                h=(S.H_DELIVERED, S.H_OVERLAPS, S.H_LAT_MAX, S.H_LAT_MAX_PORT),
            )

    def step(self) -> bool:
        h = self.hw
        if self.inline:
            if not self.dom0.upcall_pending(self.v):
                return False
        elif not self.dom0.wait(self.v, WAIT_TIMEOUT):
            h[S.H_TIMEOUTS] += 1
            return False
        h[S.H_WAKEUPS] += 1
        h[S.H_SEQ] += 1  # odd: inside the handler
        t0 = monotonic_ns()
        buf, fast, cap = self.buf, self.fast, len(self.buf)
        while True:
            n = self.dom0.consume_into(self.v, buf)
            h[S.H_BATCHES] += 1
            if not n:
                h[S.H_EMPTY] += 1
            elif fast is None:
                self.account(buf[:n])
            else:
                nbad = fast(n)
                if nbad:
                    self._bad(*fast.bad(nbad), monotonic_ns())
            if n < cap:
                break
        h[S.H_BUSY_NS] += monotonic_ns() - t0
        h[S.H_SEQ] += 1  # even: out of it
        if self.nap:
            time.sleep(self.nap)
        return True

    def race(self, ctrl: memoryview, h: memoryview, loops: int, parent_pid: int) -> int:
        """The worker loop's vCPU iterations while nothing is asked of it (no stop, hold or
        duel): step() and the loop's heartbeat, with every name a local, since this runs on
        each of the ~8000 wake-ups a second of a 64-vCPU run, with caches gone cold by the
        other processes. Returns the loop count, or -1 when the parent is gone."""
        if self.inline or self.fast is None:  # the general path
            return -2
        v, buf, cap, nap = self.v, self.buf, len(self.buf), self.nap
        wait, consume_into = self.dom0.wait, self.dom0.consume_into
        upcall = self.upcall_flag()
        acct = self.fast
        fn, ref = acct._fn, acct._ref
        clock, sleep, cpu_ns = monotonic_ns, time.sleep, time.process_time_ns
        C_STOP, C_HOLD, C_DUEL = S.C_STOP, S.C_HOLD, S.C_DUEL
        H_LOOPS, H_WAKEUPS, H_SEQ, H_BATCHES, H_EMPTY = (
            S.H_LOOPS,
            S.H_WAKEUPS,
            S.H_SEQ,
            S.H_BATCHES,
            S.H_EMPTY,
        )
        H_BUSY_NS, H_TIMEOUTS, H_CPU_NS = S.H_BUSY_NS, S.H_TIMEOUTS, S.H_CPU_NS
        h[S.H_STATE] = S.S_RUNNING
        while not (ctrl[C_STOP] or ctrl[C_HOLD] or ctrl[C_DUEL]):
            loops += 1
            h[H_LOOPS] = loops
            if not loops & 63:
                h[H_CPU_NS] = cpu_ns()
                if not S.pid_alive(parent_pid):
                    return -1
            # wait() returns at once when the upcall is pending, as it is after most naps:
            # read the flag first (the guest's evtchn_upcall_pending), which costs ~20 us
            # less than the call with the caches gone cold
            if not upcall[0] & 1 and not wait(v, WAIT_TIMEOUT):
                h[H_TIMEOUTS] += 1
                continue
            h[H_WAKEUPS] += 1
            h[H_SEQ] += 1  # odd: inside the handler
            t0 = clock()
            while True:
                n = consume_into(v, buf)
                h[H_BATCHES] += 1
                if n:
                    nbad = fn(ref, n)  # the accounting of step(), compiled
                    if nbad:
                        self._bad(*acct.bad(nbad), clock())
                else:
                    h[H_EMPTY] += 1
                if n < cap:
                    break
            h[H_BUSY_NS] += clock() - t0
            h[H_SEQ] += 1  # even: out of it
            if nap:
                sleep(nap)
        return loops

    def upcall_flag(self) -> memoryview:
        """This vCPU's vcpu_info.evtchn_upcall_pending byte in dom0's segment (mapped here
        once, read-only use; the creator unlinks it)."""
        if self._dm is None:
            name = L.domain_segment_name(self.env.host.name, self.dom0.domid)
            self._dm = DomainMemory(Segment(name))
        off = self._dm.layout.vcpu_info(self.v) + L.VI_UPCALL_PENDING
        return memoryview(self._dm.u8)[off : off + 1]

    def account(self, ports: np.ndarray) -> None:
        """The handler of a batch: count each delivery, check it was allowed here, take the
        sampled ports' send stamps, and mark moved ports as in this handler (another vCPU
        seeing the mark has the same port in its handler at once, which R5 allows only for
        moved ports). Few numpy calls in the common case: this runs for every wake-up."""
        now = monotonic_ns()
        k = len(ports)
        np.add.at(self.delivered, ports, self.ones[:k])
        self.hdr[S.H_DELIVERED] += k
        tag = self.port_tag[ports]
        odd = tag != self.v
        moved = None
        if odd.any():  # moved ports, or a violation
            t_odd = tag[odd]
            bad = t_odd != S.TAG_ANY
            if bad.any():
                self._bad(ports[odd][bad], t_odd[bad], now)
            moved = ports[odd][~bad]
            if len(moved):
                before = self.active[moved]
                self.active[moved] = self.tag
            else:
                moved = None
        sp = ports[self.sampled[ports]] if self.sampled is not None else ports
        if len(sp):
            st = self.stamp[sp]
            self.stamp[sp] = 0
            self._lat_ports.append(sp)
            self._lat_stamps.append(st)
            self._lat_now.append(now)
            self._lat_n += len(sp)
            if self._lat_n >= 4096 or len(self._lat_now) >= 64:
                self.flush_latency()
        if moved is not None:
            after = self.active[moved]
            clash = ((before != 0) & (before != self.tag)) | (after != self.tag)
            self.active[moved[after == self.tag]] = 0
            self.hdr[S.H_OVERLAPS] += int(np.count_nonzero(clash))

    def flush_latency(self) -> None:
        """Fold the stamps taken since the last flush into the shared latency tallies (done
        in bulk: the stamps were read and cleared at delivery, the arithmetic can wait)."""
        if not self._lat_now:
            return
        sp = np.concatenate(self._lat_ports)
        st = np.concatenate(self._lat_stamps).astype(np.int64)
        now = np.repeat(np.array(self._lat_now, np.int64), [len(a) for a in self._lat_ports])
        self._lat_ports, self._lat_stamps, self._lat_now, self._lat_n = [], [], [], 0
        keep = st != 0
        lat = now[keep] - st[keep]
        pp = sp[keep]
        ok = lat >= 0  # a stamp written after `now`: not this event
        if not ok.all():
            lat, pp = lat[ok], pp[ok]
        if not len(lat):
            return
        np.add.at(self.lat_sum, pp, lat.astype(np.uint64))
        np.add.at(self.lat_cnt, pp, np.ones(len(pp), np.uint32))
        self.hist += np.bincount(hist_index(lat), minlength=S.HIST_BUCKETS).astype(np.uint64)
        j = int(np.argmax(lat))
        # the header holds the maximum (the compiled accounting keeps it there too, and the
        # duels account through this code in either mode)
        if lat[j] > max(self.lat_max, int(self.hdr[S.H_LAT_MAX])):
            self.lat_max = int(lat[j])
            self.hdr[S.H_LAT_MAX] = self.lat_max
            self.hdr[S.H_LAT_MAX_PORT] = int(pp[j])

    def _bad(self, ports, tags, now) -> None:
        rec = self.env.stats.record
        for p, t in zip(ports[:8].tolist(), tags[:8].tolist()):
            if t == S.TAG_PERMA:
                rec(self.slot, V_PERMA_DELIVERED, p, self.v, 0, 0, now)
            elif t == S.TAG_DEAD:
                rec(self.slot, V_DEAD_DELIVERED, p, self.v, 0, 0, now)
            else:
                rec(self.slot, V_WRONG_VCPU, p, self.v, t, 0, now)


# ---------------------------------------------------------------------------------------------
class _Unmasker:
    """FIFO's EVTCHNOP_unmask relinks a pending event with set_pending, which sets PENDING
    again if a vCPU acked the event in between: a new event that no send made (Xen does the
    same). Domain.unmask returns 1 when that happened; such edges are counted (per chaos worker
    and port) like the senders' own. Should an engine not report them (None), every unmask of
    the port is noted as one that may have made an edge instead, and the phantom check allows
    that many extra deliveries on the port."""

    def __init__(self, env, index: int):
        st = env.stats
        self.dom0 = env.dom0
        self.fifo = env.fifo
        self.extra = st.extra[index]
        self.maybe = st.maybe[index]

    def __call__(self, port: int) -> None:
        made = self.dom0.unmask(port)
        if not self.fifo:
            return
        if made is None:
            self.maybe[port] += 1
        elif made:
            self.extra[port] += made


class Masker:
    """Keeps a rolling set of MASK-class dom0 ports masked: each op unmasks the oldest and
    masks a new one, so events pile up behind masks and are re-raised by the unmask."""

    role = "masker"
    HOLD = 32

    def __init__(self, env: Env, index: int, rng: np.random.Generator):
        self.env, self.index, self.rng = env, index, rng
        st = env.stats
        self.slot = st.chaos_slot(index)
        self.hdr = st.hdr[self.slot]
        self.ports = st.ch_dport[np.flatnonzero(st.ch_class & S.CL_MASK)].copy()
        self.held: list[int] = []
        self.rate = env.cfg.masks
        self.unmask = _Unmasker(env, index)

    def step(self) -> bool:
        if not len(self.ports):
            return False
        dom0 = self.env.dom0
        if len(self.held) >= min(self.HOLD, max(1, len(self.ports) // 2)):
            self.unmask(self.held.pop(0))
        held = set(self.held)
        for _ in range(8):
            p = int(self.ports[self.rng.integers(0, len(self.ports))])
            if p not in held:
                dom0.mask(p)
                self.held.append(p)
                break
        self.hdr[S.H_OPS] += 1
        self.hdr[S.H_MASKS] += 1
        return True

    def finish(self) -> None:
        while self.held:
            self.unmask(self.held.pop(0))


class Mover:
    """bind_vcpu and (fifo) set_priority on MOVE-class ports while their events are in
    flight (R5, R7, R8)."""

    role = "mover"

    def __init__(self, env: Env, index: int, rng: np.random.Generator):
        self.env, self.index, self.rng = env, index, rng
        st = env.stats
        self.slot = st.chaos_slot(index)
        self.hdr = st.hdr[self.slot]
        self.ports = st.ch_dport[np.flatnonzero(st.ch_class & S.CL_MOVE)].copy()
        self.vcpus = env.cfg.vcpus
        self.rate = env.cfg.moves
        self.unmask = _Unmasker(env, index)

    def step(self) -> bool:
        if not len(self.ports):
            return False
        dom0, rng = self.env.dom0, self.rng
        p = int(self.ports[rng.integers(0, len(self.ports))])
        if self.env.fifo and rng.random() < 0.5:
            dom0.set_priority(p, int(rng.integers(0, L.FIFO_MAX_QUEUES)))
            self.hdr[S.H_PRIOS] += 1
        else:
            # Linux's rebind done step by step (mask, EVTCHNOP_bind_vcpu, unmask), so that the
            # unmask's report of an event it made itself can be counted
            dom0.mask(p)
            dom0.bind_vcpu(p, int(rng.integers(0, self.vcpus)))
            self.unmask(p)
            self.hdr[S.H_MOVES] += 1
        self.hdr[S.H_OPS] += 1
        return True

    def finish(self) -> None:
        pass


def make_chaos(env: Env, seeds) -> list:
    """The chaos actors this configuration asks for, in slot order."""
    out = []
    cfg = env.cfg
    if cfg.masks > 0:
        out.append(Masker(env, len(out), np.random.default_rng(seeds[len(out)])))
    if cfg.moves > 0:
        out.append(Mover(env, len(out), np.random.default_rng(seeds[len(out)])))
    return out


def seeds_for(seed: int, senders: int, chaos: int):
    """Independent, reproducible streams: setup, each sender, each chaos worker."""
    ss = np.random.SeedSequence(seed)
    setup, snd, cha = ss.spawn(3)
    return setup, snd.spawn(senders), cha.spawn(max(chaos, 1))


# ---------------------------------------------------------------------------------------------
def worker_main(
    role: str, index: int, cfg, host_name: str, stats_name: str, parent_pid: int = 0
) -> None:
    """Process entry: attach, build the actor, obey the control words until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    set_comm(f"st-{role}-{index}")
    stats = host = None
    slot = None
    try:
        stats = S.Stats.attach(stats_name, cfg.shape)
        host = Host.attach(host_name, cfg.backend)
        host.warm_up()  # numba: load the kernels before READY
        env = Env(cfg, host, stats)
        _, snd_seeds, chaos_seeds = seeds_for(cfg.seed, cfg.senders, cfg.n_chaos)
        if role == "sender":
            actor = Sender(env, index, np.random.default_rng(snd_seeds[index]))
        elif role == "vcpu":
            actor = VCPU(env, index)
        elif role in RS.ROLES:
            k_seeds = RS.seeds(cfg.seed, cfg.shape.kworkers)
            i = {"ksender": 0, "kvcpu": 1}.get(role, 2 + index)
            actor = RS.make(role, env, index, np.random.default_rng(k_seeds[i]))
        else:
            actor = make_chaos(env, chaos_seeds)[index]
        slot = actor.slot
        # the loop makes no reference cycles; a collection pass would only cost time
        gc.freeze()
        gc.disable()
        _serve(actor, env, parent_pid or os.getppid())
    except BaseException:
        if stats is not None and slot is not None:
            stats.hdr[slot][S.H_STATE] = S.S_FAILED
        sys.stderr.write(
            f"stress worker {role}-{index} (pid {os.getpid()}) failed:\n{traceback.format_exc()}"
        )
        sys.stderr.flush()
        os._exit(1)
    if host is not None:
        host.close()
    if stats is not None:
        stats.close()


def _serve(actor, env: Env, parent_pid: int) -> None:
    """The worker loop. `parent_pid` is the stress run's main process: a forkserver child's
    own parent is the forkserver, which outlives a killed main process as long as any worker
    (each holds the forkserver's liveness pipe) is alive, so that is the pid to watch."""
    st = env.stats
    ctrl, h = words(st.ctrl), words(actor.hdr)  # plain loads and stores, as numpy's
    h[S.H_PID] = os.getpid()
    h[S.H_STATE] = S.S_READY
    role = actor.role
    is_vcpu = role in ("vcpu", "kvcpu")  # held and drained by the parent
    is_chaos = role in ("masker", "mover")
    rate = getattr(actor, "rate", 0.0)
    budget, t_budget = 0.0, time.monotonic()
    finished = False
    loops = 0
    while not ctrl[S.C_STOP]:
        loops += 1
        h[S.H_LOOPS] = loops
        if loops & 63 == 0:
            h[S.H_CPU_NS] = time.process_time_ns()
            if not S.pid_alive(parent_pid):
                return  # the parent is gone: leave quietly
        duel = int(ctrl[S.C_DUEL])
        if duel:
            if h[S.H_DUEL_ACK] != duel:
                d = st.duel
                if actor.slot in (int(d[DU.D_A_SLOT]), int(d[DU.D_B_SLOT])):
                    set_comm("st-duel-B" if is_vcpu else "st-duel-A")
                    (DU.run_b if is_vcpu else DU.run_a)(actor, d)
                    set_comm(f"st-{role}-{actor_index(actor)}")
                elif is_vcpu and actor.slot == int(d[DU.D_C_SLOT]) and d[DU.D_C_SLOT]:
                    set_comm("st-duel-C")
                    DU.run_c(actor, d)
                    set_comm(f"st-{role}-{actor_index(actor)}")
                h[S.H_DUEL_ACK] = duel
            else:  # a bystander: wake up seldom, leave the CPUs to the duel
                time.sleep(DUEL_NAP)
                continue
        if is_vcpu:
            gen = int(ctrl[S.C_HOLD])
            if gen:
                if h[S.H_ACK] != gen:
                    actor.flush_latency()  # the parent may read the tallies now
                h[S.H_ACK] = gen
                h[S.H_STATE] = S.S_HELD
                time.sleep(PAUSE_SLEEP)
                continue
            # dom0's vCPUs have a lean loop of their own; K's vCPU (stress.resetter) steps
            n = actor.race(ctrl, h, loops, parent_pid) if role == "vcpu" else -2
            if n == -1:
                return  # the parent is gone: leave quietly
            if n >= 0:
                loops = n
                continue
            h[S.H_STATE] = S.S_RUNNING
            actor.step()
            continue
        if is_chaos and ctrl[S.C_FINISH]:
            if not finished:
                actor.finish()
                finished = True
            h[S.H_ACK] = int(ctrl[S.C_FINISH])
            h[S.H_STATE] = S.S_FINISHED
            time.sleep(PAUSE_SLEEP)
            continue
        gen = int(ctrl[S.C_PAUSE])
        if gen:
            h[S.H_ACK] = gen
            h[S.H_STATE] = S.S_PAUSED
            time.sleep(PAUSE_SLEEP)
            t_budget = time.monotonic()
            continue
        h[S.H_STATE] = S.S_RUNNING
        if is_chaos:
            # rate-limited: do the ops owed since the last look, then nap a little
            now = time.monotonic()
            budget = min(budget + (now - t_budget) * rate, max(1.0, rate * 0.02))
            t_budget = now
            while budget >= 1.0:
                actor.step()
                budget -= 1.0
            time.sleep(0.002)
        else:
            actor.step()
    if is_vcpu:
        actor.flush_latency()
    h[S.H_CPU_NS] = time.process_time_ns()
    h[S.H_STATE] = S.S_DONE


def actor_index(actor) -> int:
    return getattr(actor, "v", getattr(actor, "index", 0))


_libc = None


def set_comm(name: str) -> None:
    """Name this process (Linux prctl PR_SET_NAME, at most 15 bytes) after its role, e.g.
    st-vcpu-3, st-resetter-0, or st-duel-A while it takes side A of a duel: `ps -o comm`
    then shows who is who, and the tests pick the process of a role by it."""
    global _libc
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(15, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
