"""One stress run: set up the channels, race the workers, check at every quiescent point, report.

Phases of a run (the parent drives them through the control words of stress.shm):

1. setup: a host, dom0 with the ABI and --vcpus vCPUs, one sender domain per sender, and
   --ports interdomain channels (dom0 alloc_unbound, the sender binds) spread over dom0's
   vCPUs and, for fifo, over the 16 priorities; a few ports masked for the whole run.
2. race, cut every --check-interval seconds by a quiescent check: hold the vCPUs (queues
   fill while the senders go on), pause senders and chaos, check the held state, release and
   drain the vCPUs, check the exact per-port accounting, resume.
3. final: the same, with the chaos undone (maskers unmask what they hold), then a
   deterministic ordered phase on vCPU 0, a last drain and check, and the workers stop.

Backends whose kernels work across processes (cython) run every actor in its own process;
the others (reference) run the same actors interleaved in this process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
import threading
import time

import numpy as np

import evtchn
from evtchn import Host
from evtchn import layout as L

from . import checks as C
from . import config as CF
from . import duels as DU
from . import fast as F
from . import resetter as RS
from . import shm as S
from . import workers as W

monotonic = time.monotonic
CLK_TCK = os.sysconf("SC_CLK_TCK")


class WorkerError(RuntimeError):
    """A worker died or hung: the run ends with exit code 3."""


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM in the parent."""


# Ctrl-C / SIGTERM that reached the main process during the current run. The signal is
# raised where it lands (KeyboardInterrupt, Interrupted) and also remembered here, because
# library code may swallow it (an exception raised while a Cython module initialises, on the
# first use of numpy.random, is lost): checkpoint() raises it again, and the main process
# passes one in every wait loop, between phases and every few channels of the setup.
_caught: list[int] = []


def _raise_for(signum: int):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted("SIGTERM")


def _on_signal(signum, frame):
    _caught.append(signum)
    _raise_for(signum)


def checkpoint() -> None:
    """Raise a Ctrl-C / SIGTERM of this run that something swallowed."""
    if _caught:
        _raise_for(_caught[0])


@contextlib.contextmanager
def signals_for_run():
    """The run's own SIGINT and SIGTERM handlers (main thread only)."""
    _caught.clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def interrupts_held(raise_after: bool = True):
    """Hold Ctrl-C and SIGTERM back for a block that must not stop half-way: one that creates
    a shared-memory segment (stopped between creating and recording it, it would be left in
    /dev/shm) or takes engine locks from Python while workers run, and the teardown. A signal
    that came meanwhile is raised when the block ends (or, with raise_after=False, reported
    through the yielded list). Outside the main thread signals cannot be caught: no-op."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def note(signum, frame):
        got.append(signum)
        _caught.append(signum)

    old = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if got and raise_after:
            _raise_for(got[0])


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    env: W.Env
    names: list
    perma: np.ndarray  # bool per dom0 port
    plain: np.ndarray  # channels in no chaos class (for the ordered phase)
    seconds: float


def vcpu_for(port: int, cfg, nwords: int) -> int:
    """dom0 vCPU of a port: whole bitmap words per vCPU when there are enough words (so a
    vCPU's selector covers only its own ports), else round robin."""
    if cfg.abi != "fifo" and nwords >= cfg.vcpus:
        return (port // 64) % cfg.vcpus
    return port % cfg.vcpus


def setup(cfg, host: Host) -> Setup:
    t0 = time.perf_counter()
    stats = None
    size = {"word_bits": cfg.word_bits, "link_bits": cfg.link_bits}
    nchaos = cfg.n_chaos
    try:
        with interrupts_held():  # each segment is recorded (for its unlink) as it is created
            dom0 = host.create_domain(cfg.abi, vcpus=cfg.vcpus, **size)
            sdoms = [host.create_domain(cfg.abi, vcpus=1, **size) for _ in range(cfg.senders)]
            kdom = host.create_domain(cfg.abi, vcpus=1, **size) if cfg.kchans else None  # K
            cfg.nports = dom0.max_ports
            cfg.shape = S.Shape(
                cfg.senders,
                cfg.vcpus,
                nchaos,
                cfg.nports,
                cfg.channels,
                cfg.kchans,
                cfg.resetters if cfg.kchans else 0,
            )
            stats = S.Stats.create(cfg.shape)
            stats.ctrl[S.C_PHASE] = S.PH_SETUP
        env = W.Env(cfg, host, stats)
        setup_seed, _, _ = W.seeds_for(cfg.seed, cfg.senders, nchaos)
        rng = np.random.default_rng(setup_seed)
        n = cfg.channels
        cls = np.zeros(n, np.uint8)
        order = rng.permutation(n)
        at = 0
        for flag, frac, on in (
            (S.CL_PERMA, CF.FRACTION_PERMA, n >= 16),
            (S.CL_MASK, CF.FRACTION_MASK, cfg.masks > 0),
            (S.CL_MOVE, CF.FRACTION_MOVE, cfg.moves > 0),
            (S.CL_CLOSE, CF.FRACTION_CLOSE, cfg.closes > 0),
        ):
            if on:
                k = max(1, int(round(n * frac)))
                cls[order[at : at + k]] = flag
                at += k
        prios = rng.integers(0, L.FIFO_MAX_QUEUES, n)
        nwords = (n + 1 + 63) // 64
        ch_dport, ch_lport = stats.ch_dport, stats.ch_lport
        ch_sender, ch_vcpu, ch_prio = stats.ch_sender, stats.ch_vcpu, stats.ch_prio
        fifo = cfg.abi == "fifo"
        # dom0 allocates sequentially from port 1: a spare (freed after the setup) where the
        # next port is SPARE_EVERY - 1 mod SPARE_EVERY, then channel c for sender c % senders;
        # one batch call for all of dom0's ports, one per sender for its binds (evtchn.batch).
        remotes, is_spare, nxt = [], [], 1
        for c in range(n):
            if cfg.closes > 0 and nxt % CF.SPARE_EVERY == CF.SPARE_EVERY - 1:
                remotes.append(L.DOMID_SELF)
                is_spare.append(True)
                nxt += 1
            remotes.append(sdoms[c % cfg.senders].domid)
            is_spare.append(False)
            nxt += 1
        checkpoint()
        got = dom0.alloc_unbound_many(remotes)
        spare_at = np.asarray(is_spare, bool)
        spare = got[spare_at].tolist()
        ch_dport[:n] = got[~spare_at]
        ch_sender[:n] = np.arange(n) % cfg.senders
        for s, sd in enumerate(sdoms):
            checkpoint()
            ch_lport[s : n : cfg.senders] = sd.bind_interdomain_many(
                0, ch_dport[s : n : cfg.senders]
            )
        for c in range(n):
            if c & 1023 == 0:
                checkpoint()
            p = int(ch_dport[c])
            v = vcpu_for(p, cfg, nwords)
            if v:
                dom0.bind_vcpu(p, v)
            pr = int(prios[c]) if fifo else L.FIFO_PRIORITY_DEFAULT
            if fifo and pr != L.FIFO_PRIORITY_DEFAULT:
                dom0.set_priority(p, pr)
            ch_vcpu[c], ch_prio[c] = v, pr
        if kdom is not None:
            RS.setup(cfg, host, dom0, stats, kdom)
        for p in spare:
            dom0.close(p)
        for sd in sdoms:  # the bind edges landed on the senders' own ports: drop them
            sd.consume(0)
        stats.ch_class[:] = cls
        ports = ch_dport[:n].astype(np.int64)
        stats.port_class[ports] = cls | S.CL_LIVE
        stats.port_tag[:] = S.TAG_DEAD
        tag = ch_vcpu[:n].astype(np.uint16)
        tag[(cls & S.CL_MOVE) != 0] = S.TAG_ANY
        tag[(cls & S.CL_PERMA) != 0] = S.TAG_PERMA
        stats.port_tag[ports] = tag
        mask = sample_mask(n)
        stats.ctrl[S.C_SAMPLE_MASK] = mask
        # a seeded random sample, independent of the vCPU (ports are spread by p % vcpus)
        stats.port_sampled[:] = rng.random(cfg.nports) * (mask + 1) < 1
        for p in ports[(cls & S.CL_PERMA) != 0]:
            dom0.mask(int(p))
        perma = np.zeros(cfg.nports, bool)
        perma[ports[(cls & S.CL_PERMA) != 0]] = True
        names = (
            [f"sender-{i}" for i in range(cfg.senders)]
            + [f"vcpu-{v}" for v in range(cfg.vcpus)]
            + [f"{a.role}-{i}" for i, a in enumerate(_chaos_roles(cfg))]
            + RS.names(cfg)
        )
        return Setup(env, names, perma, np.flatnonzero(cls == 0), time.perf_counter() - t0)
    except BaseException:
        if stats is not None:
            stats.close()
        raise


def sample_mask(channels: int) -> int:
    """Latency is timed on every event of 1 port in mask + 1 (chosen at random): all ports up
    to 4096 channels, then a power-of-two fraction that keeps about 4096 of them."""
    k = 0
    while channels >> (k + 1) >= 4096:
        k += 1
    return (1 << k) - 1


class _Role:
    def __init__(self, role):
        self.role = role


def _chaos_roles(cfg):
    out = []
    if cfg.masks > 0:
        out.append(_Role("masker"))
    if cfg.moves > 0:
        out.append(_Role("mover"))
    return out


# ---------------------------------------------------------------------------------------------
class ProcessCrew:
    """Every actor in its own process; the parent watches them (exit codes, heartbeats)."""

    POLL = 0.01

    def __init__(self, cfg, su: Setup, progress=None):
        self.cfg, self.su, self.env = cfg, su, su.env
        self.st = su.env.stats
        self.names = su.names
        self.progress = progress
        self.procs: list[tuple[int, str, multiprocessing.Process]] = []
        self.stopping = False
        self.gen = 0
        self.beat = np.zeros(cfg.shape.workers, np.uint64)
        self.beat_t = np.zeros(cfg.shape.workers)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        ctx = multiprocessing.get_context(cfg.start_method)
        if cfg.start_method == "forkserver":
            ctx.set_forkserver_preload(["numpy", "evtchn", "stress.workers"])
        jobs = (
            [("sender", i) for i in range(cfg.senders)]
            + [("vcpu", v) for v in range(cfg.vcpus)]
            + [(r.role, i) for i, r in enumerate(_chaos_roles(cfg))]
            + [(n.rsplit("-", 1)[0], int(n.rsplit("-", 1)[1])) for n in RS.names(cfg)]
        )
        args = (cfg, self.env.host.name, self.st.name, os.getpid())
        with _sigint_blocked_for_children():
            for slot, (role, i) in enumerate(jobs):
                p = ctx.Process(
                    target=W.worker_main, args=(role, i) + args, name=self.names[slot], daemon=True
                )
                p.start()
                self.procs.append((slot, self.names[slot], p))
        self.wait_for(
            lambda: (self.st.hdr[:, S.H_STATE] >= S.S_READY).all(),
            max(120.0, 2.0 * len(jobs)),
            "workers starting",
        )

    def stop(self) -> None:
        """Tell every worker to leave; kill the ones that do not within a few seconds."""
        self.stopping = True
        if self.st.ctrl is not None:
            self.st.ctrl[S.C_STOP] = 1
        deadline = monotonic() + 5.0
        for _, _, p in self.procs:
            p.join(max(0.0, deadline - monotonic()))
        self.kill_all()

    def kill_all(self) -> None:
        self.stopping = True
        for _, _, p in self.procs:
            if p.is_alive():
                p.kill()
        for _, _, p in self.procs:
            p.join(2.0)

    # -- the watchdog --------------------------------------------------------------------------
    def poll(self) -> None:
        checkpoint()
        if self.stopping:
            return
        for _slot, name, p in self.procs:
            code = p.exitcode
            if code is not None:
                raise WorkerError(f"worker {name} (pid {p.pid}) {_describe_exit(code)}")
        now = monotonic()
        loops = self.st.hdr[:, S.H_LOOPS]
        changed = loops != self.beat
        self.beat[changed] = loops[changed]
        self.beat_t[changed] = now
        # a worker still starting (importing, numba loading its kernels) has no heartbeat
        # yet: the start-up deadline of start() covers it
        started = self.st.hdr[:, S.H_STATE] != S.S_STARTING
        stale = np.flatnonzero((now - self.beat_t > self.cfg.hang_timeout) & started)
        if len(stale) and self.beat_t.min() > 0:
            slot = int(stale[0])
            state = S.STATE_NAMES[min(int(self.st.hdr[slot, S.H_STATE]), 7)]
            raise WorkerError(
                f"worker {self.names[slot]} (pid "
                f"{int(self.st.hdr[slot, S.H_PID])}) hung: no heartbeat for "
                f"{self.cfg.hang_timeout:.0f} s (state {state})"
            )

    def cpu_seconds(self) -> np.ndarray:
        """CPU seconds (user + system) each worker process has used, read by the parent from
        /proc (the workers pay nothing for it); 0 for a process that is gone."""
        out = np.zeros(len(self.names))
        for slot, _name, p in self.procs:
            try:
                with open(f"/proc/{p.pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                out[slot] = (int(fields[11]) + int(fields[12])) / CLK_TCK
            except (OSError, IndexError, ValueError, TypeError):
                pass
        return out

    def wait_for(self, pred, timeout: float, what: str) -> None:
        deadline = monotonic() + timeout
        self.beat_t[:] = monotonic()
        while not pred():
            self.poll()
            if monotonic() > deadline:
                raise WorkerError(f"{what}: not done after {timeout:.0f} s; {self._laggards()}")
            time.sleep(self.POLL)

    def _laggards(self) -> str:
        states = self.st.hdr[:, S.H_STATE]
        parts = [f"{self.names[i]}={S.STATE_NAMES[min(int(s), 7)]}" for i, s in enumerate(states)][
            :8
        ]
        return "worker states: " + ", ".join(parts)

    # -- phases ------------------------------------------------------------------------------
    def _next(self) -> int:
        self.gen += 1
        return self.gen

    def _slots(self, kind: str) -> list:
        """Worker slots: senders, vcpus, chaos, and the groups the parent steers: `paused`
        (senders, K's sender and resetters) and `held` (dom0's vCPUs and K's)."""
        sh = self.cfg.shape
        k0 = sh.senders + sh.vcpus + sh.chaos
        k = list(range(k0, sh.workers))
        if kind == "senders":
            return list(range(0, sh.senders))
        if kind == "vcpus":
            return list(range(sh.senders, sh.senders + sh.vcpus))
        if kind == "chaos":
            return list(range(sh.senders + sh.vcpus, k0))
        if kind == "paused":
            return list(range(0, sh.senders)) + [i for i in k if i != k0 + 1]
        return list(range(sh.senders, sh.senders + sh.vcpus)) + k[1:2]  # held

    def run_for(self, seconds: float, until=None) -> None:
        end = monotonic() + seconds
        self.beat_t[:] = np.maximum(self.beat_t, monotonic() - 1.0)
        while True:
            self.poll()
            if self.progress:
                self.progress()
            if until is not None and until():
                return
            left = end - monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    def pause(self) -> None:
        g = self._next()
        self.st.ctrl[S.C_PAUSE] = g
        hdr = self.st.hdr
        senders, chaos = self._slots("paused"), self._slots("chaos")
        self.wait_for(
            lambda: (
                all(hdr[i, S.H_ACK] == g for i in senders)
                and all(hdr[i, S.H_ACK] == g or hdr[i, S.H_STATE] == S.S_FINISHED for i in chaos)
            ),
            self.cfg.hang_timeout,
            "pausing the senders",
        )

    def resume(self) -> None:
        self.st.ctrl[S.C_PAUSE] = 0

    def hold(self) -> None:
        g = self._next()
        self.st.ctrl[S.C_HOLD] = g
        hdr = self.st.hdr
        vc = self._slots("held")
        self.wait_for(
            lambda: all(hdr[i, S.H_ACK] == g for i in vc),
            self.cfg.hang_timeout,
            "holding the vCPUs",
        )

    def release(self) -> None:
        self.st.ctrl[S.C_HOLD] = 0

    def finish_chaos(self) -> None:
        g = self._next()
        self.st.ctrl[S.C_FINISH] = g
        hdr = self.st.hdr
        ch = self._slots("chaos")
        self.wait_for(
            lambda: all(hdr[i, S.H_ACK] == g for i in ch),
            self.cfg.hang_timeout,
            "undoing the chaos",
        )

    def duel(self, d: dict, seconds: float) -> dict:
        """Run one duel (stress.duels) between a sender, a vCPU worker and (some fifo duels)
        another vCPU's worker; every other worker is paused or held."""
        st = self.st
        block = st.duel
        block[:] = 0
        block[DU.D_KIND] = d["kind"]
        block[DU.D_A_SLOT] = st.sender_slot(d["sender"])
        block[DU.D_B_SLOT] = st.vcpu_slot(d["vcpu"])
        block[DU.D_VCPU] = d["vcpu"]
        block[DU.D_PORT_A], block[DU.D_PORT_B] = d["pa"], d["pb"]
        block[DU.D_LPORT_A], block[DU.D_LPORT_B] = d.get("la", 0), d.get("lb", 0)
        block[DU.D_PORT_C], block[DU.D_LPORT_C] = d.get("pc", 0), d.get("lc", 0)
        block[DU.D_JITTER] = 64
        block[DU.D_PARENT] = os.getpid()
        block[DU.D_MIN_ITERS] = int(2000 * seconds)
        saved = []
        if d["kind"] in DU.FIFO_KINDS:
            dom0 = self.env.dom0
            n = len(d["ports"])
            block[DU.D_PORTS : DU.D_PORTS + n] = d["ports"]
            block[DU.D_PORTS + 5 : DU.D_PORTS + 5 + n] = d["lports"]
            block[DU.D_LPORT_A] = self.env.sdoms[d["sender"]].domid
            for p, c, pr in zip(d["ports"], d["channels"], d["prios"]):
                saved.append((p, int(st.ch_prio[c])))
                dom0.set_priority(p, pr)
        parties = [int(block[DU.D_A_SLOT]), int(block[DU.D_B_SLOT])]
        if "c_vcpu" in d:
            block[DU.D_C_SLOT] = st.vcpu_slot(d["c_vcpu"])
            parties.append(int(block[DU.D_C_SLOT]))
        if d["kind"] == DU.DUEL_POLL_RELINK:
            block[DU.D_MIN_ITERS] = int(200 * seconds)  # an iteration sleeps in a poll
        block[DU.D_END_NS] = time.monotonic_ns() + int(seconds * 1e9)
        block[DU.D_HARD_END_NS] = time.monotonic_ns() + int(4 * seconds * 1e9)
        g = self._next()
        t0 = time.perf_counter()
        st.ctrl[S.C_DUEL] = g
        try:
            self.wait_for(
                lambda: all(st.hdr[i, S.H_DUEL_ACK] == g for i in parties),
                4 * seconds + self.cfg.hang_timeout,
                f"duel {DU.NAMES[d['kind']]}",
            )
        finally:
            st.ctrl[S.C_DUEL] = 0
            for p, pr in saved:
                self.env.dom0.set_priority(p, pr)
        self.env.extra_sent += int(block[DU.D_SENT])
        return {
            "duel": DU.NAMES[d["kind"]],
            "vcpu": d["vcpu"],
            "port": d["pb"] if d["kind"] == DU.DUEL_CONSUME_SEND else d["pa"],
            "iterations": int(block[DU.D_ITERS]),
            "aimed": int(block[DU.D_AIMED]),
            "seconds": round(time.perf_counter() - t0, 2),
            "violations": int(block[DU.D_HITS]),
            **(
                {"woken_by_event": int(block[DU.D_CHECKED])}
                if d["kind"] == DU.DUEL_POLL_RELINK
                else {}
            ),
        }

    def drain(self) -> None:
        """Release the vCPUs and wait until each ran a full loop and has no upcall pending
        and is outside its handler, twice in a row."""
        self.release()
        hdr = self.st.hdr
        vc = self._slots("held")
        dom0, kdom = self.env.dom0, self.env.kdom
        base = hdr[vc, S.H_LOOPS].copy()
        calm = [0]

        def drained():
            if not (hdr[vc, S.H_LOOPS] >= base + 2).all():
                return False
            quiet = (
                not any(dom0.upcall_pending(v) for v in range(self.cfg.vcpus))
                and not (kdom is not None and kdom.upcall_pending(0))
                and not (hdr[vc, S.H_SEQ] & 1).any()
            )
            calm[0] = calm[0] + 1 if quiet else 0
            return calm[0] >= 3

        self.wait_for(drained, self.cfg.hang_timeout, "draining the vCPUs")


@contextlib.contextmanager
def _sigint_blocked_for_children():
    """Start processes with SIGINT blocked: the forkserver (or a spawned worker) inherits the
    blocked mask across exec, so a Ctrl-C meant for the run cannot break its start-up with a
    traceback, and the workers it forks cannot see one before they ignore it. This process
    gets it (KeyboardInterrupt) when the block ends, after every started worker was recorded
    to be killed. multiprocessing's resource tracker unblocks SIGINT after starting itself, so
    it is started first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with code {code}" + (" (its traceback is above)" if code == 1 else "")


class InlineCrew:
    """Every actor in this process, one step each in turn (single-process backends)."""

    def __init__(self, cfg, su: Setup, progress=None):
        self.cfg, self.su, self.env = cfg, su, su.env
        self.progress = progress
        env = su.env
        _, snd_seeds, chaos_seeds = W.seeds_for(cfg.seed, cfg.senders, cfg.n_chaos)
        self.senders = [
            W.Sender(env, i, np.random.default_rng(snd_seeds[i])) for i in range(cfg.senders)
        ]
        for s in self.senders:
            s.pace = lambda s=s: (s.batch if s.workload != "storm" or s.storming else 64, 0.0)
        self.vcpus = [W.VCPU(env, v, inline=True) for v in range(cfg.vcpus)]
        self.chaos = W.make_chaos(env, chaos_seeds)
        # K's processes (stress.resetter): its vCPU runs with dom0's, the rest with the senders
        self.kpaused, self.kheld = [], []
        if cfg.kchans:
            k_seeds = RS.seeds(cfg.seed, cfg.shape.kworkers)
            self.kheld = [RS.KVCPU(env, 0, inline=True)]
            self.kpaused = [RS.KSender(env, 0, np.random.default_rng(k_seeds[0]))] + [
                RS.Resetter(env, i, np.random.default_rng(k_seeds[2 + i]))
                for i in range(cfg.resetters)
            ]
            for a in self.kpaused:
                a.inline = True
        self.paused = self.held = self.finished = False

    def _all(self) -> list:
        return self.senders + self.vcpus + self.chaos + self.kheld + self.kpaused

    def start(self) -> None:
        for a in self._all():
            a.hdr[S.H_STATE] = S.S_READY
            a.hdr[S.H_PID] = os.getpid()

    def stop(self) -> None:
        for v in self.vcpus:
            v.flush_latency()
        for a in self._all():
            a.hdr[S.H_STATE] = S.S_DONE

    kill_all = stop

    def poll(self) -> None:
        pass

    def cpu_seconds(self):
        return None  # one process: no per-role figure

    def _round(self) -> None:
        if not self.paused:
            for s in self.senders + self.kpaused:
                s.step()
            if not self.finished:
                for c in self.chaos:
                    for _ in range(4):
                        c.step()
        if not self.held:
            for v in self.vcpus + self.kheld:
                v.step()

    def run_for(self, seconds: float, until=None) -> None:
        end = monotonic() + seconds
        while monotonic() < end:
            checkpoint()
            self._round()
            if self.progress:
                self.progress()
            if until is not None and until():
                return

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False

    def finish_chaos(self) -> None:
        for c in self.chaos:
            c.finish()
        self.finished = True

    def drain(self) -> None:
        self.held = False
        for _ in range(100000):
            if not any([v.step() for v in self.vcpus + self.kheld]):
                return
        raise WorkerError("draining the vCPUs: upcalls still pending after 100000 rounds")


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    record: dict
    violations: C.Collector
    error: str | None = None
    interrupted: bool = False


def run(cfg, progress_factory=None) -> Result:
    """One ABI's run; never raises for worker trouble or an interrupt (the result says so)."""
    with signals_for_run():
        return _run(cfg, progress_factory)


def _run(cfg, progress_factory) -> Result:
    col = C.Collector()
    rec: dict = {
        "abi": cfg.abi,
        "ports": cfg.channels,
        "ports_requested": cfg.ports,
        "vcpus": cfg.vcpus,
        "senders": cfg.senders,
        "workload": cfg.workload,
        "chaos": dict(cfg.chaos),
        "backend": cfg.backend,
        "inject": cfg.inject,
        "seed": cfg.seed,
    }
    if cfg.cap_note:
        rec["note"] = cfg.cap_note
    host = su = crew = None
    error, interrupted = None, False
    t_wall = time.perf_counter()
    timing = {"race_s": 0.0, "race_delivered": 0, "epochs": 0}
    bar = None
    fast_lib = None
    try:
        fast_lib = _build_fast(cfg, rec)
        with interrupts_held():
            host = Host(cfg.backend, inject=cfg.inject)
        # numba: compile (or load) every kernel once here, so that the workers load them from
        # numba's cache instead of each compiling them at once (minutes on a loaded machine)
        host.warm_up()
        rec["host"] = host.name
        su = setup(cfg, host)
        rec["setup_s"] = round(su.seconds, 3)
        st = su.env.stats

        def delivered_now():
            return int(st.hdr[cfg.senders : cfg.senders + cfg.vcpus, S.H_DELIVERED].sum())

        if progress_factory is not None:
            bar = progress_factory(cfg, delivered_now)
        multiproc = getattr(host._k, "multiprocess", False)
        rec["mode"] = "processes" if multiproc else "single process (interleaved actors)"
        crew_cls = ProcessCrew if multiproc else InlineCrew
        crew = crew_cls(cfg, su, progress=bar.update if bar else None)
        t = time.perf_counter()
        st.ctrl[S.C_PHASE] = S.PH_START
        checkpoint()
        crew.start()
        rec["spawn_s"] = round(time.perf_counter() - t, 3)
        _race(cfg, su, crew, col, timing, delivered_now)
        _final(cfg, su, crew, col, timing)
    except WorkerError as exc:
        error = str(exc)
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
    finally:
        # The teardown runs whole: a second Ctrl-C here only makes the verdict "interrupted"
        # (stopped half-way, it would leave workers or segments behind).
        with interrupts_held(raise_after=False) as got:
            _teardown(cfg, su, crew, host, bar, rec, timing, col, error or interrupted, fast_lib)
        interrupted = interrupted or bool(got)
    rec["wall_s"] = round(time.perf_counter() - t_wall, 3)
    rec["epochs"] = timing["epochs"]
    rec["duels"] = timing.get("duels", [])
    rec["violations"] = [v.as_dict() for v in col.items]
    rec["violation_counts"] = dict(col.counts)
    if error:
        rec["verdict"] = "error"
        rec["error"] = error
    elif interrupted:
        rec["verdict"] = "interrupted"
    else:
        rec["verdict"] = "fail" if col.total else "pass"
    return Result(rec, col, error, interrupted)


def _teardown(cfg, su, crew, host, bar, rec, timing, col, abort: bool, fast_lib) -> None:
    """Stop the workers (kill them after an error or interrupt), take the figures (partial
    ones too), release the shared memory and the compiled accounting's library."""
    if su is not None and su.env.stats.ctrl is not None:
        su.env.stats.ctrl[S.C_PHASE] = S.PH_STOP
    if bar is not None:
        bar.close()
    try:
        if crew is not None:
            if abort:
                crew.kill_all()
            else:
                crew.stop()
    finally:
        try:
            if su is not None:
                _metrics(cfg, su, rec, timing, col)  # partial figures too
                su.env.stats.close()
        finally:
            try:
                if host is not None:
                    host.close()
            finally:
                F.remove(fast_lib)


def _build_fast(cfg, rec: dict):
    """The compiled accounting for this run's workers (stress/fast.py), or the numpy code
    when it is not wanted or there is no compiler (the record says which, and why)."""
    cfg.fast_lib = None
    rec["accounting"] = "numpy"
    if cfg.accounting != "compiled":
        return None
    try:
        lib = F.build()
    except F.FastUnavailable as exc:
        rec["accounting_note"] = f"compiled accounting unavailable, numpy used: {exc}"
        return None
    cfg.fast_lib = str(lib)
    rec["accounting"] = "compiled"
    return lib


def _race(cfg, su, crew, col, timing, delivered_now) -> None:
    duration = cfg.duration if cfg.duration is not None else (None if cfg.events else 10.0)
    target = cfg.events

    def reached():
        return target is not None and delivered_now() >= target

    while True:
        left = None if duration is None else duration - timing["race_s"]
        if left is not None and left <= 0:
            break
        if reached():
            break
        span = cfg.check_interval if left is None else min(cfg.check_interval, left)
        su.env.stats.ctrl[S.C_PHASE] = S.PH_RACE
        d0, t0, cpu0 = delivered_now(), time.perf_counter(), crew.cpu_seconds()
        w0 = wakeups_now(su)
        try:
            crew.run_for(span, until=reached if target else None)
        finally:  # partial figures survive a dead worker or Ctrl-C
            timing["race_s"] += time.perf_counter() - t0
            timing["race_delivered"] += delivered_now() - d0
            timing["race_wakeups"] = timing.get("race_wakeups", 0) + wakeups_now(su) - w0
            if cpu0 is not None:
                timing["race_cpu"] = timing.get("race_cpu", 0) + crew.cpu_seconds() - cpu0
        left = None if duration is None else duration - timing["race_s"]
        if (left is not None and left <= 0.05) or reached():
            break
        timing["epochs"] += 1
        _quiescent_check(
            cfg, su, crew, col, f"epoch {timing['epochs']} (t={timing['race_s']:.1f}s)", final=False
        )
        crew.resume()


def wakeups_now(su) -> int:
    sh = su.env.cfg.shape
    return int(su.env.stats.hdr[sh.senders : sh.senders + sh.vcpus, S.H_WAKEUPS].sum())


def _quiescent_check(cfg, su, crew, col, phase: str, final: bool) -> None:
    env = su.env
    env.stats.ctrl[S.C_PHASE] = S.PH_FINAL if final else S.PH_CHECK
    crew.hold()
    crew.run_for(0.02)  # senders keep linking onto held queues
    crew.pause()
    col.extend(C.held_checks(C.Snapshot(env.host, cfg.nports), f"held, {phase}"))
    if env.kdom is not None:
        col.extend(C.k_checks(env, f"held, {phase}", held=True))
    if final:
        crew.finish_chaos()
    crew.drain()
    _drained(cfg, su, col, f"drained, {phase}", final)


def _drained(cfg, su, col, phase: str, final: bool) -> None:
    env = su.env
    snap = C.Snapshot(env.host, cfg.nports)
    col.extend(C.drained_checks(snap, env.stats, phase, final, su.perma))
    if env.kdom is not None:
        col.extend(C.k_checks(env, phase, held=False))


def _final(cfg, su, crew, col, timing) -> None:
    env = su.env
    timing["epochs"] += 1
    _quiescent_check(cfg, su, crew, col, "final", final=True)
    crew.hold()
    env.stats.ctrl[S.C_PHASE] = S.PH_ORDERED
    rng = np.random.default_rng(cfg.seed + 1)
    with interrupts_held():  # it takes engine locks from Python (bind_vcpu)
        col.extend(C.ordered_phase(env, rng, su.plain))
    crew.drain()
    _drained(cfg, su, col, "drained, after the ordered phase", True)
    if cfg.duel_seconds > 0 and hasattr(crew, "duel"):
        plans = DU.plan(env, cfg.abi, su.plain)
        for d in plans:
            crew.hold()
            env.stats.ctrl[S.C_PHASE] = S.PH_DUEL
            res = crew.duel(d, cfg.duel_seconds)
            timing.setdefault("duels", []).append(res)
            if res["violations"] > DU.RECORDED:  # the first ones are listed one by one
                col.add(
                    C.Violation(
                        DU.KIND_OF[d["kind"]],
                        res["port"],
                        d["vcpu"],
                        f"{res['violations'] - DU.RECORDED} more of the "
                        f"{res['iterations']} iterations of duel {res['duel']} "
                        f"failed the same way",
                        "duel",
                    )
                )
        if plans:
            crew.drain()
            _drained(cfg, su, col, "drained, after the duels", True)
    col.extend(C.worker_violations(env.stats, su.names))


def _metrics(cfg, su, rec, timing, col) -> None:
    st = su.env.stats
    sh = cfg.shape
    hdr = st.hdr
    snd = slice(0, sh.senders)
    vc = slice(sh.senders, sh.senders + sh.vcpus)
    ch = slice(sh.senders + sh.vcpus, sh.workers)
    sent = int(hdr[snd, S.H_SENT].sum())
    edges = int(st.edges.sum(dtype=np.int64))
    delivered = int(st.delivered.sum(dtype=np.int64))
    sent_total = sent + su.env.extra_sent  # + the ordered phase's and the duels' own
    race_s = timing["race_s"]
    rec.update(
        {
            "sent": sent_total,
            "edges": edges,
            "delivered": delivered,
            "coalesced": sent_total - edges,
            "destroyed_by_close": int(st.destroyed.sum(dtype=np.int64)),
            "raised_by_unmask": int(st.extra.sum(dtype=np.int64)),
            "race_s": round(race_s, 3),
            "delivered_per_s": round(timing["race_delivered"] / race_s, 1) if race_s else 0.0,
            "sent_per_s": round(sent / race_s, 1) if race_s else 0.0,
            "chaos_ops": {
                "masks": int(hdr[ch, S.H_MASKS].sum()),
                "moves": int(hdr[ch, S.H_MOVES].sum()),
                "priority_changes": int(hdr[ch, S.H_PRIOS].sum()),
                "closes": int(hdr[snd, S.H_CLOSES].sum()),
            },
            "vcpu_wakeups": int(hdr[vc, S.H_WAKEUPS].sum()),
            "race_vcpu_wakeups": timing.get("race_wakeups", 0),
            "consume_calls": int(hdr[vc, S.H_BATCHES].sum()),
            "moved_port_overlaps": int(hdr[vc, S.H_OVERLAPS].sum()),
            "cpu_s": {
                "senders": round(float(hdr[snd, S.H_CPU_NS].sum()) / 1e9, 3),
                "vcpus": round(float(hdr[vc, S.H_CPU_NS].sum()) / 1e9, 3),
                "chaos": round(float(hdr[ch, S.H_CPU_NS].sum()) / 1e9, 3),
            },
        }
    )
    if race_s and timing.get("race_cpu") is not None:  # CPU-s per s of racing, per role
        cpu = timing["race_cpu"]
        rec["race_cpu_per_s"] = {
            role: round(float(cpu[sl].sum()) / race_s, 3)
            for role, sl in (("senders", snd), ("vcpus", vc), ("chaos", ch))
        }
    hist = st.hist.sum(axis=0)
    n = int(hist.sum())
    frac = int(st.ctrl[S.C_SAMPLE_MASK]) + 1
    which = "every port" if frac == 1 else f"1 port in {frac} (chosen at random)"
    lat = {
        "samples": n,
        "method": (
            f"every event of {which}: from the port's first send "
            f"after its previous handling to the start of the handler "
            f"that delivers it (log buckets, ~6% resolution; max "
            f"exact)"
        ),
    }
    if n:
        cum = np.cumsum(hist)
        vals = W.hist_value(np.arange(S.HIST_BUCKETS))
        lat["max"] = int(hdr[vc, S.H_LAT_MAX].max())
        for key, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999)):
            lat[key] = min(int(vals[int(np.searchsorted(cum, q * n))]), lat["max"])
    rec["latency_ns"] = lat
    cnt = st.lat_cnt.sum(axis=0, dtype=np.int64)
    ssum = st.lat_sum.sum(axis=0, dtype=np.float64)
    have = cnt > 0
    if have.any():
        mean = ssum[have] / cnt[have]
        rec["fairness_jain"] = round(float(mean.sum() ** 2 / (len(mean) * (mean**2).sum())), 4)
        rec["fairness_method"] = "Jain's index over the ports' mean latency"
        j = int(np.argmax(hdr[vc, S.H_LAT_MAX]))
        rec["worst_wait_ns"] = int(hdr[sh.senders + j, S.H_LAT_MAX])
        rec["worst_wait_port"] = int(hdr[sh.senders + j, S.H_LAT_MAX_PORT])
    else:
        rec["fairness_jain"] = None
        rec["worst_wait_ns"] = None
    if cfg.kchans:
        rec["resets"] = _reset_metrics(cfg, st)
    try:
        rec["mapped_pages"] = su.env.dom0.mapped_pages()
    except Exception:  # the host may be gone after an error
        rec["mapped_pages"] = None


def _reset_metrics(cfg, st) -> dict:
    """The resetting domain K's figures (stress.resetter)."""
    k = slice(st.k_slot(0), st.k_slot(0) + cfg.shape.kworkers)
    hdr = st.hdr[k]
    n = cfg.kchans
    return {
        "rate": cfg.resets,
        "resetters": cfg.resetters,
        "channels": n,
        "resets": int(hdr[2:, S.H_RESETS].sum()),
        "eagain": int(hdr[2:, S.H_EAGAIN].sum()),
        "ebusy": int(hdr[2:, S.H_EBUSY].sum()),
        "gave_up": int(hdr[2:, S.H_GAVE_UP].sum()),
        "rebinds": int(hdr[2:, S.H_BINDS].sum()),
        "rebinds_racing_a_reset": int(hdr[2:, S.H_RACED].sum()),
        "sent": int(hdr[0, S.H_SENT]),
        "edges": int(st.kedges[:n].sum()),
        "delivered": int(st.kdeliv[:n].sum()),
        "destroyed": int(st.kdestroyed[:n].sum()),
        "rule": (
            "per channel and binding: 1 bind event + send edges = delivered + destroyed "
            "by the reset's close (0 or 1 per ended binding; 0 for a live one, drained)"
        ),
    }


def versions() -> dict:
    import platform
    import sys

    out = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "evtchn": evtchn.__version__,
        "platform": platform.platform(),
    }
    try:
        import tqdm

        out["tqdm"] = tqdm.__version__
    except ImportError:
        pass
    try:
        import Cython

        out["cython"] = Cython.__version__
    except ImportError:
        pass
    return out


def machine() -> dict:
    import platform

    info = {"cpus": os.cpu_count(), "machine": platform.machine(), "node": platform.node()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_kib"] = int(f.readline().split()[1])
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info
