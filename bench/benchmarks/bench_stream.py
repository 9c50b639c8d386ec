"""Two and more processes racing (asv track_ benchmarks: the figures of `python -m bench`,
short runs). Each track_ value is one run; asv's repeat gives the spread."""

from . import _common  # noqa: F401  (sys.path)
from ._common import BACKEND

DURATION = 0.5  # s per run


def _pin():
    import os

    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


class Stream:
    """stream1x1: a sender process and a vCPU process, 1024 ports (bench/cases.py)."""

    params = ["fifo", "2l"]
    param_names = ["abi"]
    unit = "events/s"
    timeout = 120
    number = 1
    repeat = 3

    def setup(self, abi):
        from bench.cases import Stream, StreamConfig

        cfg = StreamConfig(duration=DURATION, pin=_pin())
        self.case = Stream(abi, BACKEND, cfg)
        self.case.warm_up()

    def teardown(self, abi):
        self.case.close()

    def track_stream1x1_events_per_s(self, abi):
        rec = self.case.run_evtchn()
        if not rec["ok"]:
            raise RuntimeError(f"events lost or left: {rec}")
        return rec["events_per_s"]


class Multi:
    """N senders + N vCPUs (bench/multi.py)."""

    params = (["fifo", "2l"], [2])
    param_names = ["abi", "pairs"]
    unit = "events/s"
    timeout = 180
    number = 1
    repeat = 3

    def setup(self, abi, pairs):
        from bench.multi import Multi

        self.case = Multi(abi, BACKEND, pairs)

    def teardown(self, abi, pairs):
        self.case.close()

    def track_multi_events_per_s(self, abi, pairs):
        rec = self.case.run(DURATION)
        if not rec["ok"]:
            raise RuntimeError(f"events lost or left: {rec}")
        return rec["events_per_s"]


class Latency:
    """Send -> handler latency, idle vCPU (blocked in wait()), median of 500 events."""

    params = ["fifo", "2l"]
    param_names = ["abi"]
    unit = "ns"
    timeout = 120
    number = 1
    repeat = 3

    def track_idle_latency_p50_ns(self, abi):
        from bench.latency import run_evtchn, summary

        return summary(run_evtchn(abi, BACKEND, "idle", 500, _pin()))["p50_ns"]


class MappedPages:
    """Domain.mapped_pages() after binding 32k ports (deterministic: a layout regression)."""

    params = ["fifo", "3l"]
    param_names = ["abi"]
    unit = "pages"

    def track_mapped_pages_32k(self, abi):
        from bench.memory import measure

        rows = measure((1 << 15,), BACKEND, out=lambda *a: None)
        return next(r["pages"] for r in rows if r["abi"] == abi)


class Headline:
    """The headline's shape, small (bench/headline.py QUICK: 4096 ports, 8 vCPUs, 2 senders):
    the real stress run's delivered/s while racing, and its C anchor's on a host bound the
    same way (stress/anchor.py)."""

    params = ["fifo", "2l"]
    param_names = ["abi"]
    unit = "events/s"
    timeout = 300
    number = 1
    repeat = 2

    def setup(self, abi):
        import tempfile

        from bench.headline import QUICK, configs
        from stress import anchor as A

        # 1 s of racing at least: the stress run's set-up and start dominate anyway, and a
        # loaded machine may deliver nothing in a shorter race
        self.cfg = configs([abi], QUICK, max(DURATION, 1.0), 1, BACKEND)[abi]
        self.tmp = tempfile.TemporaryDirectory(prefix="evtchn-asv-anchor-")
        self.exe = A.build(self.tmp.name)
        self.anchor = A.AnchorHost(self.cfg)

    def teardown(self, abi):
        self.anchor.close()
        self.tmp.cleanup()

    def track_headline_delivered_per_s(self, abi):
        from bench.headline import run_stress

        rec = run_stress(self.cfg, 0)
        if not rec["ok"]:
            raise RuntimeError(f"the stress run failed its checks: {rec}")
        return rec["delivered_per_s"]

    def track_headline_c_delivered_per_s(self, abi):
        rec = self.anchor.run(self.exe, self.cfg.duration)
        if not rec["ok"]:
            raise RuntimeError(f"the C anchor's accounting failed: {rec}")
        return rec["delivered_per_s"]
