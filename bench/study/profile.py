"""A stated, configurable Linux dom0: the channels it binds before any guest (experiment 1).

Each entry says where its count comes from (Linux and Xen sources, read for this study). The
physical-IRQ count depends on the machine; it is a parameter (``--profile dom0_pirqs=N``).
evtchn has no EVTCHNOP_bind_pirq, so a PIRQ's port is taken with alloc_unbound(DOMID_SELF):
it occupies one port of dom0's space exactly as a bound PIRQ does.
"""

from __future__ import annotations

import dataclasses

from evtchn import layout as L

VIRQ_MCA = 16  # VIRQ_ARCH_0 on x86 (xen/include/public/arch-x86/xen.h)

# (what, kind, source) bound once per dom0 vCPU; kind "virq:N" or "ipi".
PER_VCPU = (
    ("VIRQ_TIMER", f"virq:{L.VIRQ_TIMER}", "arch/x86/xen/time.c xen_setup_timer()"),
    (
        "VIRQ_DEBUG",
        f"virq:{L.VIRQ_DEBUG}",
        "arch/x86/xen/smp.c xen_smp_intr_init(); current Linux binds it only when the "
        "FIFO ABI is not in use (if (!xen_fifo_events))",
    ),
    ("IPI reschedule", "ipi", "arch/x86/xen/smp.c xen_smp_intr_init(), XEN_RESCHEDULE_VECTOR"),
    (
        "IPI call-function",
        "ipi",
        "arch/x86/xen/smp.c xen_smp_intr_init(), XEN_CALL_FUNCTION_VECTOR",
    ),
    (
        "IPI call-function-single",
        "ipi",
        "arch/x86/xen/smp.c xen_smp_intr_init(), XEN_CALL_FUNCTION_SINGLE_VECTOR",
    ),
    ("IPI irq-work", "ipi", "arch/x86/xen/smp_pv.c xen_smp_intr_init_pv(), XEN_IRQ_WORK_VECTOR"),
    (
        "IPI spinlock kick",
        "ipi",
        "arch/x86/xen/spinlock.c xen_init_lock_cpu(), XEN_SPIN_UNLOCK_VECTOR (PV spinlocks on)",
    ),
)
GLOBAL = (
    ("VIRQ_CONSOLE", f"virq:{L.VIRQ_CONSOLE}", "drivers/tty/hvc/hvc_xen.c (dom0 console)"),
    (
        "VIRQ_DOM_EXC",
        f"virq:{L.VIRQ_DOM_EXC}",
        "tools/xenstored: xenevtchn_bind_virq(VIRQ_DOM_EXC)",
    ),
    ("VIRQ_PCPU_STATE", f"virq:{L.VIRQ_PCPU_STATE}", "drivers/xen/pcpu.c"),
    ("VIRQ_MCA", f"virq:{VIRQ_MCA}", "drivers/xen/mcelog.c"),
    (
        "xenstore ring (kernel + xenstored ends)",
        "self-channel",
        "drivers/xen/xenbus/xenbus_probe.c allocates dom0's xenstore port; xenstored binds it",
    ),
)


@dataclasses.dataclass(frozen=True)
class Profile:
    dom0_vcpus: int = 8
    dom0_pirqs: int = 32  # physical IRQs (MSI/MSI-X vectors and GSIs) routed to dom0
    guest_channels: int = 4  # xenstore, console, one vif, one vbd (the thread: "4 or more")
    guest_vcpus: int = 1
    guest_type: str = "pv"  # "hvm" adds the device model's ioreq channels

    def guest_ports(self) -> int:
        """dom0 ports one guest takes: its channels, plus for HVM one ioreq channel per vCPU
        and the buffered-ioreq channel (QEMU binds them in dom0: xen-hvm.c)."""
        extra = self.guest_vcpus + 1 if self.guest_type == "hvm" else 0
        return self.guest_channels + extra

    def items(self, abi: str) -> list[tuple[str, int, str, str]]:
        """(what, count, kind, source) dom0 binds under `abi`."""
        out = []
        for what, kind, src in PER_VCPU:
            if what == "VIRQ_DEBUG" and abi == "fifo":
                continue
            out.append((f"{what} (per vCPU)", self.dom0_vcpus, kind, src))
        out += [(w, 1, k, s) for w, k, s in GLOBAL]
        out.append(
            (
                "physical IRQs",
                self.dom0_pirqs,
                "pirq",
                "configurable (--profile dom0_pirqs=N); one port each",
            )
        )
        return out

    def dom0_ports(self, abi: str) -> int:
        return sum(n * (2 if k == "self-channel" else 1) for _, n, k, _ in self.items(abi))


KEYS = {f.name: f.type for f in dataclasses.fields(Profile)}


def parse(text: str | None) -> Profile:
    """'dom0_vcpus=16,dom0_pirqs=64,guest_type=hvm,guest_vcpus=2' over the defaults."""
    p = Profile()
    if not text:
        return p
    kw = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ValueError(
                f"--profile takes KEY=VALUE[,...] with keys {', '.join(KEYS)}; not {part!r}"
            )
        if key == "guest_type":
            if val not in ("pv", "hvm"):
                raise ValueError(f"--profile guest_type must be pv or hvm, not {val!r}")
            kw[key] = val
            continue
        try:
            kw[key] = int(val)
        except ValueError:
            raise ValueError(f"--profile {key} needs an integer, not {val!r}") from None
        if kw[key] < (1 if key in ("dom0_vcpus", "guest_vcpus", "guest_channels") else 0):
            raise ValueError(f"--profile {key}={kw[key]} is out of range")
    return dataclasses.replace(p, **kw)


def bind(dom0, profile: Profile) -> int:
    """Bind the profile's channels in dom0 (a domain with profile.dom0_vcpus vCPUs); returns
    the ports used."""
    used = 0
    for _, count, kind, _ in profile.items(dom0.abi):
        for i in range(count):
            v = i % dom0.vcpus
            if kind.startswith("virq:"):
                virq = int(kind.split(":")[1])
                dom0.bind_virq(virq, v if virq in L.VIRQ_PER_VCPU else 0)
                used += 1
            elif kind == "ipi":
                dom0.bind_ipi(v)
                used += 1
            elif kind == "self-channel":
                p = dom0.alloc_unbound(L.DOMID_SELF)
                dom0.bind_interdomain(L.DOMID_SELF, p)
                used += 2
            else:  # pirq: a port of dom0's space
                dom0.alloc_unbound(L.DOMID_SELF)
                used += 1
    return used
