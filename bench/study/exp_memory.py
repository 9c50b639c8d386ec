"""Experiment 3, memory: pages Xen maps per domain against the ports it has bound.

One domain per variant (fifo with link_bits = 20, so that 2^20 ports fit), ports allocated
one by one (EVTCHNOP_alloc_unbound) until ports 1..n are in use, n growing through the sizes;
at each size three figures: the pages the domain has registered with Xen (Domain.mapped_pages:
shared_info, plus fifo's event-array pages actually added by expand_array and one
control-block page per vCPU, or 3l's bitmap and L2-selector pages), the pages of those
guest-visible regions that are resident (mincore: touched at least once), and the bytes
/dev/shm holds for the whole domain (Xen's private port table included). A "typical domU"
configuration does the same for a 2-vCPU domain with 24 ports.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from evtchn import Host
from evtchn import layout as L

from . import variants as V
from .experiments import Config, Summary, by_config, config_state
from .stats import estimate, fmt

NAME = "memory"
TITLE = "3. Memory mapped into the hypervisor"
DETERMINISTIC = True
SIZES = (1, 32, 1023, 4095, 32767, 131071, 1048575)
QUICK_SIZES = (1, 32, 1023, 4095)
FIFO_LINK_BITS = 20
TYPICAL = {"vcpus": 2, "ports": 24}  # a Linux PV domU: per-vCPU VIRQs and IPIs + 4 devices


def stated(variant: str, n: int, vcpus: int) -> str:
    """What the thread (spec section 6) says the ABI maps, at n ports and `vcpus` vCPUs."""
    if variant.startswith("2l"):
        return "1 (shared_info)"
    if variant == "3l-64":
        return "16 bitmap pages (+ shared_info, L2 selectors)"
    if variant == "3l-32":
        return "2 bitmap pages (+ shared_info, L2 selectors)"
    return f"{-(-n // 1024)} array page(s), one per 1024 ports (+ control blocks)"


def configs(opts) -> list[Config]:
    sizes = QUICK_SIZES if opts.quick else SIZES
    return [Config(v, {"variant": v, "sizes": list(sizes)}, timeout=900) for v in V.ALL]


def run(params: dict, seed: int) -> dict:
    variant = params["variant"]
    with Host() as host:
        rows = _sweep(host, variant, 1, params["sizes"])
        typical = _sweep(host, variant, TYPICAL["vcpus"], [TYPICAL["ports"]])[0]
    return {"variant": variant, "rows": rows, "typical": typical}


def _sweep(host, variant: str, vcpus: int, sizes) -> list[dict]:
    """A fresh domain; ports allocated until each size is in use; its figures at each."""
    rows = []
    kw = {"link_bits": FIFO_LINK_BITS} if variant == "fifo" else {}
    dom = V.create(host, variant, vcpus=vcpus, **kw)
    seg = os.path.join("/dev/shm", L.domain_segment_name(host.name, dom.domid))
    used = 1  # port 0 is reserved
    for n in sizes:
        if n >= dom.max_ports:
            rows.append({"ports": n, "pages": None})
            continue
        for _ in range(n + 1 - used):
            dom.alloc_unbound(L.DOMID_SELF)
        used = n + 1
        rows.append(
            {
                "ports": n,
                "vcpus": vcpus,
                "pages": dom.mapped_pages(),
                "resident_pages": _resident(dom),
                "shm_bytes": os.stat(seg).st_blocks * 512,
            }
        )
    return rows


_libc = ctypes.CDLL(None, use_errno=True)


def _resident(dom) -> int:
    """Pages of the guest-visible regions that are resident (mincore on this mapping)."""
    base = dom._dm.seg.address
    total = 0
    for _seg, off, size in dom.layout().values():
        start = (base + off) // mmap.PAGESIZE * mmap.PAGESIZE
        end = base + off + size
        npages = -(-(end - start) // mmap.PAGESIZE)
        vec = np.zeros(npages, np.uint8)
        r = _libc.mincore(
            ctypes.c_void_p(start),
            ctypes.c_size_t(end - start),
            vec.ctypes.data_as(ctypes.c_void_p),
        )
        if r != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        total += int(np.count_nonzero(vec & 1))
    return total


def summarize(entries, opts) -> Summary:
    res = by_config(entries)
    s = Summary()
    rows, curve = [], {}
    for v in V.ALL:
        rs = res.get(v)
        if not rs:
            rows.append([v, "-", config_state(entries, v), "", "", "", ""])
            continue
        for i, r in enumerate(rs[0]["rows"]):
            n = r["ports"]
            if r["pages"] is None:
                rows.append([v, str(n), "n/a (beyond the ABI's limit)", "", "", "", ""])
                continue
            pages = [x["rows"][i]["pages"] for x in rs]
            curve.setdefault(v, {})[n] = pages
            rows.append(
                [
                    v,
                    str(n),
                    fmt(estimate(pages)),
                    fmt(estimate([x["rows"][i]["resident_pages"] for x in rs])),
                    _kib(r["shm_bytes"]),
                    stated(v, n, 1),
                    "",
                ]
            )
    s.tables.append(
        (
            "Pages per domain against ports bound (1 vCPU; fifo with link_bits = 20)",
            [
                "variant",
                "ports",
                "pages mapped (measured)",
                "of them resident",
                "/dev/shm (whole domain)",
                "thread / Xen says",
                "",
            ],
            rows,
            "pages mapped = what the domain registered with Xen at that point (fifo: event-array "
            "pages actually added on demand + 1 control-block page per vCPU); resident = pages of "
            "those regions touched at least once (mincore).",
        )
    )
    typ, trows = {}, []
    for v in V.ALL:
        rs = res.get(v)
        if not rs:
            trows.append([v, config_state(entries, v), "", ""])
            continue
        pages = [r["typical"]["pages"] for r in rs]
        typ[v] = pages
        trows.append(
            [
                v,
                fmt(estimate(pages)),
                fmt(estimate([r["typical"]["resident_pages"] for r in rs])),
                stated(v, TYPICAL["ports"], TYPICAL["vcpus"]),
            ]
        )
    s.tables.append(
        (
            f"A typical domU ({TYPICAL['vcpus']} vCPUs, {TYPICAL['ports']} ports)",
            ["variant", "pages mapped", "resident", "thread says"],
            trows,
            "The thread: 'a typical domU' needs one FIFO array page (plus its control blocks).",
        )
    )
    s.metrics["pages_typical_domu"] = typ
    s.metrics["pages_4k_ports"] = {v: pts[4095] for v, pts in curve.items() if 4095 in pts}
    s.curves.append(
        {
            "name": "memory_pages",
            "title": "Pages mapped per domain against ports bound",
            "xlabel": "ports bound",
            "ylabel": "pages",
            "logx": True,
            "logy": True,
            "series": curve,
        }
    )
    s.notes.append(
        "Stated (spec section 6): 3-level: 2 bitmap pages (32-bit) / 16 (64-bit) plus a "
        "per-vCPU L2 selector of 128 B / 512 B; FIFO: 4 bytes per port, one array page per "
        "1024 ports added on demand, up to 128 pages for 2^17, and a 72-byte control block per "
        "vCPU (a page per vCPU in Linux)."
    )
    return s


def _kib(b) -> str:
    return f"{b / 1024:.0f} KiB" if b is not None else "-"


def describe(opts) -> str:
    sizes = QUICK_SIZES if opts.quick else SIZES
    return (
        f"One domain per variant; ports allocated one by one until {', '.join(map(str, sizes))} "
        f"ports are in use (beyond a variant's limit: n/a). Mapped pages are counted from what "
        f"the domain registered, not computed from the ABI's formula; resident pages are read "
        f"with mincore(2)."
    )
