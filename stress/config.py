"""The run configuration: what the command line chose, validated, plus what follows from it.

A Config is pickled to every worker process; it carries no handles, only numbers and names.
"""

from __future__ import annotations

import dataclasses
import os

from evtchn import layout as L

ABIS = ("fifo", "2l", "3l")
WORKLOADS = ("uniform", "hotspot", "bursts", "storm")

# Chaos presets: operations per second summed over the run's workers.
CHAOS_PRESETS = {
    "none": {"masks": 0.0, "moves": 0.0, "closes": 0.0},
    "low": {"masks": 500.0, "moves": 100.0, "closes": 20.0},
    "moderate": {"masks": 2000.0, "moves": 500.0, "closes": 100.0},
    "high": {"masks": 10000.0, "moves": 3000.0, "closes": 500.0},
}
CHAOS_KINDS = ("masks", "moves", "closes")

# Fractions of the channels in each chaos class (classes are disjoint). PERMA ports stay masked
# from setup to the end, also with --chaos none: "never delivered" is checked on them.
FRACTION_PERMA = 1 / 256
FRACTION_MASK = 1 / 16
FRACTION_MOVE = 1 / 16
FRACTION_CLOSE = 1 / 32

# With closers on, every SPARE_EVERY-th dom0 port is left free: evtchn allocates the first free
# port at or above a hint by a linear scan, and a closed port may stay LINKED (not allocatable,
# R12) for a while, so free ports spread over the range keep every allocation's scan short.
SPARE_EVERY = 256


# The resetting domain K (stress.resetter): its channels to dom0, and the default rate of
# EVTCHNOP_reset on it (resets per second over the whole run; --resets).
RESET_CHANNELS = 32
DEFAULT_RESETS = 5.0


def spare_ports(limit: int) -> int:
    return limit // SPARE_EVERY


# Which ABI each historical bug lives in; --inject picks that ABI when --abi is not given.
INJECT_ABI = {name: ("2l" if name.startswith("2l-") else "fifo") for name in L.INJECTIONS}


def abi_limit(abi: str, word_bits: int = 64, link_bits: int = L.FIFO_LINK_BITS) -> int:
    """Ports the ABI addresses (evtchn's defaults: 64-bit words, 17 LINK bits)."""
    return L.abi_max_ports(L.ABI_NAMES[abi], word_bits, link_bits)


def default_senders() -> int:
    """One sender per core, at least 2 so that sends race each other, at most 8."""
    return max(2, min(8, os.cpu_count() or 2))


class ConfigError(ValueError):
    """A bad argument: reported as one line, exit 2."""


@dataclasses.dataclass
class Config:
    abi: str = "fifo"
    ports: int = 8192  # channels requested (capped at the ABI's limit - 1)
    vcpus: int = 64
    senders: int = dataclasses.field(default_factory=default_senders)
    workload: str = "uniform"
    chaos: dict = dataclasses.field(default_factory=lambda: dict(CHAOS_PRESETS["moderate"]))
    chaos_text: str = "moderate"
    duration: float | None = None  # seconds of racing; default 10 when --events is absent
    events: int | None = None  # stop once this many events were delivered
    seed: int = 0
    word_bits: int = 64  # xen_ulong_t of dom0 and the senders (2l, 3l): 64, or 32 (x86-32)
    link_bits: int = L.FIFO_LINK_BITS  # FIFO LINK width of dom0 and the senders (17 .. 28)
    backend: str = "cython"
    inject: str | None = None
    batch: int = 2048  # ports per send_many
    consume_batch: int = 4096  # ports per consume call
    check_interval: float = 2.0  # seconds between quiescent checks during the race
    nap: float = 0.008  # a vCPU that drained lets events gather this long
    duel_seconds: float = 1.0  # each duel of stress.duels runs this long
    start_method: str = "forkserver"
    hang_timeout: float = 30.0  # a worker whose heartbeat stalls this long has hung
    resets: float = DEFAULT_RESETS  # EVTCHNOP_reset calls per second on K (0: no K)
    resetters: int = 1  # resetter processes of K (2: resets race each other and re-binds)
    accounting: str = "compiled"  # the workers' per-batch accounting: compiled or numpy
    fast_lib: str | None = None  # the compiled accounting's library (set by the run)
    progress: bool = True
    json_path: str | None = None
    argv_replay: str = ""  # the command line that replays this run
    # filled in by the setup
    channels: int = 0  # channels actually bound
    nports: int = 0  # dom0's port space (per-port arrays)
    cap_note: str = ""
    shape: object = None  # stress.shm.Shape of the stats segment

    @property
    def masks(self) -> float:
        return self.chaos["masks"]

    @property
    def moves(self) -> float:
        return self.chaos["moves"]

    @property
    def closes(self) -> float:
        return self.chaos["closes"]

    @property
    def kchans(self) -> int:
        """Channels of the resetting domain K (stress.resetter), 0 when resets are off."""
        return RESET_CHANNELS if self.resets > 0 else 0

    @property
    def n_chaos(self) -> int:
        """Chaos worker processes: a masker and a mover when their rates are on (closers are
        part of the senders, which own their channels)."""
        return int(self.masks > 0) + int(self.moves > 0)

    def for_abi(self, abi: str) -> Config:
        """This configuration for one ABI, ports capped at its limit (and a note saying so).
        With closers on, one port in SPARE_EVERY stays free (see spare_ports)."""
        cfg = dataclasses.replace(self, abi=abi, chaos=dict(self.chaos))
        limit = abi_limit(abi, self.word_bits, self.link_bits)
        spare = spare_ports(limit) if self.closes > 0 else 0
        cfg.nports = limit
        # port 0 is reserved; K's channels take dom0 ports too
        cfg.channels = min(self.ports, limit - 1 - spare - self.kchans)
        if cfg.channels < self.ports:
            why = "port 0 is reserved"
            if spare:
                why += f", {spare} ports stay free for the closers' rebinds"
            if self.kchans:
                why += f", {self.kchans} are the resetting domain's channels"
            cfg.cap_note = (
                f"{abi}: {self.ports} ports requested, {cfg.channels} bound (the "
                f"ABI addresses {limit} ports; {why})"
            )
        else:
            cfg.cap_note = ""
        return cfg


def parse_chaos(text: str) -> dict:
    """'moderate', 'none', '3000' (every kind at that rate) or 'masks=2000,moves=0,closes=50'
    (unnamed kinds keep the moderate rate)."""
    t = text.strip().lower()
    if t in CHAOS_PRESETS:
        return dict(CHAOS_PRESETS[t])
    try:
        rate = float(t)
    except ValueError:
        pass
    else:
        if rate < 0 or rate != rate or rate == float("inf"):
            raise ConfigError(f"--chaos rate must be a finite number >= 0, not {text!r}")
        return {k: rate for k in CHAOS_KINDS}
    out = dict(CHAOS_PRESETS["moderate"])
    for part in t.split(","):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in CHAOS_KINDS:
            raise ConfigError(
                f"--chaos takes none, low, moderate, high, a rate, or "
                f"masks=N,moves=N,closes=N; not {text!r}"
            )
        try:
            rate = float(val)
        except ValueError:
            raise ConfigError(f"--chaos {key}= needs a number, not {val.strip()!r}") from None
        if rate < 0 or rate != rate or rate == float("inf"):
            raise ConfigError(f"--chaos {key}= must be a finite number >= 0, not {val!r}")
        out[key] = rate
    return out
