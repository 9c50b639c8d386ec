"""Experiment 2, density: the unikernel case of the 2013 thread, and FIFO beyond 2^17.

Per variant: one host, dom0 (4 vCPUs) and GUESTS single-vCPU guest domains (xl's default
max_event_channels = 1023), each binding 2 channels to dom0 (xenstore, console) and one to a
peer guest (vchan: guests 2j and 2j+1), created and bound one guest at a time until all are up
or dom0's alloc_unbound fails with ENOSPC (that variant does not hold the host: the table says
how many guests it reached). Then events flow on every channel that was bound: 2 sender
processes raise every guest end in turn, consumer processes run dom0's 4 vCPUs' handlers and
every guest's (dense.py), for `duration` seconds; then the senders stop, the consumers
drain, and for every channel deliveries == new edges, with nothing left pending.
Measured beside: setup time per step, /dev/shm bytes and Xen-mapped pages, the mappings and
file descriptors one racing process holds, and events/s.

Limits met and how the experiment stays within them: every mapped evtchn segment holds a file
descriptor (CPython's mmap keeps a dup of it before Python 3.13) and a mapping, so one process
can map at most RLIMIT_NOFILE (20,000 here, a hard limit this container cannot raise) and
vm.max_map_count (65,530) domains; evtchn.numba.views() and Host.create_domain() keep every
domain they touch mapped. So no process maps more than SLICE (12,500) guests plus dom0: guests
are created and bound by builder processes (one per slice, in turn), and the racing processes
are one sender and one guest consumer per slice plus one consumer for dom0; a slice's vchan
peers are in the slice.

"fifo-2^20": the stress harness with --link-bits 21 and 2^20 channels (every check on): 2^20
bound ports need a port space above 2^20, port 0 being reserved.
"""

from __future__ import annotations

from . import densehost as DH
from . import stressrun as SRN
from . import variants as V
from .experiments import Config, Summary, by_config, config_state
from .stats import estimate, fmt

NAME = "density"
TITLE = "2. Density at scale"
DETERMINISTIC = False
GUESTS, QUICK_GUESTS = 25_000, 300
DOM0_VCPUS, SLICE = DH.DOM0_VCPUS, DH.SLICE
BIG_PORTS, BIG_LINK_BITS = 1 << 20, 21  # 2^20 channels need a port space above 2^20
QUICK_BIG_PORTS = 8192


def configs(opts) -> list[Config]:
    g = QUICK_GUESTS if opts.quick else GUESTS
    dur = 0.5 if opts.quick else 2.0
    out = [
        Config(
            v,
            {"variant": v, "guests": g, "duration": dur, **_guests_of(v)},
            timeout=300 if opts.quick else 1200,
        )
        for v in V.ALL
    ]
    ports = QUICK_BIG_PORTS if opts.quick else BIG_PORTS
    out.append(
        Config(
            "fifo-2^20",
            {
                "variant": "fifo",
                "big": True,
                "ports": ports,
                "link_bits": BIG_LINK_BITS,
                "duration": dur,
            },
            timeout=300 if opts.quick else 1800,
            reps=1,
        )
    )
    out.append(
        Config(
            "one-process",
            {"one_process": True, "domains": g + 1},
            timeout=300 if opts.quick else 900,
            reps=1,
        )
    )
    return out


def _guests_of(v: str) -> dict:
    """3l guests are 2l guests (V.GUEST_OF); said in the params only where it differs."""
    gv = V.guest_variant(v)
    return {"guest_variant": gv} if gv != v else {}


def run(params: dict, seed: int) -> dict:
    if params.get("big"):
        return _run_big(params, seed)
    if params.get("one_process"):
        return DH.one_process(params["domains"])
    return DH.run_dense(params)


def _run_big(params: dict, seed: int) -> dict:
    ports = SRN.capped_ports("fifo", params["ports"], params["link_bits"])
    rec = SRN.run(
        SRN.argv(
            "fifo",
            seed,
            ports=ports,
            link_bits=params["link_bits"],
            vcpus=4,
            senders=2,
            duration=params["duration"],
            duel=0.2,
            nap=0,
        )
    )
    return {
        "big": True,
        "channels": rec["ports"],
        "link_bits": params["link_bits"],
        "events_per_s": rec["delivered_per_s"],
        "delivered": rec["delivered"],
        "setup_s": rec.get("setup_s"),
        "mapped_pages": rec.get("mapped_pages"),
        "verdict": rec["verdict"],
        "replay": rec["replay"],
        "latency_p50_ns": rec.get("latency_ns", {}).get("p50"),
    }


def summarize(entries, opts) -> Summary:
    res = by_config(entries)
    s = Summary()
    rows, held, rate = [], {}, {}
    target = QUICK_GUESTS if opts.quick else GUESTS
    for v in V.ALL:
        rs = res.get(v)
        if not rs:
            rows.append([v, config_state(entries, v)] + [""] * 8)
            continue
        r0 = rs[0]
        setup = estimate([_setup(r) for r in rs])
        rows.append(
            [
                v,
                "yes" if all(r["held"] for r in rs) else f"no: {r0['guests']} guests, then ENOSPC",
                str(r0["channels"]),
                fmt(setup, " s"),
                f"{r0['shm_bytes'] / 2**20:.0f} MiB",
                _per_domain(r0),
                f"{r0['mappings_per_process']} / {r0['fds_per_process']}",
                fmt(estimate([r["events_per_s"] for r in rs]), " ev/s"),
                f"{sum(r['delivered'] for r in rs)} = edges",
            ]
        )
        held[v] = [1.0 if r["held"] else r["guests"] / target for r in rs]
        if all(r["held"] for r in rs):
            rate[v] = [r["events_per_s"] for r in rs]
    s.tables.append(
        (
            f"{target} single-vCPU guests, each 2 channels to dom0 and 1 vchan to a peer",
            [
                "variant",
                "holds it",
                "channels bound",
                "setup",
                "/dev/shm",
                "Xen-mapped pages",
                "mappings / fds per racing process",
                "delivered/s",
                "deliveries (all seeds)",
            ],
            rows,
            "3l rows: dom0 uses the 3-level ABI, the guests the 2-level one (the 3-level series "
            "enabled it for dom0 and driver domains only). "
            "setup = creating the domains and binding their channels one by one (about 30-50 us "
            "per alloc_unbound + bind_interdomain pair from Python), draining the bind edges, and "
            "starting the racing processes. No process maps more than 12,500 guests: one process "
            "cannot map 25,000 domains here (RLIMIT_NOFILE 20,000: each mapped segment holds a "
            "file descriptor); see the limits below.",
        )
    )
    steps = {}
    for v in V.ALL:
        for r in res.get(v, []):
            items = list(r["setup_s"].items())
            items += [
                (f"of which, summed over builders: {k}", x)
                for k, x in r.get("builder_steps_s", {}).items()
            ]
            for k, x in items:
                steps.setdefault(k, {}).setdefault(v, []).append(x)
    if steps:
        s.tables.append(
            (
                "Setup time per step (s)",
                ["step"] + list(V.ALL),
                [[k] + [fmt(estimate(d.get(v, []))) for v in V.ALL] for k, d in steps.items()],
                "",
            )
        )
    one = res.get("one-process")
    if one:
        o = one[0]
        lim = o["fd_limit"]
        s.notes.append(
            f"One process creating and mapping {o['domains_wanted']} domains: "
            + (f"made {o['domains_made']}, then {o['error']}" if o["error"] else "held")
            + f" (RLIMIT_NOFILE (soft, hard) {lim['before']}"
            + (
                f", raising it failed: {lim['error']}"
                if lim.get("error")
                else f", raised to {lim['after']}"
            )
            + f"; vm.max_map_count {o['max_map_count']}). Hence the slices of at most {SLICE} "
            f"guests per process."
        )
    big = res.get("fifo-2^20")
    if big:
        b = big[0]
        s.tables.append(
            (
                f"FIFO beyond Xen's 2^17: link_bits = {b['link_bits']} (stress, every check)",
                ["channels", "link_bits", "verdict", "delivered/s", "setup", "mapped pages"],
                [
                    [
                        str(b["channels"]),
                        str(b["link_bits"]),
                        b["verdict"],
                        fmt(estimate([r["events_per_s"] for r in big]), " ev/s"),
                        fmt(estimate([r["setup_s"] for r in big]), " s"),
                        str(b["mapped_pages"]),
                    ]
                ],
                f"Reproduce: `{b['replay']}`",
            )
        )
    else:
        s.notes.append(f"fifo-2^20: {config_state(entries, 'fifo-2^20')}")
    s.metrics["density_held"] = held
    s.metrics["density_pages_per_guest"] = {
        v: [round(r["mapped_pages_total"] / max(1, r["segments"] - 1), 3) for r in res[v]]
        for v in V.ALL
        if res.get(v) and all(r["held"] for r in res[v])
    }
    s.metrics["density_events_per_s"] = rate
    s.curves.append(
        {
            "name": "density_rate",
            "title": f"Delivered events/s with {target} guests",
            "kind": "bar",
            "xlabel": "variant",
            "ylabel": "events/s",
            "series": {
                "delivered/s": {v: [r["events_per_s"] for r in res.get(v, [])] for v in V.ALL}
            },
        }
    )
    s.notes.append(
        "Stated: 'over 100,000 events (2^17)' for FIFO (Xen d2d50c2f30, Linux bf2bbe07f138); "
        "Xen's EVTCHN_FIFO_NR_CHANNELS is 2^17 = 131072 and its LINK field 17 bits; with 4 flag "
        "bits a 32-bit event word leaves 28, i.e. 2^28 ports by design (spec 4.1, derived)."
    )
    return s


def _setup(r) -> float:
    """Setup seconds: every top-level step but numba's one-time compile or cache load."""
    return sum(x for k, x in r["setup_s"].items() if not k.startswith("compile"))


def _per_domain(r) -> str:
    n = r["mapped_pages_total"]
    return f"{n} ({n / max(1, r['segments'] - 1):.2f} per domain)"


def describe(opts) -> str:
    g = QUICK_GUESTS if opts.quick else GUESTS
    big = QUICK_BIG_PORTS if opts.quick else BIG_PORTS
    return (
        f"{g} guests per variant (dom0 with {DOM0_VCPUS} vCPUs), each bound one at a time; "
        f"events then flow on every bound channel (per slice of at most {SLICE} guests a "
        f"sender and a guest-consumer process, plus one consumer for dom0's vCPUs; @njit "
        f"loops over evtchn.numba); exact accounting per channel. Plus fifo with link_bits = "
        f"{BIG_LINK_BITS} and {big} channels through `python -m stress`."
        + (" --quick: 300 guests, not 25,000." if opts.quick else "")
    )
