"""The headline's C anchor (bench/c/evtchn_ref.c --headline, stress/anchor.py), `python -m
stress --beside-c`, and the stress workers' compiled accounting (stress/_fast.c), which must
tally exactly what the numpy code tallies. Small sizes; no timing assertions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evtchn import Host

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stress import anchor as A  # noqa: E402
from stress import config as CF  # noqa: E402
from stress import fast as F  # noqa: E402
from stress import run as R  # noqa: E402
from stress import shm as S  # noqa: E402
from stress import workers as W  # noqa: E402


def _ready() -> bool:
    try:
        from evtchn._core import CythonKernels  # noqa: F401
    except ImportError:
        return False
    return shutil.which("cc") is not None


pytestmark = pytest.mark.skipif(not _ready(), reason="needs the Cython backend and a C compiler")


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    return A.build(tmp_path_factory.mktemp("anchor"))


@pytest.fixture(scope="module")
def fast_lib(tmp_path_factory):
    return F.build(tmp_path_factory.mktemp("fast"))


def _cfg(abi="fifo", ports=512, vcpus=4, senders=2, **kw):
    return CF.Config(ports=ports, vcpus=vcpus, senders=senders, seed=7, **kw).for_abi(abi)


# --- the C anchor -------------------------------------------------------------------------------
@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_anchor_delivers_every_edge_and_checks_it(exe, abi):
    cfg = _cfg(abi, nap=0.001)
    ah = A.AnchorHost(cfg)
    try:
        rec = ah.run(exe, 0.3, seed=3)
        again = ah.run(exe, 0.2, seed=4)  # the same host serves several runs
    finally:
        ah.close()
    for r in (rec, again):
        assert r["ok"], r
        assert r["abi"] == abi and r["senders"] == 2 and r["vcpus"] == 4
        assert r["channels"] == cfg.channels
        assert r["delivered"] == r["edges"] > 0
        assert r["edges"] <= r["sent"]
        assert r["left_pending"] == r["lost"] == r["phantom"] == r["ports_miscounted"] == 0
        assert r["race_delivered"] > 0 and r["delivered_per_s"] > 0
        assert r["vcpu_wakeups"] > 0 and r["refused"] == 0
        assert r["cpu_s"]["senders"] > 0 and r["cpu_per_s"]["vcpus"] >= 0


def test_anchor_accounting_catches_an_event_it_did_not_deliver(exe):
    """A dom0 port masked behind the C program's back keeps its events pending: the per-port
    check and the pending scan must both say so (the anchor cannot win by losing events)."""
    cfg = _cfg("fifo", ports=64, vcpus=2, nap=0.001)
    ah = A.AnchorHost(cfg)
    try:
        dom0 = ah.host.domain(0)
        dom0.mask(1)  # port 1 is the first channel's dom0 end
        rec = ah.run(exe, 0.2)
    finally:
        ah.close()
    assert not rec["ok"]
    assert rec["lost"] >= 1 and rec["ports_miscounted"] >= 1 and rec["left_pending"] >= 1


def test_anchor_rejects_bad_arguments(exe):
    r = subprocess.run([str(exe), "--headline"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
    r = subprocess.run(
        [str(exe), "--headline", "--host", "evtchn-0-nosuchhost"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 1 and "cannot open" in r.stderr


def test_stress_beside_c_records_both_rates(tmp_path):
    out = tmp_path / "s.json"
    r = subprocess.run(
        [sys.executable, "-m", "stress", "--abi", "all", "--ports", "512", "--vcpus", "4"]
        + ["--duration", "1", "--duel", "0", "--no-progress", "--beside-c", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "C anchor delivered/s" in r.stdout and "CPU s/s senders/vcpus" in r.stdout
    runs = {x["abi"]: x for x in json.loads(out.read_text())["runs"]}
    for abi in ("fifo", "2l"):
        c = runs[abi]["c_anchor"]
        assert c["delivered_per_s"] > 0 and c["python_over_c"] > 0, c
        assert c["record"]["ok"] and c["record"]["delivered"] == c["record"]["edges"]
        assert set(c["cpu_per_s"]) == {"senders", "vcpus"}
        # /proc counts CPU time in ticks (10 ms): a short small run may show none
        assert set(runs[abi]["race_cpu_per_s"]) == {"senders", "vcpus", "chaos"}
        assert runs[abi]["race_cpu_per_s"]["senders"] > 0
        assert runs[abi]["race_vcpu_wakeups"] > 0
    assert "c_anchor" not in runs["3l"] and "fifo and 2l only" in runs["3l"]["c_anchor_error"]


# --- the compiled accounting --------------------------------------------------------------------
@pytest.fixture
def env_pair(fast_lib):
    """One small stress setup, and its Env with and without the compiled accounting."""
    cfg = _cfg("fifo", ports=1024, vcpus=4)
    host = Host("cython")
    su = R.setup(cfg, host)
    cfg.fast_lib = str(fast_lib)
    fast_env = W.Env(cfg, host, su.env.stats)
    assert su.env.fast is None and fast_env.fast is not None
    try:
        yield su, su.env, fast_env
    finally:
        su.env.stats.close()
        host.close()


def test_hist_buckets_match_numpy(fast_lib):
    import ctypes

    lib = ctypes.CDLL(str(fast_lib))
    lib.hist_bucket.argtypes = [ctypes.c_int64, ctypes.c_int32, ctypes.c_int32]
    lib.hist_bucket.restype = ctypes.c_int64
    lat = np.array(
        [0, 1, 2, 3, 7, 8, 9, 1000, 65535, 65536, 10**9, 2**62]
        + list(np.random.default_rng(1).integers(1, 10**10, 500)),
        np.int64,
    )
    want = W.hist_index(lat)
    got = [lib.hist_bucket(int(x), S.HIST_SUB, S.HIST_BUCKETS) for x in lat]
    assert got == want.tolist()


ROWS = ("delivered", "lat_cnt", "hist", "active", "stamp")


def _snapshot(st, v):
    return {
        "delivered": st.delivered[v].copy(),
        "lat_cnt": st.lat_cnt[v].copy(),
        "hist": st.hist[v].copy(),
        "active": st.active.copy(),
        "stamp": st.stamp.copy(),
        "hdr": st.hdr[st.vcpu_slot(v), [S.H_DELIVERED, S.H_OVERLAPS, S.H_NVIOL]].copy(),
        "viol": st.viol[st.vcpu_slot(v)].copy(),
    }


def _restore(st, v, snap):
    for k in ROWS:
        getattr(st, k)[v if k in ("delivered", "lat_cnt", "hist") else slice(None)] = snap[k]
    st.hdr[st.vcpu_slot(v), [S.H_DELIVERED, S.H_OVERLAPS, S.H_NVIOL]] = snap["hdr"]
    st.viol[st.vcpu_slot(v)] = snap["viol"]


def test_vcpu_accounting_compiled_equals_numpy(env_pair):
    """The same batch (own ports, moved ports - one already in another vCPU's handler -, a
    port masked since the setup, a closed port, a port of another vCPU, sampled ports with and
    without a stamp) accounted by both: the same tallies, checks and violations."""
    su, np_env, c_env = env_pair
    st, v = np_env.stats, 1
    ports = np.flatnonzero(st.port_tag == v)[:40].astype(np.uint32)
    moved = np.flatnonzero(st.port_tag == S.TAG_ANY)[:6].astype(np.uint32)
    perma = np.flatnonzero(st.port_tag == S.TAG_PERMA)[:1].astype(np.uint32)
    dead = np.flatnonzero(st.port_tag == S.TAG_DEAD)[1:2].astype(np.uint32)
    other = np.flatnonzero(st.port_tag == 2)[:1].astype(np.uint32)
    assert len(moved) == 6 and len(perma) and len(dead) and len(other)
    batch = np.concatenate([ports, moved, perma, dead, other])
    st.port_sampled[:] = False
    st.port_sampled[batch[::2]] = True
    st.ctrl[S.C_SAMPLE_MASK] = 1
    st.stamp[batch[::4]] = 1000  # an old stamp: a latency sample
    st.active[moved[0]] = 3 + 1  # vCPU 3 has it in its handler: an overlap
    before = _snapshot(st, v)
    a = W.VCPU(np_env, v)
    a.account(batch)
    a.flush_latency()
    by_numpy = _snapshot(st, v)
    _restore(st, v, before)
    b = W.VCPU(c_env, v)
    b.buf[: len(batch)] = batch
    nbad = b.fast(len(batch))
    b._bad(*b.fast.bad(nbad), 0)
    by_c = _snapshot(st, v)
    assert nbad == 3
    for k in ROWS:
        assert np.array_equal(by_numpy[k], by_c[k]), k
    assert np.array_equal(by_numpy["hdr"], by_c["hdr"])
    assert by_c["hdr"][1] == 1 and by_c["hdr"][2] == 3  # one overlap, three violations
    kinds = lambda snap: sorted(map(tuple, snap["viol"][:3, :3].tolist()))  # noqa: E731
    assert kinds(by_numpy) == kinds(by_c)
    assert by_c["lat_cnt"].sum() > 0  # stamped sampled ports gave latency samples


def test_sender_accounting_compiled_equals_numpy(env_pair):
    """The same picks (same seed) sent by both senders on the same state: the same per-port
    edge tallies, and stamps on the same ports."""
    su, np_env, c_env = env_pair
    st = np_env.stats
    st.port_sampled[:] = False
    st.port_sampled[::3] = True
    st.ctrl[S.C_SAMPLE_MASK] = 2
    dom0 = np_env.dom0
    out = {}
    for name, env in (("numpy", np_env), ("c", c_env)):
        st.edges[:] = 0
        st.stamp[:] = 0
        s = W.Sender(env, 0, np.random.default_rng(99))
        for _ in range(3):
            s.send_batch(300)
        out[name] = (st.edges[0].copy(), st.stamp != 0, int(s.hdr[S.H_EDGES]))
        s.hdr[S.H_EDGES] = 0
        for vc in range(4):
            dom0.consume(vc)
    assert out["c"][2] == out["numpy"][2] == int(out["c"][0].sum()) > 0
    assert np.array_equal(out["numpy"][0], out["c"][0])
    assert np.array_equal(out["numpy"][1], out["c"][1])


def test_stress_numpy_accounting_still_passes(tmp_path):
    out = tmp_path / "n.json"
    r = subprocess.run(
        [sys.executable, "-m", "stress", "--abi", "fifo", "--ports", "512", "--vcpus", "4"]
        + ["--duration", "1", "--duel", "0", "--no-progress", "--accounting", "numpy"]
        + ["--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (rec,) = json.loads(out.read_text())["runs"]
    assert rec["accounting"] == "numpy" and rec["verdict"] == "pass" and rec["delivered"] > 0
