"""Mapped pages and bytes per ABI after binding 1k, 4k, 32k, 128k and 2^20 ports.

Measured: one domain per ABI (1 vCPU; fifo with link_bits=20 so that 2^20 ports fit) on one
host; alloc_unbound in a loop until the domain uses port numbers 0 .. n-1 (port 0 is reserved,
so that is n-1 calls), then Domain.mapped_pages() (the pages Xen would map for the domain's
event state) and, beside it, the bytes /dev/shm actually holds for the whole domain segment
(st_blocks: the port table and bookkeeping too, only the pages touched). Beyond an ABI's port
limit (2l: 64^2 = 4096, 3l: 64^3 = 262144) the row says n/a.

Design: Xen's figures computed from the formulas (not measured), for the same n and 1 vCPU:
    2l    1 page (shared_info holds the 2-level bitmaps)
    3l    1 + 16 + L2 pages: shared_info, the 64^3-bit pending and mask bitmaps (8 pages each),
          the per-vCPU 64^2-bit L2 selectors (512 B each, ceil(vcpus * 512 / 4096) pages)
    fifo  ceil(n / 1024) event-array pages (4-byte event words) + 1 control-block page per vCPU
"""

from __future__ import annotations

import os
import time

from evtchn import Host
from evtchn import layout as L

SIZES = (1 << 10, 1 << 12, 1 << 15, 1 << 17, 1 << 20)
QUICK_SIZES = (1 << 10, 1 << 12)
ABIS = ("2l", "3l", "fifo")
FIFO_LINK_BITS = 20
VCPUS = 1
PAGE = L.PAGE_SIZE


def limit(abi: str) -> int:
    code = {"2l": L.ABI_2L, "3l": L.ABI_3L, "fifo": L.ABI_FIFO}[abi]
    return L.abi_max_ports(code, 64, FIFO_LINK_BITS)


def design_pages(abi: str, n: int, vcpus: int = VCPUS) -> int | None:
    """Xen's design figure from the formula; None beyond the ABI's limit."""
    if n > limit(abi):
        return None
    if abi == "2l":
        return 1
    if abi == "3l":
        return 1 + 16 + -(-vcpus * 64 * 64 // 8 // PAGE)
    return -(-n // 1024) + vcpus


def measure(sizes=SIZES, backend: str = "cython", out=print) -> list[dict]:
    """One row per (abi, n): measured pages and bytes, design pages, seconds spent binding."""
    rows = []
    host = Host(backend)
    try:
        for abi in ABIS:
            kw = {"link_bits": FIFO_LINK_BITS} if abi == "fifo" else {}
            dom = host.create_domain(abi=abi, vcpus=VCPUS, **kw)
            seg = os.path.join("/dev/shm", L.domain_segment_name(host.name, dom.domid))
            used, spent = 1, 0.0  # port 0 is reserved
            for n in sorted(sizes):
                row = {"abi": abi, "ports": n, "design_pages": design_pages(abi, n)}
                if n > limit(abi):
                    row.update(pages=None, bytes=None, shm_bytes=None, bind_s=None)
                    rows.append(row)
                    continue
                t0 = time.perf_counter()
                alloc = dom.alloc_unbound
                for _ in range(n - used):
                    alloc(0)
                spent += time.perf_counter() - t0
                used = n
                pages = dom.mapped_pages()
                row.update(
                    pages=pages,
                    bytes=pages * PAGE,
                    shm_bytes=os.stat(seg).st_blocks * 512,
                    bind_s=spent,
                )
                rows.append(row)
    finally:
        host.close()
    _print(rows, sizes, backend, out)
    return rows


def _size(n) -> str:
    if n is None:
        return "n/a"
    for unit, div in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.0f} {unit}" if n % div == 0 else f"{n / div:.1f} {unit}"
    return f"{n} B"


def _ports(n) -> str:
    return f"2^{n.bit_length() - 1}" if n >= 1 << 20 else f"{n >> 10}k"


def _print(rows, sizes, backend, out) -> None:
    out("")
    out(
        f"mapped event-state pages per ABI ({backend} backend, {VCPUS} vCPU, fifo link_bits="
        f"{FIFO_LINK_BITS}); measured = Domain.mapped_pages() after binding ports 1..n-1;"
    )
    out(
        "design = Xen's formula (computed, not measured): 2l 1; 3l 1 + 16 + L2; "
        "fifo ceil(n/1024) + 1 per vCPU"
    )
    out(
        f"{'ABI':<5} {'ports':>6} {'pages':>6} {'bytes':>9} {'design':>7} {'design B':>9} "
        f"{'/dev/shm':>10} {'bind s, cumul.':>14}"
    )
    for r in rows:
        d = r["design_pages"]
        out(
            f"{r['abi']:<5} {_ports(r['ports']):>6} "
            f"{'n/a' if r['pages'] is None else r['pages']:>6} {_size(r['bytes']):>9} "
            f"{'n/a' if d is None else d:>7} {_size(None if d is None else d * PAGE):>9} "
            f"{_size(r['shm_bytes']):>10} "
            f"{'-' if r['bind_s'] is None else format(r['bind_s'], '.1f'):>14}"
        )
    if tuple(sorted(sizes)) != SIZES:
        out(f"(only {', '.join(_ports(n) for n in sorted(sizes))} ports in this run)")
    bad = [r for r in rows if r["pages"] is not None and r["pages"] != r["design_pages"]]
    for r in bad:
        out(
            f"note: {r['abi']} at {_ports(r['ports'])} maps {r['pages']} pages, the design "
            f"formula gives {r['design_pages']}"
        )


def figures(rows) -> dict:
    """JSON figures (not gated by --compare: neither a rate nor a time)."""
    out = {}
    for r in rows:
        key = f"mapped_{r['abi']}_{r['ports']}"
        out[key + "_pages"] = r["pages"]
        out[key + "_design_pages"] = r["design_pages"]
        out[key + "_shm_bytes"] = r["shm_bytes"]
    return out
