"""create_domain that fails halfway (the fd limit, an error while initialising) leaves no
segment behind in /dev/shm, and the next create_domain takes the same domid."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import evtchn
from evtchn import host as host_mod


def test_failed_initialisation_unlinks_the_segment(backend, monkeypatch):
    with evtchn.Host(backend) as h:
        path = os.path.join("/dev/shm", f"{h.name}-d0")

        def broken(dm):
            raise MemoryError("injected")

        monkeypatch.setattr(host_mod, "_init_domain_state", broken)
        with pytest.raises(MemoryError):
            h.create_domain("fifo")
        assert not os.path.exists(path) and h.ndomains == 0
        monkeypatch.undo()
        assert h.create_domain("fifo").domid == 0


CHILD = textwrap.dedent(
    """
    import errno, os, resource, sys
    import evtchn
    with evtchn.Host(sys.argv[1]) as h:
        h.create_domain("fifo")  # everything imported and warm
        probe = os.dup(0)  # the lowest free fd: create_domain's os.open gets it
        os.close(probe)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe + 1, hard))  # mmap's dup fails
        try:
            h.create_domain("fifo")
        except OSError as exc:
            assert exc.errno == errno.EMFILE, exc
        else:
            raise AssertionError("create_domain succeeded at the fd limit")
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        print(h.name, h.ndomains, os.path.exists(f"/dev/shm/{h.name}-d1"))
        assert h.create_domain("fifo").domid == 1
    """
)


def test_fd_limit_leaves_no_half_made_segment(backend):
    r = subprocess.run(
        [sys.executable, "-c", CHILD, backend], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    name, ndomains, leaked = r.stdout.split()
    assert (ndomains, leaked) == ("1", "False")
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(name)]
