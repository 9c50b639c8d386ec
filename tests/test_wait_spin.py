"""wait()'s spin before it blocks: an event raised while the vCPU spins is taken without the
vCPU registering as a waiter, so the sender's kick makes no wake-up (the kick word does not
move); an event raised after the spin finds the vCPU registered and blocked, and wakes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from evtchn import EvtchnError
from evtchn import layout as L

FOREVER = 10**12  # ns: only the event, the timeout or Ctrl-C ends such a spin


def pair(host):
    d0 = host.create_domain("fifo")
    du = host.create_domain("fifo")
    p = du.bind_interdomain_many(d0.domid, d0.alloc_unbound_many(du.domid, 1))
    du.consume(0)
    return d0, du, int(p[0])


def kicks(d):
    return d._dm.xen_vcpu_u32(0, L.X_KICK)


def test_event_during_the_spin_costs_no_wake_up(host, compiled):
    d0, du, p = pair(host)
    before = kicks(d0)
    seen = []

    def sender():
        time.sleep(0.02)
        seen.append(d0._dm.waiters(0)[0])  # the spinning vCPU is not registered
        du.send(p)

    t = threading.Thread(target=sender)
    t.start()
    assert d0.wait(0, timeout=None, spin_ns=FOREVER)
    t.join()
    assert seen == [0] and kicks(d0) == before
    assert d0.consume_one(0) != 0


def test_after_the_spin_the_vcpu_blocks_and_is_kicked(host, compiled):
    d0, du, p = pair(host)
    before = kicks(d0)

    def sender():
        while d0._dm.waiters(0)[0] == 0:  # registered: the spin is over, it sleeps
            time.sleep(0.001)
        du.send(p)

    t = threading.Thread(target=sender)
    t.start()
    assert d0.wait(0, timeout=None, spin_ns=1000)
    t.join()
    assert kicks(d0) == before + 1 and d0._dm.waiters(0)[0] == 0


def test_the_timeout_bounds_the_spin(host):
    d0, _du, _p = pair(host)
    assert d0.wait(0, timeout=0.01, spin_ns=FOREVER) is False
    host.wait_spin_ns = FOREVER  # the default for calls that do not say
    assert d0.wait(0, timeout=0.01) is False
    with pytest.raises(ValueError):
        d0.wait(0, 0, spin_ns=-1)
    with pytest.raises(EvtchnError, match="EINVAL"):
        d0.wait(0, 0, spin_ns=1.5)


@pytest.mark.parametrize("spin_ns", [(1 << 63) - 1, 1 << 63, 1 << 70])
def test_a_huge_spin_still_ends_at_the_timeout(host, spin_ns):
    """A spin too long for the kernels' signed 64-bit clock arithmetic is "until the
    timeout", not an overflow (no spin at all, or OverflowError)."""
    d0, _du, _p = pair(host)
    t0 = time.monotonic()
    assert d0.wait(0, timeout=0.05, spin_ns=spin_ns) is False
    assert 0.04 <= time.monotonic() - t0 < 30  # it spun until the timeout; no hang


SPIN_FOREVER = textwrap.dedent(
    """
    import sys, evtchn
    host = evtchn.Host.attach(sys.argv[1], backend=sys.argv[3])
    try:
        d = host.domain(int(sys.argv[2]))
        d.wait(0, timeout=0, spin_ns=1000)        # compiled/loaded before we say ready
        print("ready", flush=True)
        try:
            d.wait(0, spin_ns=10**12)             # spins: only Ctrl-C ends it
            print("woken", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    finally:
        host.close()
    """
)


def test_ctrl_c_ends_a_spin(host, compiled):
    d0 = host.create_domain("fifo")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    p = subprocess.Popen(
        [sys.executable, "-c", SPIN_FOREVER, host.name, str(d0.domid), compiled],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=60)
        assert out.strip() == "interrupted" and p.returncode == 0
        assert d0._dm.waiters(0) == (0, [0] * L.WAITER_SLOTS)  # it never registered
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_the_default_spin_comes_from_the_environment():
    code = "import evtchn; h = evtchn.Host('reference'); print(h.wait_spin_ns); h.close()"
    env = dict(os.environ, EVTCHN_WAIT_SPIN_NS="12345")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "12345"
