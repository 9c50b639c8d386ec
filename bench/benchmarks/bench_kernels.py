"""One process, nothing racing: the cost of evtchn's calls (asv time_ benchmarks)."""

import numpy as np

from evtchn import Host

from . import _common  # noqa: F401  (sys.path)
from ._common import BACKEND


class SendConsume:
    """send_many over 1024 interdomain ports, then consume_into until drained; and one event
    through send + consume_into."""

    params = ["fifo", "2l"]
    param_names = ["abi"]
    timeout = 60

    def setup(self, abi):
        self.host = Host(BACKEND)
        self.rx = self.host.create_domain(abi=abi, vcpus=1)
        self.tx = self.host.create_domain(abi=abi, vcpus=1)
        r = self.rx.alloc_unbound_many(self.tx.domid, 1024)
        ports = self.tx.bind_interdomain_many(self.rx.domid, r).tolist()
        self.ports = np.asarray(ports, dtype=np.uint32)
        self.one = int(ports[0])
        self.edges = np.zeros(len(ports), np.uint8)
        self.buf = np.empty(4096, np.uint32)
        self.rx.consume(0)

    def teardown(self, abi):
        self.host.close()

    def time_send_many_consume_1024(self, abi):
        self.tx.send_many(self.ports, self.edges)
        while self.rx.consume_into(0, self.buf) == len(self.buf):
            pass

    def time_send_consume_one(self, abi):
        self.tx.send(self.one)
        self.rx.consume_into(0, self.buf)


class Bind:
    """alloc_unbound + bind_interdomain + close of one port pair."""

    params = ["fifo", "2l", "3l"]
    param_names = ["abi"]

    def setup(self, abi):
        self.host = Host(BACKEND)
        self.rx = self.host.create_domain(abi=abi, vcpus=1)
        self.tx = self.host.create_domain(abi=abi, vcpus=1)

    def teardown(self, abi):
        self.host.close()

    def time_bind_close(self, abi):
        r = self.rx.alloc_unbound(self.tx.domid)
        s = self.tx.bind_interdomain(self.rx.domid, r)
        self.tx.close(s)
        self.rx.close(r)


class Calls:
    """The per-event handle calls with nothing to deliver, beside their kernel calls."""

    params = ["fifo", "2l"]
    param_names = ["abi"]

    def setup(self, abi):
        self.host = Host(BACKEND)
        self.rx = self.host.create_domain(abi=abi, vcpus=1)
        self.tx = self.host.create_domain(abi=abi, vcpus=1)
        r = self.rx.alloc_unbound_many(self.tx.domid, 1)
        self.one = int(self.tx.bind_interdomain_many(self.rx.domid, r)[0])
        self.k, self.buf = self.host._k, np.empty(4096, np.uint32)
        self.tx.send(self.one)  # pending from now on: every send below coalesces

    def teardown(self, abi):
        self.host.close()

    def time_domain_send(self, abi):
        self.tx.send(self.one)

    def time_kernel_send(self, abi):
        self.k.send(self.tx.domid, self.one)

    def time_domain_consume_none(self, abi):
        self.tx.consume(0)

    def time_domain_consume_one_none(self, abi):
        self.tx.consume_one(0)

    def time_kernel_consume_none(self, abi):
        self.k.consume(self.tx.domid, 0, self.buf)


class BindMany:
    """Setting up 4095 channels with alloc_unbound_many + bind_interdomain_many (fresh
    domains for every call: number = 1, so asv runs setup before each)."""

    params = ["fifo", "2l"]
    param_names = ["abi"]
    number = 1
    repeat = 5
    warmup_time = 0

    def setup(self, abi):
        self.host = Host(BACKEND)
        self.rx = self.host.create_domain(abi=abi, vcpus=1)
        self.tx = self.host.create_domain(abi=abi, vcpus=1)

    def teardown(self, abi):
        self.host.close()

    def time_bind_many_4095(self, abi):
        self.tx.bind_interdomain_many(
            self.rx.domid, self.rx.alloc_unbound_many(self.tx.domid, 4095)
        )
