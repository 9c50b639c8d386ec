"""The pure-Python oracle: every ABI kernel written to be read, on the same shared layout.

One process only (no atomics are needed when nothing races), so a read-modify-write below is a
plain read then write; the compiled backends (_core.pyx, numba_kernels.py) do the same steps with
real atomics, in the same order. Each function names the Xen or Linux routine it models.
Return conventions shared by all backends:
  set_pending / send / raise_virq -> 1 if PENDING went 0 -> 1 (a new edge), else 0; send
  returns -errno on a refused port. consume fills `out` and returns the count.
"""

from __future__ import annotations

import time

from . import layout as L

INJ_SELECTOR_FIRST = L.INJECTIONS["2l-selector-before-upcall-clear"]
INJ_UNMASK_TEST_FIRST = L.INJECTIONS["2l-unmask-test-before-clear"]
INJ_READY_EVERY_LINK = L.INJECTIONS["fifo-ready-every-link"]
INJ_OLD_TAIL_KEPT = L.INJECTIONS["fifo-old-tail-kept"]
INJ_PENDING_BEFORE_LOCK = L.INJECTIONS["fifo-pending-before-lock"]


class ReferenceKernels:
    name = "reference"
    multiprocess = False

    def __init__(self) -> None:
        self.doms = {}

    def map_domain(self, dm) -> None:
        self.doms[dm.domid] = dm

    # -- locks: one process and thread, nothing to exclude (the words stay 0) -----------------
    def lock(self, address: int, reader: bool = False) -> None:
        pass

    def trylock(self, address: int) -> bool:
        return True

    def unlock(self, address: int) -> None:
        pass

    def unlock_owned(self, addresses) -> int:
        return 0

    def set_bit(self, address: int, bit: int, word_bits: int) -> None:
        """Atomically set `bit` of the W-bit word at `address` (guest bitops on shared data)."""
        self._word_op(address, word_bits, lambda w: w | (1 << bit))

    def clear_bit(self, address: int, bit: int, word_bits: int) -> None:
        self._word_op(address, word_bits, lambda w: w & ~(1 << bit))

    def _word_op(self, address: int, word_bits: int, fn) -> None:
        for d in self.doms.values():
            off = address - d.seg.address
            if 0 <= off < d.seg.size:
                view = d.u64 if word_bits == 64 else d.u32
                idx = off // (word_bits // 8)
                view[idx] = fn(int(view[idx]))
                return
        raise ValueError(f"address {address:#x} is in no mapped domain")

    # -- bit helpers on xen_ulong_t arrays -----------------------------------------------------
    @staticmethod
    def _test_and_set(words, idx: int, bit: int) -> bool:
        old = int(words[idx])
        words[idx] = old | (1 << bit)
        return bool(old >> bit & 1)

    @staticmethod
    def _test_and_clear(words, idx: int, bit: int) -> bool:
        old = int(words[idx])
        words[idx] = old & ~(1 << bit)
        return bool(old >> bit & 1)

    @staticmethod
    def _xchg(words, idx: int, new: int) -> int:
        old = int(words[idx])
        words[idx] = new
        return old

    def _bitmaps(self, d):
        """(pending, mask) base indices into d.words: shared_info for 2l, the L3 arrays for 3l."""
        wbytes = d.word_bits // 8
        if d.abi == L.ABI_3L:
            return (d.layout.offsets["l3_pending"] // wbytes, d.layout.offsets["l3_mask"] // wbytes)
        si = d.layout.offsets["shared_info"]
        return (si + L.SI_PENDING) // wbytes, (si + L.si_mask(d.word_bits)) // wbytes

    def _sel_index(self, d, vcpu: int) -> int:
        return (d.layout.vcpu_info(vcpu) + L.vi_pending_sel(d.word_bits)) // (d.word_bits // 8)

    def _l2_index(self, d, vcpu: int) -> int:
        return d.layout.l2_selector(vcpu) // (d.word_bits // 8)

    # -- upcall and kick (vcpu_mark_events_pending) --------------------------------------------
    def mark_upcall_pending(self, d, vcpu: int) -> None:
        vi = d.layout.vcpu_info(vcpu) + L.VI_UPCALL_PENDING
        if not d.u8[vi] & 1:
            d.u8[vi] = int(d.u8[vi]) | 1
            self._kick(d, vcpu)

    def _kick(self, d, vcpu: int) -> None:
        """vcpu_kick: only a vCPU with a registered waiter (X_WAITERS) is woken."""
        if d.xen_vcpu_u32(vcpu, L.X_WAITERS):
            d.set_xen_vcpu_u32(vcpu, L.X_KICK, (d.xen_vcpu_u32(vcpu, L.X_KICK) + 1) & 0xFFFFFFFF)

    def upcall_pending(self, domid: int, vcpu: int) -> bool:
        d = self.doms[domid]
        return bool(d.u8[d.layout.vcpu_info(vcpu) + L.VI_UPCALL_PENDING] & 1)

    # -- hypervisor side: evtchn_port_set_pending and friends ---------------------------------
    def set_pending(self, domid: int, vcpu: int, port: int) -> int:
        d = self.doms[domid]
        if d.state(port) <= L.ECS_RESERVED:  # evtchn_usable()
            return 0
        if d.abi == L.ABI_FIFO:
            return self._fifo_set_pending(d, vcpu, port)
        return self._bitmap_set_pending(d, vcpu, port)

    def _bitmap_set_pending(self, d, vcpu: int, port: int) -> int:
        """event_2l.c set_pending: pending, then selector(s), then the upcall flag, in order;
        pollers last, for a new edge only."""
        w = d.word_bits
        pend, mask = self._bitmaps(d)
        if self._test_and_set(d.words, pend + port // w, port % w):
            return 0  # coalesced: no pollers check
        if not d.words[mask + port // w] >> (port % w) & 1:
            self._raise_selectors(d, vcpu, port)
        self._check_pollers(d, port)
        return 1

    def _check_pollers(self, d, port: int) -> None:
        """evtchn_check_pollers: end the poll of every vCPU polling `port` or several ports,
        recording the port in its poll_mask word (POLL_WOKEN | port)."""
        if not d.hdr(L.H_POLLERS):
            return
        for v in range(d.vcpus):
            if d.xen_vcpu_u32(v, L.X_POLL) != L.POLL_ACTIVE:
                continue
            pe = d.xen_vcpu_u32(v, L.X_POLL_EVTCHN)
            if pe >= 0x80000000:  # an i32: -1 polls several ports
                pe -= 1 << 32
            if pe > 0 and pe != port:
                continue
            d.set_xen_vcpu_u32(v, L.X_POLL, L.POLL_WOKEN | port)
            d.set_hdr(L.H_POLLERS, d.hdr(L.H_POLLERS) - 1)
            d.set_xen_vcpu_u32(v, L.X_KICK, (d.xen_vcpu_u32(v, L.X_KICK) + 1) & 0xFFFFFFFF)

    def _raise_selectors(self, d, vcpu: int, port: int) -> None:
        w = d.word_bits
        if d.abi == L.ABI_3L:  # L2 bit covers L3 word port/W
            l2 = port // w
            if self._test_and_set(d.words, self._l2_index(d, vcpu) + l2 // w, l2 % w):
                return
            if not self._test_and_set(d.words, self._sel_index(d, vcpu), l2 // w):
                self.mark_upcall_pending(d, vcpu)
            return
        if not self._test_and_set(d.words, self._sel_index(d, vcpu), port // w):
            self.mark_upcall_pending(d, vcpu)

    def _fifo_word(self, d, port: int):
        """Index into d.u32 of the port's event word, or None when its page was not added."""
        if port >= d.hdr(L.H_ARRAY_PAGES) * L.FIFO_WORDS_PER_PAGE:
            return None
        return d.layout.event_word(port) // 4

    def _fifo_set_pending(self, d, vcpu: int, port: int) -> int:
        """evtchn_fifo_set_pending: queue the event, then check pollers for a new edge."""
        first = self._fifo_queue_event(d, vcpu, port)
        if first:
            self._check_pollers(d, port)
        return first

    def _fifo_queue_event(self, d, vcpu: int, port: int) -> int:
        """The body of evtchn_fifo_set_pending (after 71ac522909)."""
        wi = self._fifo_word(d, port)
        if wi is None:
            d.set_port_u8(port, L.P_PENDING, 1)  # replayed when the page is added
            return 0
        u32 = d.u32
        q_prio = d.port_u8(port, L.P_PRIORITY)
        lastq = d.port_u32(port, L.P_LASTQ)
        old_vcpu, old_prio = lastq >> 16, lastq & 0xFF
        # One process: the (old, new) queue pair cannot change under us, the first try locks.
        inject = d.hdr(L.H_INJECT)
        first = not (u32[wi] & L.FIFO_PENDING)
        u32[wi] = int(u32[wi]) | L.FIFO_PENDING
        linked = True
        did_link = False
        if not u32[wi] & L.FIFO_MASKED and not u32[wi] & L.FIFO_LINKED:
            u32[wi] = int(u32[wi]) | L.FIFO_LINKED
            did_link = True
            old_tail = d.queue_tail_off(old_vcpu, old_prio) // 4
            if u32[old_tail] == port and inject != INJ_OLD_TAIL_KEPT:
                u32[old_tail] = 0  # an old tail: that queue is now empty
            if (old_vcpu, old_prio) != (vcpu, q_prio):
                d.set_port_u32(port, L.P_LASTQ, L.lastq_pack(vcpu, q_prio))
            tail = d.queue_tail_off(vcpu, q_prio) // 4
            linked = False
            if u32[tail]:
                linked = self._fifo_set_link(d, int(u32[tail]), port)
            if not linked:  # queue was empty: new HEAD
                u32[(d.layout.control_block(vcpu) + L.CB_HEAD) // 4 + q_prio] = port
            u32[tail] = port
        if not linked or (did_link and inject == INJ_READY_EVERY_LINK):
            ready = (d.layout.control_block(vcpu) + L.CB_READY) // 4
            was = u32[ready] >> q_prio & 1
            u32[ready] = int(u32[ready]) | (1 << q_prio)
            if not was:
                self.mark_upcall_pending(d, vcpu)
        return int(first)

    def _fifo_set_link(self, d, tail_port: int, port: int) -> bool:
        """evtchn_fifo_set_link: link the tail to `port` iff the tail is still LINKED."""
        wi = self._fifo_word(d, tail_port)
        w = int(d.u32[wi])
        if not w & L.FIFO_LINKED:
            return False  # tail already consumed: write HEAD
        link_mask = (1 << d.link_bits) - 1
        d.u32[wi] = (w & ~(L.FIFO_BUSY | link_mask)) | port
        return True

    def clear_pending(self, domid: int, port: int) -> int:
        """Clear PENDING; returns 1 if it was set (an event destroyed undelivered)."""
        d = self.doms[domid]
        if d.abi == L.ABI_FIFO:
            wi = self._fifo_word(d, port)
            if wi is None:
                return 0
            was = int(d.u32[wi]) >> L.FIFO_PENDING_BIT & 1
            d.u32[wi] = int(d.u32[wi]) & ~L.FIFO_PENDING
            return was
        pend, _ = self._bitmaps(d)
        return int(self._test_and_clear(d.words, pend + port // d.word_bits, port % d.word_bits))

    def hyp_unmask(self, domid: int, port: int) -> int:
        """EVTCHNOP_unmask body: the caller checked the port is valid. Returns 1 if it set
        PENDING 0 -> 1 itself (FIFO, when the guest acked between the test and set_pending)."""
        d = self.doms[domid]
        if d.state(port) <= L.ECS_RESERVED:
            return 0
        vcpu = d.notify_vcpu(port)
        if d.abi == L.ABI_FIFO:
            wi = self._fifo_word(d, port)
            if wi is None:
                return 0
            d.u32[wi] = int(d.u32[wi]) & ~L.FIFO_MASKED
            if d.u32[wi] & L.FIFO_PENDING:
                return self._fifo_set_pending(d, vcpu, port)
            return 0
        w = d.word_bits
        pend, mask = self._bitmaps(d)
        if (
            self._test_and_clear(d.words, mask + port // w, port % w)
            and d.words[pend + port // w] >> (port % w) & 1
        ):
            self._raise_selectors(d, vcpu, port)
        return 0

    def is_pending(self, domid: int, port: int) -> bool:
        d = self.doms[domid]
        if d.abi == L.ABI_FIFO:
            wi = self._fifo_word(d, port)
            return wi is not None and bool(d.u32[wi] & L.FIFO_PENDING)
        pend, _ = self._bitmaps(d)
        return bool(d.words[pend + port // d.word_bits] >> (port % d.word_bits) & 1)

    def is_masked(self, domid: int, port: int) -> bool:
        d = self.doms[domid]
        if d.abi == L.ABI_FIFO:
            wi = self._fifo_word(d, port)
            return wi is None or bool(d.u32[wi] & L.FIFO_MASKED)
        _, mask = self._bitmaps(d)
        return bool(d.words[mask + port // d.word_bits] >> (port % d.word_bits) & 1)

    def is_linked(self, domid: int, port: int) -> bool:
        """FIFO is_busy: a LINKED port is not handed out again (78e24c269b)."""
        d = self.doms[domid]
        if d.abi != L.ABI_FIFO:
            return False
        wi = self._fifo_word(d, port)
        return wi is not None and bool(d.u32[wi] & L.FIFO_LINKED)

    def expand_array(self, domid: int) -> int:
        """Linux fills a new page with MASKED, then EVTCHNOP_expand_array adds it and Xen
        re-raises the ports of its range that were sent to while it was missing (917c123029).
        Returns 0 or -ENOSPC. The caller holds the event lock."""
        d = self.doms[domid]
        pages = d.hdr(L.H_ARRAY_PAGES)
        first = pages * L.FIFO_WORDS_PER_PAGE
        if first >= 1 << d.link_bits:
            return -28
        base = d.layout.event_word(first) // 4
        d.u32[base : base + L.FIFO_WORDS_PER_PAGE] = L.FIFO_MASKED
        d.set_hdr(L.H_ARRAY_PAGES, pages + 1)
        valid = d.hdr(L.H_VALID)
        for port in range(first, min(first + L.FIFO_WORDS_PER_PAGE, valid)):
            if d.port_u8(port, L.P_PENDING):
                self._fifo_set_pending(d, d.notify_vcpu(port), port)
        return 0

    # -- EVTCHNOP_send and Xen-internal senders ------------------------------------------------
    def send(self, domid: int, port: int) -> int:
        d = self.doms[domid]
        if port < 0 or port >= d.hdr(L.H_VALID):
            return -22
        state = d.state(port)
        if state == L.ECS_INTERDOMAIN:
            rd = self.doms.get(d.port_u16(port, L.P_REMOTE_DOM))
            if rd is None:  # a peer this process has not mapped (Domain.send maps, retries)
                return -3  # ESRCH
            rport = d.port_u32(port, L.P_REMOTE_PORT)
            return self.set_pending(rd.domid, rd.notify_vcpu(rport), rport)
        if state == L.ECS_IPI:
            return self.set_pending(domid, d.notify_vcpu(port), port)
        if state == L.ECS_UNBOUND:
            return 0  # dropped silently, as Xen does
        return -22

    def send_many(self, domid: int, ports, edges=None) -> tuple[int, int]:
        """Send on each port in turn; stop at the first refused one.
        Returns (number sent, errno of the refusal or 0)."""
        for i, port in enumerate(ports):
            r = self.send(domid, int(port))
            if r < 0:
                return i, -r
            if edges is not None:
                edges[i] = r
        return len(ports), 0

    def raise_virq(self, domid: int, virq: int, vcpu: int) -> int:
        """send_guest_vcpu_virq / send_guest_domain_virq; vcpu is ignored for a non-per-vCPU
        VIRQ, which goes to the port's notify vCPU."""
        d = self.doms[domid]
        per_vcpu = virq in L.VIRQ_PER_VCPU
        port = d.virq_port(vcpu if per_vcpu else 0, virq)
        if not port:
            return 0
        return self.set_pending(domid, vcpu if per_vcpu else d.notify_vcpu(port), port)

    # -- guest side: mask, unmask (Linux) ------------------------------------------------------
    def guest_mask(self, domid: int, port: int) -> None:
        d = self.doms[domid]
        if d.abi == L.ABI_FIFO:
            wi = self._fifo_word(d, port)
            if wi is not None:
                d.u32[wi] = int(d.u32[wi]) | L.FIFO_MASKED
            return
        _, mask = self._bitmaps(d)
        self._test_and_set(d.words, mask + port // d.word_bits, port % d.word_bits)

    def guest_unmask(self, domid: int, port: int) -> int:
        """Linux unmask_evtchn after the XSA-332 series: when the port is pending, let Xen
        unmask it, else clear the mask locally (evtchn_2l_unmask, HVM path, 4d3fe31bd993;
        events_fifo clear_masked_cond, f01337197419)."""
        d = self.doms[domid]
        if d.abi == L.ABI_FIFO:
            wi = self._fifo_word(d, port)
            if wi is None:
                return 0
            w = int(d.u32[wi])
            if not w & L.FIFO_MASKED:
                return 0
            if w & L.FIFO_PENDING:
                return self.hyp_unmask(domid, port)
            # With one process nobody can be inside set_link: a BUSY bit was left by a linker
            # that died there, and the compiled kernels clear it after their bounded spin
            # (fifo_clear_stale_busy); so does this.
            d.u32[wi] = w & ~(L.FIFO_MASKED | L.FIFO_BUSY)
            return 0
        w = d.word_bits
        pend, mask = self._bitmaps(d)
        if d.hdr(L.H_INJECT) == INJ_UNMASK_TEST_FIRST:  # R2: pending tested too early
            pending = d.words[pend + port // w] >> (port % w) & 1
            self._test_and_clear(d.words, mask + port // w, port % w)
        else:
            self._test_and_clear(d.words, mask + port // w, port % w)
            pending = d.words[pend + port // w] >> (port % w) & 1
        if pending:
            self._test_and_set(d.words, mask + port // w, port % w)
            return self.hyp_unmask(domid, port)
        return 0

    # -- guest side: the upcall handler --------------------------------------------------------
    def consume(self, domid: int, vcpu: int, out) -> int:
        """__xen_evtchn_do_upcall: clear upcall_pending, handle events, repeat while it was
        set again. Stops early when `out` is full, leaving the rest for the next call."""
        d = self.doms[domid]
        vi = d.layout.vcpu_info(vcpu) + L.VI_UPCALL_PENDING
        n = 0
        r1 = d.hdr(L.H_INJECT) == INJ_SELECTOR_FIRST and d.abi != L.ABI_FIFO
        while True:
            if d.abi == L.ABI_FIFO:
                d.u8[vi] = 0
                n, full = self._fifo_handle(d, vcpu, out, n)
            elif r1:  # R1: selector swapped first
                words = self._take_selectors(d, vcpu)
                d.u8[vi] = 0
                n, full = self._bitmap_handle(d, vcpu, out, n, words)
            else:
                d.u8[vi] = 0  # the master flag, then the selector
                n, full = self._bitmap_handle(d, vcpu, out, n)
            if full or not d.u8[vi] & 1:
                return n

    def _deliver(self, d, vcpu: int, port: int, out, n: int) -> int:
        """The IRQ layer's ack (clear_evtchn) then the handler: the port is delivered iff this
        call cleared its PENDING bit, so no edge is ever delivered twice."""
        pend, _ = self._bitmaps(d)
        if self._test_and_clear(d.words, pend + port // d.word_bits, port % d.word_bits):
            out[n] = port
            return n + 1
        return n

    def _active(self, d, vcpu: int, word: int) -> int:
        """pending & ~mask & cpu_evtchn_mask[cpu] for one word (active_evtchns)."""
        pend, mask = self._bitmaps(d)
        cpu = d.cpumask_word_index(vcpu, word)
        return int(d.words[pend + word]) & ~int(d.words[mask + word]) & int(d.words[cpu])

    def _bitmap_handle(self, d, vcpu: int, out, n: int, pending_words=None):
        """events_2l.c evtchn_2l_handle_events, generalised to 3l (one more selector level)."""
        w, cap = d.word_bits, len(out)
        timer = d.virq_port(vcpu, L.VIRQ_TIMER)  # the timer is served first
        if timer and n < cap and self._active(d, vcpu, timer // w) >> (timer % w) & 1:
            n = self._deliver(d, vcpu, timer, out, n)
        if pending_words is None:
            pending_words = self._take_selectors(d, vcpu)
        nwords = w if d.abi == L.ABI_2L else w * w
        start_word = d.guest_u32(vcpu, L.G_RESUME_WORD)
        start_bit = d.guest_u32(vcpu, L.G_RESUME_BIT)
        word, i = start_word, 0
        while pending_words:
            cand = pending_words & ~((1 << word) - 1)
            if cand == 0:  # wrap around
                word, i = 0, i + 1
                continue
            word = (cand & -cand).bit_length() - 1
            bits = self._active(d, vcpu, word)
            bit = start_bit if (word == start_word and i == 0) else 0
            while True:
                cand_bits = bits & ~((1 << bit) - 1)
                if not cand_bits:
                    break
                if n == cap:  # out is full: give the rest back
                    self._put_back(d, vcpu, pending_words)
                    return n, True
                bit = (cand_bits & -cand_bits).bit_length() - 1
                n = self._deliver(d, vcpu, word * w + bit, out, n)
                bit = (bit + 1) % w
                d.set_guest_u32(vcpu, L.G_RESUME_BIT, bit)
                d.set_guest_u32(vcpu, L.G_RESUME_WORD, word if bit else (word + 1) % nwords)
                if bit == 0:
                    break
            if word != start_word or i != 0:  # the start word is scanned twice
                pending_words &= ~(1 << word)
            word, i = (word + 1) % nwords, i + 1
        return n, False

    def _take_selectors(self, d, vcpu: int) -> int:
        """xchg the selector(s) to 0; returns the set of pending-array words to scan."""
        w = d.word_bits
        l1 = self._xchg(d.words, self._sel_index(d, vcpu), 0)
        if d.abi == L.ABI_2L:
            return l1
        words, l2base = 0, self._l2_index(d, vcpu)
        while l1:
            j = (l1 & -l1).bit_length() - 1
            l1 &= l1 - 1
            words |= self._xchg(d.words, l2base + j, 0) << (j * w)
        return words

    def _put_back(self, d, vcpu: int, pending_words: int) -> None:
        """Return unscanned selector bits and re-raise the upcall locally (a software resend,
        as a Linux PV guest does), in Xen's order: selectors first, then the flag."""
        w = d.word_bits
        if d.abi == L.ABI_2L:
            idx = self._sel_index(d, vcpu)
            d.words[idx] = int(d.words[idx]) | pending_words
        else:
            l2base, l1 = self._l2_index(d, vcpu), 0
            for j in range(w):
                part = pending_words >> (j * w) & ((1 << w) - 1)
                if part:
                    d.words[l2base + j] = int(d.words[l2base + j]) | part
                    l1 |= 1 << j
            idx = self._sel_index(d, vcpu)
            d.words[idx] = int(d.words[idx]) | l1
        vi = d.layout.vcpu_info(vcpu) + L.VI_UPCALL_PENDING
        d.u8[vi] = int(d.u8[vi]) | 1

    def _fifo_handle(self, d, vcpu: int, out, n: int):
        """events_fifo.c __evtchn_fifo_handle_events: lowest ready priority first, one event
        at a time, READY re-read after every event so a higher priority preempts."""
        cb = d.layout.control_block(vcpu) // 4
        ready = d.guest_u32(vcpu, L.G_LOCAL_READY) | self._xchg(d.u32, cb, 0)
        d.set_guest_u32(vcpu, L.G_LOCAL_READY, 0)
        while ready:
            if n == len(out):
                d.set_guest_u32(vcpu, L.G_LOCAL_READY, ready)
                vi = d.layout.vcpu_info(vcpu) + L.VI_UPCALL_PENDING
                d.u8[vi] = int(d.u8[vi]) | 1
                return n, True
            q = (ready & -ready).bit_length() - 1
            ready, n = self._fifo_consume_one(d, vcpu, q, ready, out, n)
            ready |= self._xchg(d.u32, cb, 0)
        return n, False

    def _fifo_consume_one(self, d, vcpu: int, q: int, ready: int, out, n: int):
        head_slot = L.G_LOCAL_HEAD + 4 * q
        port = d.guest_u32(vcpu, head_slot)
        if port == 0:
            port = int(d.u32[(d.layout.control_block(vcpu) + L.CB_HEAD) // 4 + q])
        wi = self._fifo_word(d, port) if port else None
        if wi is None:  # no valid HEAD: nothing to take
            return ready & ~(1 << q), n
        w = int(d.u32[wi])  # clear_linked
        link_mask = (1 << d.link_bits) - 1
        d.u32[wi] = w & ~(L.FIFO_LINKED | link_mask)
        nxt = w & link_mask
        if nxt == 0:
            ready &= ~(1 << q)
        w = int(d.u32[wi])
        if w & L.FIFO_PENDING and not w & L.FIFO_MASKED:  # masked: dropped, stays PENDING
            d.u32[wi] = w & ~L.FIFO_PENDING
            out[n] = port
            n += 1
        d.set_guest_u32(vcpu, head_slot, nxt)
        return ready, n

    def poll(self, domid: int, vcpu: int, ports, timeout: float | None) -> tuple[int, int]:
        """SCHEDOP_poll (do_poll): (reason, port) with a POLL_* reason, or (-errno, port).
        One process and one thread: once the tests pass nothing can wake us, so honour the
        timeout. The poll_mask state is set and cleared as the compiled kernels do."""
        d = self.doms[domid]
        if len(ports) > L.SCHED_POLL_MAX_PORTS:
            return -22, 0
        d.set_xen_vcpu_u32(vcpu, L.X_POLL_EVTCHN, 0xFFFFFFFF)
        d.set_xen_vcpu_u32(vcpu, L.X_POLL, L.POLL_ACTIVE)
        d.set_hdr(L.H_POLLERS, d.hdr(L.H_POLLERS) + 1)
        try:
            return self._poll_body(d, vcpu, [int(p) for p in ports], timeout)
        finally:
            d.set_xen_vcpu_u32(vcpu, L.X_POLL, L.POLL_IDLE)
            d.set_hdr(L.H_POLLERS, d.hdr(L.H_POLLERS) - 1)
            d.set_xen_vcpu_u32(vcpu, L.X_POLL_EVTCHN, 0)

    def _poll_body(self, d, vcpu: int, ports: list, timeout) -> tuple[int, int]:
        vi = d.layout.vcpu_info(vcpu)
        if d.u8[vi + L.VI_UPCALL_PENDING] & 1 and not d.u8[vi + L.VI_UPCALL_MASK] & 1:
            return L.POLL_UPCALL, 0  # local_events_need_delivery()
        for port in ports:
            if port >= d.hdr(L.H_VALID) or d.state(port) <= L.ECS_RESERVED:
                return -22, port  # EINVAL: invalid or not in use
            if self.is_pending(d.domid, port):
                return L.POLL_PENDING, port
        if len(ports) == 1:
            d.set_xen_vcpu_u32(vcpu, L.X_POLL_EVTCHN, ports[0])
        if timeout is None:
            while True:
                time.sleep(0.05)
        time.sleep(max(0.0, timeout))
        return L.POLL_TIMEOUT, 0

    def wait(self, domid: int, vcpu: int, timeout: float | None, spin_ns: int = 0) -> bool:
        """One process: nothing else can raise an upcall while we sleep, so just honour the
        timeout (in slices, so Ctrl-C is seen); spin_ns changes nothing here (no waiter
        slots: nothing to register or to spare the sender)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.upcall_pending(domid, vcpu):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(min(0.01, left) if left is not None else 0.01)
        return True
