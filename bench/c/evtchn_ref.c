/* evtchn_ref: the C yardstick for evtchn's benchmark (bench/cases.py, case stream1x1).
 *
 * It attaches to the domains of a live evtchn host (/dev/shm/<host>-d<domid>, created, set up and
 * bound by the Python benchmark) and runs, on the same memory, the same steps as evtchn's kernels
 * (evtchn/reference.py's order, with the atomics and locks of evtchn/_core.pyx):
 *
 *   sender process   for each port of a batch, EVTCHNOP_send on the sender's local port: take its
 *                    channel lock, read state and peer, set_pending on the peer: FIFO (lastq, queue
 *                    lock(s) in address order, PENDING, LINKED, old tail, set_link with BUSY
 *                    retries, HEAD, tail, unlock, READY, upcall flag, kick only a blocked vCPU) or
 *                    2-level (pending, selector, upcall flag, kick); then unlock. Flow control:
 *                    a batch starts only while at most --window events are in flight.
 *   vCPU process     the upcall handler under the vCPU's handler lock (consume) into a buffer of
 *                    --cap ports; when a call delivers nothing, poll the upcall flag for up to
 *                    --spin-ns, then block on the vCPU's kick futex (evtchn's wait()).
 *
 * Both start at a common CLOCK_MONOTONIC instant; the sender stops after --duration; the vCPU
 * drains and stops. Rate = delivered / (last delivery - start). With --isolated one process
 * alternates a batch of sends and the consume calls that drain it (the kernels' cost per event
 * without any cross-CPU traffic).
 *
 * Offsets: constants come from layout.h, generated from evtchn/layout.py at build time
 * (bench/c/gen_layout.py); region offsets are read from each domain's header. Build and run
 * (python -m bench does both):
 *
 *   python bench/c/gen_layout.py BUILD && cc -O2 -I BUILD -o BUILD/evtchn_ref bench/c/evtchn_ref.c
 *   BUILD/evtchn_ref --host evtchn-123-abcd --sender 1 --receiver 0 --vcpu 0 --ports 1-1024 \
 *                    --batch 1024 --window 1024 --cap 4096 --spin-ns 50000 --duration 1.0
 *
 * With --handoff busy|idle (no host needed) it measures the floor under evtchn's send-to-handler
 * latency instead (bench/latency.py): two processes on a shared anonymous page, one event at a
 * time; the sender stores a CLOCK_MONOTONIC timestamp and bumps a sequence word; the receiver
 * either spins on that word (busy) or sleeps on it in FUTEX_WAIT and is woken by FUTEX_WAKE
 * (idle: the sender sends only once the receiver said it is going to sleep, and then waits
 * --gap-ns more so it is asleep); the receiver records now - timestamp:
 *
 *   BUILD/evtchn_ref --handoff idle --count 2000 --gap-ns 100000 --pin 0,1
 *
 * Prints one JSON object (counts, nanoseconds) on stdout; exit status 0 unless something failed
 * (bad arguments, mapping, a child that crashed or overran its time limit).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <linux/futex.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "layout.h"

_Static_assert(__atomic_always_lock_free(1, 0), "needs lock-free 1-byte atomics");
_Static_assert(__atomic_always_lock_free(4, 0), "needs lock-free 4-byte atomics");
_Static_assert(__atomic_always_lock_free(8, 0), "needs lock-free 8-byte atomics");

#define SEQ __ATOMIC_SEQ_CST
#define ACQ __ATOMIC_ACQUIRE
#define REL __ATOMIC_RELEASE
#define RLX __ATOMIC_RELAXED

static const uint32_t PENDING = (uint32_t)EVL_FIFO_PENDING;
static const uint32_t MASKED = (uint32_t)EVL_FIFO_MASKED;
static const uint32_t LINKED = (uint32_t)EVL_FIFO_LINKED;
static const uint32_t BUSY = (uint32_t)EVL_FIFO_BUSY;

#define MAX_DOMS 64

/* ---------------------------------------------------------------------------------------- */
/* time, futex, lock                                                                         */

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_until(int64_t t) {
    struct timespec ts = {(time_t)(t / 1000000000), (long)(t % 1000000000)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Shared (not FUTEX_PRIVATE) futexes: the waiter and the waker are different processes. */
static inline int futex_wait(uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts = {(time_t)(timeout_ns / 1000000000), (long)(timeout_ns % 1000000000)};
    if (syscall(SYS_futex, addr, FUTEX_WAIT, expected, &ts, NULL, 0) == 0) return 0;
    return errno == EAGAIN ? 0 : errno;
}

static inline void futex_wake(uint32_t *addr) {
    syscall(SYS_futex, addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* evtchn's lock word (evtchn/layout.py, "Lock words"): a u64 owner id, 0 when free: low 32 bits
 * the thread's tid (bit 31: a read-type channel-lock holder), high 32 bits its start time in
 * clock ticks (/proc/<tid>/stat field 22, 31 bits). Same protocol and spin policy as
 * evtchn/_atomics.pxd, so a Python control-plane operation racing the benchmark would exclude
 * us and we it. */
static int proc_stat(uint32_t tid, char *state, uint64_t *start) {  /* 1 ok, -1 gone, 0 ? */
    char path[40], buf[512], *p;
    snprintf(path, sizeof path, "/proc/%u/stat", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return (errno == ENOENT || errno == ESRCH) ? -1 : 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = 0;
    if ((p = strrchr(buf, ')')) == NULL || p[1] != ' ') return 0;
    *state = p[2];
    p += 2;
    for (int field = 3; field < 22; field++)
        if ((p = strchr(p, ' ')) == NULL) return 0; else p++;
    *start = strtoull(p, NULL, 10);
    return 1;
}

static uint64_t self_owner(void) {            /* this (single-threaded) process's owner id */
    uint32_t tid = (uint32_t)syscall(SYS_gettid);
    char state;
    uint64_t start = 0;
    proc_stat(tid, &state, &start);
    return ((start & EVL_OWNER_START_MASK) << 32) | (tid & EVL_OWNER_TID_MASK);
}

static int owner_dead(uint64_t owner) {
    char state = 0;
    uint64_t start = 0;
    int r = proc_stat((uint32_t)(owner & EVL_OWNER_TID_MASK), &state, &start);
    if (r <= 0) return r < 0;
    return state == 'Z' || state == 'X' || (start & EVL_OWNER_START_MASK) != (owner >> 32);
}

static inline void lock_acquire(uint64_t *w, uint64_t me) {
    unsigned spins = 0, yields = 0;
    for (;;) {
        uint64_t owner = __atomic_load_n(w, RLX);
        if (owner == 0) {
            if (__atomic_compare_exchange_n(w, &owner, me, 0, ACQ, RLX)) return;
            continue;
        }
        if (spins < EVL_LOCK_SPINS) {
            spins++;
            cpu_relax();
            continue;
        }
        sched_yield();
        if (++yields % EVL_LOCK_YIELDS_PER_CHECK == 0 && owner_dead(owner) &&
            __atomic_compare_exchange_n(w, &owner, me, 0, ACQ, RLX))
            return;                                     /* the owner died holding it */
    }
}

static inline void lock_release(uint64_t *w) { __atomic_store_n(w, 0, REL); }

/* ---------------------------------------------------------------------------------------- */
/* a mapped domain                                                                           */

typedef struct {
    uint8_t *base;
    size_t size;
    uint32_t domid, abi, vcpus, word_bits, link_bits, link_mask;
    uint64_t shared_info, vcpu_info_ext, control, ports, xen_vcpu, guest_vcpu, cpumask,
        event_array, cpumask_bytes;
} dom_t;

static dom_t *doms[MAX_DOMS];

static inline uint32_t *U32(const dom_t *d, uint64_t off) { return (uint32_t *)(d->base + off); }
static inline uint64_t *U64(const dom_t *d, uint64_t off) { return (uint64_t *)(d->base + off); }
static inline uint32_t hdr(const dom_t *d, uint64_t off) {
    return __atomic_load_n(U32(d, off), ACQ);
}

/* The DomainLayout accessors of evtchn/layout.py. */
static inline uint64_t port_off(const dom_t *d, uint32_t port) {
    return d->ports + (uint64_t)EVL_PORT_SIZE * port;
}
static inline uint64_t vcpu_info_off(const dom_t *d, uint32_t v) {
    return v < EVL_LEGACY_MAX_VCPUS
               ? d->shared_info + (uint64_t)EVL_VCPU_INFO_SIZE * v
               : d->vcpu_info_ext + (uint64_t)EVL_VCPU_INFO_SIZE * (v - EVL_LEGACY_MAX_VCPUS);
}
static inline uint64_t control_off(const dom_t *d, uint32_t v) {
    return d->control + (uint64_t)EVL_PAGE_SIZE * v;
}
static inline uint64_t xen_vcpu_off(const dom_t *d, uint32_t v) {
    return d->xen_vcpu + (uint64_t)EVL_XEN_VCPU_SIZE * v;
}
static inline uint64_t guest_vcpu_off(const dom_t *d, uint32_t v) {
    return d->guest_vcpu + (uint64_t)EVL_GUEST_VCPU_SIZE * v;
}
static inline uint64_t queue_off(const dom_t *d, uint32_t v, uint32_t prio) {
    return xen_vcpu_off(d, v) + EVL_X_QUEUES + (uint64_t)EVL_QUEUE_SIZE * prio;
}
static inline uint32_t *event_word(const dom_t *d, uint32_t port) {
    return U32(d, d->event_array + 4 * (uint64_t)port);
}
static inline uint8_t *upcall_flag(const dom_t *d, uint32_t v) {
    return d->base + vcpu_info_off(d, v) + EVL_VI_UPCALL_PENDING;
}

static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "evtchn_ref: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return -1;
}

static dom_t *map_domain(const char *host, uint32_t domid) {
    char path[512];
    snprintf(path, sizeof path, "/dev/shm/%s-d%u", host, domid);
    int fd = open(path, O_RDWR);
    if (fd < 0) {
        fail("cannot open %s", path);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_size < EVL_PAGE_SIZE) {
        close(fd);
        fail("%s is not an evtchn domain segment", path);
        return NULL;
    }
    uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        fail("cannot map %s", path);
        return NULL;
    }
    dom_t *d = calloc(1, sizeof *d);
    d->base = base;
    d->size = (size_t)st.st_size;
    if (__atomic_load_n(U64(d, EVL_H_MAGIC), ACQ) != EVL_DOMAIN_MAGIC ||
        hdr(d, EVL_H_VERSION) != EVL_LAYOUT_VERSION) {
        fail("%s: bad magic or layout version (rebuild the benchmark's C program)", path);
        return NULL;
    }
    d->domid = hdr(d, EVL_H_DOMID);
    d->abi = hdr(d, EVL_H_ABI);
    d->vcpus = hdr(d, EVL_H_VCPUS);
    d->word_bits = hdr(d, EVL_H_WORD_BITS);
    d->link_bits = hdr(d, EVL_H_LINK_BITS);
    d->link_mask = (uint32_t)((1u << d->link_bits) - 1);
    d->shared_info = *U64(d, EVL_H_REGION_SHARED_INFO);
    d->vcpu_info_ext = *U64(d, EVL_H_REGION_VCPU_INFO_EXT);
    d->control = *U64(d, EVL_H_REGION_CONTROL);
    d->ports = *U64(d, EVL_H_REGION_PORTS);
    d->xen_vcpu = *U64(d, EVL_H_REGION_XEN_VCPU);
    d->guest_vcpu = *U64(d, EVL_H_REGION_GUEST_VCPU);
    d->cpumask = *U64(d, EVL_H_REGION_CPUMASK);
    d->event_array = *U64(d, EVL_H_REGION_EVENT_ARRAY);
    d->cpumask_bytes = *U64(d, EVL_H_CPUMASK_BYTES);
    if (*U64(d, EVL_H_SEGMENT_SIZE) != d->size) {
        fail("%s: size differs from the size in its header", path);
        return NULL;
    }
    if (d->abi == EVL_ABI_3L) {
        fail("%s: the 3l ABI is not part of this benchmark", path);
        return NULL;
    }
    if (d->abi == EVL_ABI_2L && d->word_bits != 64) {
        fail("%s: only word_bits=64 is implemented for 2l", path);
        return NULL;
    }
    return d;
}

/* ---------------------------------------------------------------------------------------- */
/* statistics, in the anonymous shared page the parent reads after the children exit        */

typedef struct {
    volatile int64_t start_ns;       /* both children start at this CLOCK_MONOTONIC time */
    volatile uint32_t ready;         /* children that mapped everything and are waiting */
    volatile uint32_t sender_done;   /* set (release) after the sender's last batch */
    char pad[64];
    volatile int64_t progress;       /* delivered so far, published by the consumer */
    char pad2[64];
    int64_t sent, edges, refused, batches, kicks, lost_lockq, link_gaveup, sender_end_ns;
    int64_t delivered, calls, nonempty_calls, full_calls, waits, sleeps, last_ns, consumer_end_ns;
    int64_t consumer_kicks;
} ctl_t;

static ctl_t *ctl;

/* ---------------------------------------------------------------------------------------- */
/* hypervisor side                                                                           */

/* vcpu_mark_events_pending: set the upcall flag; kick (futex) only a vCPU blocked in wait. */
static inline void mark_upcall_pending(dom_t *d, uint32_t v, int64_t *kicks) {
    if (__atomic_fetch_or(upcall_flag(d, v), 1, SEQ) & 1) return;
    uint64_t x = xen_vcpu_off(d, v);
    __atomic_thread_fence(SEQ);                 /* Dekker with wait: flag set, then WAITERS */
    if (__atomic_load_n(U32(d, x + EVL_X_WAITERS), SEQ)) {
        __atomic_fetch_add(U32(d, x + EVL_X_KICK), 1, SEQ);
        futex_wake(U32(d, x + EVL_X_KICK));
        ++*kicks;
    }
}

/* evtchn_check_pollers after a PENDING 0 -> 1 edge: wake the vCPUs polling this port (or
 * several ports). Nobody polls in the benchmark, so its cost is the seq_cst load of the pollers
 * count that evtchn pays too (Xen: bitmap_empty(poll_mask)). */
static inline void check_pollers(dom_t *d, uint32_t port) {
    if (!__atomic_load_n(U32(d, EVL_H_POLLERS), SEQ)) return;
    for (uint32_t v = 0; v < d->vcpus; v++) {
        uint64_t x = xen_vcpu_off(d, v);
        uint32_t expected = EVL_POLL_ACTIVE;
        if (__atomic_load_n(U32(d, x + EVL_X_POLL), ACQ) != EVL_POLL_ACTIVE) continue;
        int32_t pe = (int32_t)__atomic_load_n(U32(d, x + EVL_X_POLL_EVTCHN), ACQ);
        if (pe > 0 && (uint32_t)pe != port) continue;
        if (__atomic_compare_exchange_n(U32(d, x + EVL_X_POLL), &expected,
                                        (uint32_t)EVL_POLL_WOKEN | port, 0, SEQ, SEQ)) {
            __atomic_fetch_sub(U32(d, EVL_H_POLLERS), 1, SEQ);
            __atomic_store_n(U32(d, x + EVL_X_POLL_EVTCHN), 0, REL);
            __atomic_fetch_add(U32(d, x + EVL_X_KICK), 1, SEQ);
            futex_wake(U32(d, x + EVL_X_KICK));
        }
    }
}

/* event_2l.c set_pending: pending bit, then (unmasked) selector bit, then the upcall flag. */
static inline int l2_set_pending(dom_t *d, uint32_t v, uint32_t port, int64_t *kicks) {
    uint64_t *pend = U64(d, d->shared_info + EVL_SI_PENDING);
    uint64_t *mask = U64(d, d->shared_info + EVL_SI_MASK_64);
    uint64_t bit = 1ULL << (port % 64);
    uint32_t word = port / 64;
    if (__atomic_fetch_or(&pend[word], bit, SEQ) & bit) return 0;   /* coalesced */
    if (!(__atomic_load_n(&mask[word], ACQ) & bit)) {
        uint64_t *sel = U64(d, vcpu_info_off(d, v) + EVL_VI_PENDING_SEL_64);
        uint64_t sbit = 1ULL << word;
        if (!(__atomic_fetch_or(sel, sbit, SEQ) & sbit)) mark_upcall_pending(d, v, kicks);
    }
    check_pollers(d, port);
    return 1;
}

/* evtchn_fifo_set_link: link the tail to `port` iff the tail is still LINKED. 1: linked,
 * 0: the tail was consumed (caller writes HEAD), -1: the tail word changed under the cmpxchg. */
static inline int try_set_link(uint32_t *tw, uint32_t *w, uint32_t port, uint32_t link_mask) {
    if (!(*w & LINKED)) return 0;
    uint32_t nw = (*w & ~(BUSY | link_mask)) | port;
    return __atomic_compare_exchange_n(tw, w, nw, 0, SEQ, SEQ) ? 1 : -1;
}

static inline int fifo_set_link(dom_t *d, uint32_t tail, uint32_t port) {
    uint32_t *tw = event_word(d, tail);
    uint32_t w = __atomic_load_n(tw, ACQ);
    int r = try_set_link(tw, &w, port, d->link_mask);
    if (r >= 0) return r;
    __atomic_fetch_or(tw, BUSY, SEQ);           /* the guest cannot clear MASKED meanwhile */
    w = __atomic_load_n(tw, ACQ);
    for (int i = 0; i < EVL_FIFO_LINK_RETRIES; i++) {
        r = try_set_link(tw, &w, port, d->link_mask);
        if (r == 1) return 1;                   /* the new value has BUSY clear */
        if (r == 0) {
            __atomic_fetch_and(tw, ~BUSY, SEQ);
            return 0;
        }
    }
    __atomic_fetch_and(tw, ~BUSY, SEQ);
    ctl->link_gaveup++;
    return 1;                                   /* misbehaving guest: treated as linked */
}

/* event_fifo.c evtchn_fifo_set_pending (after Xen 71ac522909). */
static inline int fifo_set_pending(dom_t *d, uint32_t v, uint32_t port, uint64_t me,
                                   int64_t *kicks) {
    uint8_t *pe = d->base + port_off(d, port);
    if (port >= hdr(d, EVL_H_ARRAY_PAGES) * (uint32_t)EVL_FIFO_WORDS_PER_PAGE) {
        __atomic_store_n(pe + EVL_P_PENDING, 1, REL);   /* replayed when the page is added */
        return 0;
    }
    uint32_t *word = event_word(d, port);
    uint32_t *plastq = (uint32_t *)(pe + EVL_P_LASTQ);
    uint32_t lastq = 0, q_prio = 0;
    uint64_t *qlock = NULL, *oqlock = NULL;
    uint64_t q = 0, oq = 0;
    int tries;
    for (tries = 0; tries < EVL_FIFO_LOCK_TRIES; tries++) {
        lastq = __atomic_load_n(plastq, ACQ);
        q_prio = __atomic_load_n(pe + EVL_P_PRIORITY, ACQ);
        q = queue_off(d, v, q_prio);
        oq = queue_off(d, lastq >> 16, lastq & 0xFF);
        qlock = U64(d, q + EVL_Q_LOCK);
        oqlock = U64(d, oq + EVL_Q_LOCK);
        if (q == oq) {
            lock_acquire(qlock, me);
        } else if (q < oq) {
            lock_acquire(qlock, me);
            lock_acquire(oqlock, me);
        } else {
            lock_acquire(oqlock, me);
            lock_acquire(qlock, me);
        }
        if (lastq == __atomic_load_n(plastq, ACQ) &&
            q_prio == __atomic_load_n(pe + EVL_P_PRIORITY, ACQ))
            break;
        if (q != oq) lock_release(oqlock);
        lock_release(qlock);
    }
    if (tries == EVL_FIFO_LOCK_TRIES) {         /* "lost event (too many queue changes)" */
        ctl->lost_lockq++;
        return 0;
    }
    int first = !(__atomic_fetch_or(word, PENDING, SEQ) & PENDING);
    int linked = 1;
    if (!(__atomic_load_n(word, ACQ) & MASKED) &&
        !(__atomic_fetch_or(word, LINKED, SEQ) & LINKED)) {
        uint32_t *otail = U32(d, oq + EVL_Q_TAIL), *tail = U32(d, q + EVL_Q_TAIL);
        if (__atomic_load_n(otail, ACQ) == port)  /* an old tail: that queue is now empty */
            __atomic_store_n(otail, 0, REL);
        if (oq != q) {
            __atomic_store_n(plastq, (v << 16) | q_prio, REL);
            lock_release(oqlock);
            oq = q;
        }
        linked = 0;
        uint32_t t = __atomic_load_n(tail, ACQ);
        if (t) linked = fifo_set_link(d, t, port);
        if (!linked)                            /* the queue was empty: new HEAD */
            __atomic_store_n(U32(d, control_off(d, v) + EVL_CB_HEAD + 4 * q_prio), port, REL);
        __atomic_store_n(tail, port, REL);
    }
    if (oq != q) lock_release(oqlock);
    lock_release(qlock);
    if (!linked) {
        uint32_t rb = 1u << q_prio;
        if (!(__atomic_fetch_or(U32(d, control_off(d, v) + EVL_CB_READY), rb, SEQ) & rb))
            mark_upcall_pending(d, v, kicks);
    }
    if (first) check_pollers(d, port);
    return first;
}

static inline int set_pending(dom_t *d, uint32_t v, uint32_t port, uint64_t me, int64_t *kicks) {
    if (__atomic_load_n(d->base + port_off(d, port) + EVL_P_STATE, ACQ) <= EVL_ECS_RESERVED)
        return 0;                               /* evtchn_usable() */
    if (d->abi == EVL_ABI_FIFO) return fifo_set_pending(d, v, port, me, kicks);
    return l2_set_pending(d, v, port, kicks);
}

/* EVTCHNOP_send: the sender's channel lock around reading its state and peer. 1: new edge,
 * 0: coalesced or dropped, < 0: -errno. */
static inline int send(dom_t *ld, uint32_t lport, uint64_t me, int64_t *kicks) {
    if (lport >= hdr(ld, EVL_H_VALID)) return -EINVAL;
    uint8_t *pe = ld->base + port_off(ld, lport);
    uint64_t *lock = (uint64_t *)(pe + EVL_P_LOCK);
    int r;
    lock_acquire(lock, me | (uint64_t)EVL_CHANNEL_LOCK_READER);   /* read-type, as evtchn */
    uint8_t state = __atomic_load_n(pe + EVL_P_STATE, ACQ);
    if (state == EVL_ECS_INTERDOMAIN) {
        uint32_t rdom = __atomic_load_n((uint16_t *)(pe + EVL_P_REMOTE_DOM), ACQ);
        uint32_t rport = __atomic_load_n((uint32_t *)(pe + EVL_P_REMOTE_PORT), ACQ);
        dom_t *rd = rdom < MAX_DOMS ? doms[rdom] : NULL;
        if (rd == NULL) {
            r = -ESRCH;                         /* a peer this program did not map */
        } else {
            uint8_t *rpe = rd->base + port_off(rd, rport);
            uint32_t v = __atomic_load_n((uint16_t *)(rpe + EVL_P_NOTIFY_VCPU), ACQ);
            r = set_pending(rd, v, rport, me, kicks);
        }
    } else if (state == EVL_ECS_IPI) {
        uint32_t v = __atomic_load_n((uint16_t *)(pe + EVL_P_NOTIFY_VCPU), ACQ);
        r = set_pending(ld, v, lport, me, kicks);
    } else if (state == EVL_ECS_UNBOUND) {
        r = 0;
    } else {
        r = -EINVAL;
    }
    lock_release(lock);
    return r;
}

/* ---------------------------------------------------------------------------------------- */
/* guest side: the upcall handler                                                           */

/* 2l: the IRQ ack clears PENDING; the port is delivered iff this call cleared it. */
static inline uint32_t l2_deliver(dom_t *d, uint32_t port, uint32_t *out, uint32_t n) {
    uint64_t *pend = U64(d, d->shared_info + EVL_SI_PENDING);
    uint64_t bit = 1ULL << (port % 64);
    if (__atomic_fetch_and(&pend[port / 64], ~bit, SEQ) & bit) out[n++] = port;
    return n;
}

static inline uint64_t l2_active(dom_t *d, uint32_t v, uint32_t word) {
    uint64_t *pend = U64(d, d->shared_info + EVL_SI_PENDING);
    uint64_t *mask = U64(d, d->shared_info + EVL_SI_MASK_64);
    uint64_t *cpu = U64(d, d->cpumask + d->cpumask_bytes * v);
    return __atomic_load_n(&pend[word], ACQ) & ~__atomic_load_n(&mask[word], ACQ) &
           __atomic_load_n(&cpu[word], ACQ);
}

/* events_2l.c evtchn_2l_handle_events: timer first, xchg the selector, rotating scan. */
static uint32_t l2_handle(dom_t *d, uint32_t v, uint32_t *out, uint32_t n, uint32_t cap,
                          int *full) {
    const uint32_t w = 64, nwords = 64;
    uint64_t virq = xen_vcpu_off(d, v) + EVL_X_VIRQ + 4 * EVL_VIRQ_TIMER;
    uint32_t timer = __atomic_load_n(U32(d, virq), ACQ);
    if (timer && n < cap && (l2_active(d, v, timer / w) >> (timer % w) & 1))
        n = l2_deliver(d, timer, out, n);
    uint64_t *sel = U64(d, vcpu_info_off(d, v) + EVL_VI_PENDING_SEL_64);
    uint64_t pending_words = __atomic_exchange_n(sel, 0, SEQ);
    uint32_t *rword = U32(d, guest_vcpu_off(d, v) + EVL_G_RESUME_WORD);
    uint32_t *rbit = U32(d, guest_vcpu_off(d, v) + EVL_G_RESUME_BIT);
    uint32_t start_word = __atomic_load_n(rword, RLX), start_bit = __atomic_load_n(rbit, RLX);
    uint32_t word = start_word, i = 0;
    while (pending_words) {
        uint64_t cand = pending_words & ~((1ULL << word) - 1);
        if (cand == 0) {                        /* wrap around */
            word = 0;
            i++;
            continue;
        }
        word = (uint32_t)__builtin_ctzll(cand);
        uint64_t bits = l2_active(d, v, word);
        uint32_t bit = (word == start_word && i == 0) ? start_bit : 0;
        for (;;) {
            uint64_t cand_bits = bits & ~((1ULL << bit) - 1);
            if (!cand_bits) break;
            if (n == cap) {                     /* out is full: give the rest back */
                __atomic_fetch_or(sel, pending_words, SEQ);
                mark_upcall_pending(d, v, &ctl->consumer_kicks);
                *full = 1;
                return n;
            }
            bit = (uint32_t)__builtin_ctzll(cand_bits);
            n = l2_deliver(d, word * w + bit, out, n);
            bit = (bit + 1) % w;
            __atomic_store_n(rbit, bit, RLX);
            __atomic_store_n(rword, bit ? word : (word + 1) % nwords, RLX);
            if (bit == 0) break;
        }
        if (word != start_word || i != 0)       /* the start word is scanned twice */
            pending_words &= ~(1ULL << word);
        word = (word + 1) % nwords;
        i++;
    }
    return n;
}

/* events_fifo.c consume_one: clear_linked (cmpxchg loop), deliver iff PENDING and not MASKED
 * and our atomic clear of PENDING saw it set. */
static inline uint32_t fifo_consume_one(dom_t *d, uint32_t v, uint32_t q, uint32_t *ready,
                                        uint32_t *out, uint32_t n) {
    uint32_t *head_slot = U32(d, guest_vcpu_off(d, v) + EVL_G_LOCAL_HEAD + 4 * q);
    uint32_t port = __atomic_load_n(head_slot, RLX);
    if (port == 0) port = __atomic_load_n(U32(d, control_off(d, v) + EVL_CB_HEAD + 4 * q), ACQ);
    if (port == 0 || port >= hdr(d, EVL_H_ARRAY_PAGES) * (uint32_t)EVL_FIFO_WORDS_PER_PAGE) {
        *ready &= ~(1u << q);                   /* no valid HEAD: nothing to take */
        return n;
    }
    uint32_t *word = event_word(d, port);
    uint32_t w = __atomic_load_n(word, ACQ);
    while (!__atomic_compare_exchange_n(word, &w, w & ~(LINKED | d->link_mask), 0, SEQ, SEQ)) {
    }
    uint32_t next = w & d->link_mask;
    if (next == 0) *ready &= ~(1u << q);
    w = __atomic_load_n(word, ACQ);
    if ((w & PENDING) && !(w & MASKED) && (__atomic_fetch_and(word, ~PENDING, SEQ) & PENDING))
        out[n++] = port;
    __atomic_store_n(head_slot, next, RLX);
    return n;
}

/* events_fifo.c __evtchn_fifo_handle_events: lowest ready queue first, READY re-read after
 * every event. */
static uint32_t fifo_handle(dom_t *d, uint32_t v, uint32_t *out, uint32_t n, uint32_t cap,
                            int *full) {
    uint32_t *cb_ready = U32(d, control_off(d, v) + EVL_CB_READY);
    uint32_t *local_ready = U32(d, guest_vcpu_off(d, v) + EVL_G_LOCAL_READY);
    uint32_t ready = __atomic_load_n(local_ready, RLX) | __atomic_exchange_n(cb_ready, 0, SEQ);
    __atomic_store_n(local_ready, 0, RLX);
    while (ready) {
        if (n == cap) {
            __atomic_store_n(local_ready, ready, RLX);
            mark_upcall_pending(d, v, &ctl->consumer_kicks);
            *full = 1;
            return n;
        }
        uint32_t q = (uint32_t)__builtin_ctz(ready);
        n = fifo_consume_one(d, v, q, &ready, out, n);
        ready |= __atomic_exchange_n(cb_ready, 0, SEQ);
    }
    return n;
}

/* __xen_evtchn_do_upcall under the vCPU's handler lock: clear the upcall flag (xchg), handle
 * events, repeat while it was set again; stop early when `out` is full. */
static uint32_t consume(dom_t *d, uint32_t v, uint32_t *out, uint32_t cap, uint64_t me) {
    uint8_t *flag = upcall_flag(d, v);
    uint64_t *hlock = U64(d, guest_vcpu_off(d, v) + EVL_G_HANDLER_LOCK);
    uint32_t n = 0;
    lock_acquire(hlock, me);
    for (;;) {
        int full = 0;
        __atomic_exchange_n(flag, 0, SEQ);
        if (d->abi == EVL_ABI_FIFO)
            n = fifo_handle(d, v, out, n, cap, &full);
        else
            n = l2_handle(d, v, out, n, cap, &full);
        if (full || !(__atomic_load_n(flag, ACQ) & 1)) break;
    }
    lock_release(hlock);
    return n;
}

/* A halted vCPU: sleep on the kick futex until the upcall flag is set. 1: upcall, 0: timeout.
 * Registered as evtchn's wait() does: a waiter slot (CAS 0 -> owner id), then its bit in the
 * bitmap that kicks read; left in the opposite order. */
static int wait_upcall(dom_t *d, uint32_t v, int64_t timeout_ns, uint64_t me) {
    uint64_t x = xen_vcpu_off(d, v);
    uint32_t *waiters = U32(d, x + EVL_X_WAITERS), *kick = U32(d, x + EVL_X_KICK);
    uint8_t *flag = upcall_flag(d, v);
    if (__atomic_load_n(flag, ACQ) & 1) return 1;
    int64_t deadline = now_ns() + timeout_ns;
    int r = 0, slot;
    for (slot = 0; slot < EVL_WAITER_SLOTS; slot++) {
        uint64_t free_ = 0;
        if (__atomic_compare_exchange_n(U64(d, x + EVL_X_WAITER + 8 * slot), &free_, me, 0,
                                        SEQ, SEQ))
            break;
    }
    if (slot == EVL_WAITER_SLOTS) {             /* all taken: poll the flag, as evtchn does */
        struct timespec ts = {0, EVL_WAIT_FALLBACK_NS};
        nanosleep(&ts, NULL);
        return __atomic_load_n(flag, ACQ) & 1;
    }
    __atomic_fetch_or(waiters, 1u << slot, SEQ);
    for (;;) {
        uint32_t seen = __atomic_load_n(kick, SEQ);
        __atomic_thread_fence(SEQ);             /* Dekker with kick: bit set, then the flag */
        if (__atomic_load_n(flag, SEQ) & 1) {
            r = 1;
            break;
        }
        int64_t left = deadline - now_ns();
        if (left <= 0) break;
        ctl->sleeps++;
        futex_wait(kick, seen, left);
    }
    __atomic_fetch_and(waiters, ~(1u << slot), SEQ);
    __atomic_store_n(U64(d, x + EVL_X_WAITER + 8 * slot), 0, REL);
    return r;
}

/* The benchmark's idle policy before it blocks: poll the upcall flag for up to spin_ns. */
static int poll_upcall(dom_t *d, uint32_t v, int64_t spin_ns) {
    uint8_t *flag = upcall_flag(d, v);
    int64_t end = now_ns() + spin_ns;
    do {
        for (int i = 0; i < 64; i++) {
            if (__atomic_load_n(flag, ACQ) & 1) return 1;
            cpu_relax();
        }
    } while (now_ns() < end);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* the two processes                                                                         */

typedef struct {
    const char *host;
    uint32_t sender, receiver, vcpu, batch, cap, nports, window;
    uint32_t *ports;
    double duration, wait_timeout;
    int64_t spin_ns;
    int sender_cpu, vcpu_cpu;                   /* -1: not pinned */
} args_t;

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) fail("cannot pin to cpu %d", cpu);
}

static void run_sender(const args_t *a) {
    dom_t *ld = doms[a->sender];
    pin(a->sender_cpu);
    uint64_t me = self_owner();
    int64_t sent = 0, edges = 0, refused = 0, batches = 0, kicks = 0;
    __atomic_fetch_add(&ctl->ready, 1, SEQ);
    while (__atomic_load_n(&ctl->start_ns, ACQ) == 0) cpu_relax();
    int64_t t0 = ctl->start_ns, deadline = t0 + (int64_t)(a->duration * 1e9);
    sleep_until(t0);
    uint32_t k = 0;                             /* next port index: batches walk the list */
    while (now_ns() < deadline) {
        if (a->window) {                        /* flow control: at most `window` in flight */
            while (edges + a->batch - __atomic_load_n(&ctl->progress, ACQ) > a->window &&
                   now_ns() < deadline)
                cpu_relax();
            if (now_ns() >= deadline) break;
        }
        for (uint32_t i = 0; i < a->batch; i++) {
            int r = send(ld, a->ports[k], me, &kicks);
            if (++k == a->nports) k = 0;
            if (r < 0) {
                refused++;
                continue;
            }
            edges += r;
        }
        sent += a->batch;
        batches++;
    }
    ctl->sent = sent;
    ctl->edges = edges;
    ctl->refused = refused;
    ctl->batches = batches;
    ctl->kicks = kicks;
    ctl->sender_end_ns = now_ns();
    __atomic_store_n(&ctl->sender_done, 1, SEQ);
}

static void run_consumer(const args_t *a) {
    dom_t *d = doms[a->receiver];
    uint64_t me = self_owner();
    pin(a->vcpu_cpu);
    uint32_t *buf = malloc(sizeof(uint32_t) * a->cap);
    int64_t delivered = 0, calls = 0, nonempty = 0, fulls = 0, waits = 0, last = 0;
    int64_t timeout = (int64_t)(a->wait_timeout * 1e9);
    int final = 0;
    __atomic_fetch_add(&ctl->ready, 1, SEQ);
    while (__atomic_load_n(&ctl->start_ns, ACQ) == 0) cpu_relax();
    int64_t t0 = ctl->start_ns;
    sleep_until(t0);
    last = t0;
    for (;;) {
        uint32_t n = consume(d, a->vcpu, buf, a->cap, me);
        calls++;
        if (n) {
            delivered += n;
            __atomic_store_n(&ctl->progress, delivered, REL);
            nonempty++;
            last = now_ns();
            if (n == a->cap) {
                fulls++;
                continue;
            }
        }
        if (final) break;                       /* drained after the sender finished */
        if (n) continue;
        if (__atomic_load_n(&ctl->sender_done, SEQ)) {
            final = 1;                          /* one more pass sees every last event */
            continue;
        }
        if (a->spin_ns > 0 && poll_upcall(d, a->vcpu, a->spin_ns)) continue;
        waits++;
        wait_upcall(d, a->vcpu, timeout, me);
    }
    ctl->delivered = delivered;
    ctl->calls = calls;
    ctl->nonempty_calls = nonempty;
    ctl->full_calls = fulls;
    ctl->waits = waits;
    ctl->last_ns = last;
    ctl->consumer_end_ns = now_ns();
    free(buf);
}

static int64_t left_pending(const args_t *a);

/* --isolated: one process alternates a batch of sends and the consume calls that drain it, so
 * nothing races and no cache line moves between CPUs: the kernels' own cost per event. */
static int run_isolated(const args_t *a) {
    dom_t *ld = doms[a->sender], *d = doms[a->receiver];
    uint64_t me = self_owner();
    uint32_t *buf = malloc(sizeof(uint32_t) * a->cap);
    int64_t kicks = 0, sent = 0, edges = 0, refused = 0, delivered = 0, calls = 0, batches = 0;
    int64_t send_ns = 0, consume_ns = 0;
    pin(a->sender_cpu);
    int64_t end = now_ns() + (int64_t)(a->duration * 1e9);
    uint32_t k = 0;
    while (now_ns() < end) {
        int64_t t0 = now_ns();
        for (uint32_t i = 0; i < a->batch; i++) {
            int r = send(ld, a->ports[k], me, &kicks);
            if (++k == a->nports) k = 0;
            if (r < 0)
                refused++;
            else
                edges += r;
        }
        int64_t t1 = now_ns();
        uint32_t n;
        do {
            n = consume(d, a->vcpu, buf, a->cap, me);
            delivered += n;
            calls++;
        } while (n == a->cap);
        consume_ns += now_ns() - t1;
        send_ns += t1 - t0;
        sent += a->batch;
        batches++;
    }
    free(buf);
    printf("{\"abi\": \"%s\", \"mode\": \"isolated\", \"sent\": %lld, \"edges\": %lld, "
           "\"refused\": %lld, \"delivered\": %lld, \"consume_calls\": %lld, "
           "\"batches\": %lld, \"send_ns\": %lld, \"consume_ns\": %lld, "
           "\"left_pending\": %lld}\n",
           d->abi == EVL_ABI_FIFO ? "fifo" : "2l", (long long)sent, (long long)edges,
           (long long)refused, (long long)delivered, (long long)calls, (long long)batches,
           (long long)send_ns, (long long)consume_ns, (long long)left_pending(a));
    return 0;
}

/* Receiver ports still PENDING (or, FIFO, LINKED) after the run: must be 0. */
static int64_t left_pending(const args_t *a) {
    dom_t *ld = doms[a->sender];
    int64_t left = 0;
    for (uint32_t i = 0; i < a->nports; i++) {
        uint8_t *pe = ld->base + port_off(ld, a->ports[i]);
        uint32_t rdom = *(uint16_t *)(pe + EVL_P_REMOTE_DOM);
        uint32_t rport = *(uint32_t *)(pe + EVL_P_REMOTE_PORT);
        dom_t *rd = rdom < MAX_DOMS ? doms[rdom] : NULL;
        if (rd == NULL) continue;
        if (rd->abi == EVL_ABI_FIFO) {
            if (rport < hdr(rd, EVL_H_ARRAY_PAGES) * (uint32_t)EVL_FIFO_WORDS_PER_PAGE &&
                (__atomic_load_n(event_word(rd, rport), SEQ) & (PENDING | LINKED)))
                left++;
        } else {
            uint64_t *pend = U64(rd, rd->shared_info + EVL_SI_PENDING);
            if (__atomic_load_n(&pend[rport / 64], SEQ) >> (rport % 64) & 1) left++;
        }
    }
    return left;
}

/* ---------------------------------------------------------------------------------------- */
/* command line, fork, report                                                                */

static int parse_ports(const char *spec, args_t *a) {
    size_t cap = 1024;
    a->ports = malloc(cap * sizeof(uint32_t));
    a->nports = 0;
    char *copy = strdup(spec), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *end;
        unsigned long lo = strtoul(tok, &end, 10), hi = lo;
        if (*end == '-') hi = strtoul(end + 1, &end, 10);
        if (*end != '\0' || hi < lo || hi >= (1ul << 28)) {
            free(copy);
            return fail("bad port range %s", tok);
        }
        for (unsigned long p = lo; p <= hi; p++) {
            if (a->nports == cap) a->ports = realloc(a->ports, (cap *= 2) * sizeof(uint32_t));
            a->ports[a->nports++] = (uint32_t)p;
        }
    }
    free(copy);
    return a->nports ? 0 : fail("no ports in %s", spec);
}

static void usage(void) {
    fprintf(stderr,
            "usage: evtchn_ref --host NAME --sender DOMID --receiver DOMID --ports A-B[,C...]\n"
            "                  [--vcpu V] [--batch N] [--window N] [--cap N] [--spin-ns N]\n"
            "                  [--duration S] [--wait-timeout S] [--pin SENDER_CPU,VCPU_CPU]\n"
            "                  [--isolated]\n"
            "       evtchn_ref --handoff busy|idle [--count N] [--gap-ns N] [--pin S,R]\n");
    exit(2);
}

static int map_needed(args_t *a) {
    uint32_t want[3] = {a->sender, a->receiver, 0};
    for (int i = 0; i < 2; i++) {
        if (want[i] >= MAX_DOMS) return fail("domid %u is beyond this program's table", want[i]);
        if (!doms[want[i]] && !(doms[want[i]] = map_domain(a->host, want[i]))) return -1;
    }
    dom_t *ld = doms[a->sender];                /* and every peer the sender's ports name */
    for (uint32_t i = 0; i < a->nports; i++) {
        if (a->ports[i] >= hdr(ld, EVL_H_VALID))
            return fail("port %u is not valid in domain %u", a->ports[i], a->sender);
        uint32_t rdom = *(uint16_t *)(ld->base + port_off(ld, a->ports[i]) + EVL_P_REMOTE_DOM);
        if (rdom < MAX_DOMS && !doms[rdom] && !(doms[rdom] = map_domain(a->host, rdom)))
            return -1;
    }
    if (a->vcpu >= doms[a->receiver]->vcpus)
        return fail("domain %u has no vcpu %u", a->receiver, a->vcpu);
    return 0;
}

static int wait_child(pid_t pid, int64_t deadline, const char *what) {
    int status;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) break;
        if (r < 0) return fail("waitpid failed for the %s", what);
        if (now_ns() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return fail("the %s overran its time limit and was killed", what);
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return fail("the %s failed", what);
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* --handoff: a shared-memory hand-off (busy) and a futex wake-up (idle), nothing else         */

typedef struct {
    _Alignas(64) uint32_t seq;                  /* events sent so far; the futex word */
    _Alignas(64) int64_t t_send;                /* CLOCK_MONOTONIC ns of the latest send */
    _Alignas(64) uint32_t ack;                  /* events the receiver has handled */
    _Alignas(64) uint32_t sleeping;             /* the receiver is about to FUTEX_WAIT */
    _Alignas(64) int64_t lat[];                 /* per event: handler time - send time */
} handoff_t;

static int run_handoff(int idle, uint32_t count, int64_t gap_ns, int scpu, int rcpu) {
    size_t size = sizeof(handoff_t) + sizeof(int64_t) * count;
    handoff_t *h = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (h == MAP_FAILED) return fail("cannot map the hand-off page");
    memset(h, 0, size);
    fflush(NULL);
    pid_t child = fork();
    if (child < 0) return fail("fork failed");
    if (child == 0) {                           /* the receiver */
        pin(rcpu);
        for (uint32_t i = 0; i < count; i++) {
            if (idle) {
                __atomic_store_n(&h->sleeping, 1, SEQ);
                while (__atomic_load_n(&h->seq, ACQ) == i) futex_wait(&h->seq, i, 1000000000);
            } else {
                while (__atomic_load_n(&h->seq, ACQ) == i) cpu_relax();
            }
            int64_t t = now_ns();
            __atomic_store_n(&h->sleeping, 0, SEQ);
            h->lat[i] = t - __atomic_load_n(&h->t_send, ACQ);
            __atomic_store_n(&h->ack, i + 1, REL);
        }
        _exit(0);
    }
    pin(scpu);
    int64_t limit = now_ns() + 60 * 1000000000LL;
    for (uint32_t i = 0; i < count; i++) {
        while (__atomic_load_n(&h->ack, ACQ) != i || (idle && !__atomic_load_n(&h->sleeping, ACQ))) {
            if (now_ns() > limit) {
                kill(child, SIGKILL);
                waitpid(child, NULL, 0);
                return fail("the hand-off receiver stopped answering");
            }
            cpu_relax();
        }
        if (gap_ns > 0) {
            struct timespec ts = {gap_ns / 1000000000, gap_ns % 1000000000};
            nanosleep(&ts, NULL);
        }
        __atomic_store_n(&h->t_send, now_ns(), REL);
        __atomic_store_n(&h->seq, i + 1, SEQ);
        if (idle) futex_wake(&h->seq);
    }
    if (wait_child(child, now_ns() + 10 * 1000000000LL, "hand-off receiver")) return 1;
    printf("{\"mode\": \"%s\", \"count\": %u, \"latency_ns\": [", idle ? "idle" : "busy", count);
    for (uint32_t i = 0; i < count; i++) printf(i ? ", %lld" : "%lld", (long long)h->lat[i]);
    printf("]}\n");
    return 0;
}

static int headline_main(int argc, char **argv);

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--headline")) return headline_main(argc, argv);
    args_t a = {.vcpu = 0, .batch = 1024, .cap = 4096, .duration = 1.0, .wait_timeout = 0.01,
                .sender_cpu = -1, .vcpu_cpu = -1};
    const char *ports = NULL;
    int have_sender = 0, have_receiver = 0, isolated = 0;
    static struct option opts[] = {
        {"host", required_argument, 0, 'h'},     {"sender", required_argument, 0, 's'},
        {"receiver", required_argument, 0, 'r'}, {"vcpu", required_argument, 0, 'v'},
        {"ports", required_argument, 0, 'p'},    {"batch", required_argument, 0, 'b'},
        {"cap", required_argument, 0, 'c'},      {"duration", required_argument, 0, 'd'},
        {"wait-timeout", required_argument, 0, 'w'}, {"spin-ns", required_argument, 0, 'n'},
        {"window", required_argument, 0, 'W'},  {"pin", required_argument, 0, 'P'},
        {"isolated", no_argument, 0, 'I'},
        {"handoff", required_argument, 0, 'H'}, {"count", required_argument, 0, 'C'},
        {"gap-ns", required_argument, 0, 'G'},
        {0, 0, 0, 0}};
    const char *handoff = NULL;
    uint32_t count = 2000;
    int64_t gap_ns = 100000;
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'h': a.host = optarg; break;
        case 's': a.sender = (uint32_t)atoi(optarg); have_sender = 1; break;
        case 'r': a.receiver = (uint32_t)atoi(optarg); have_receiver = 1; break;
        case 'v': a.vcpu = (uint32_t)atoi(optarg); break;
        case 'p': ports = optarg; break;
        case 'b': a.batch = (uint32_t)atoi(optarg); break;
        case 'c': a.cap = (uint32_t)atoi(optarg); break;
        case 'd': a.duration = atof(optarg); break;
        case 'w': a.wait_timeout = atof(optarg); break;
        case 'n': a.spin_ns = atoll(optarg); break;
        case 'W': a.window = (uint32_t)atoi(optarg); break;
        case 'I': isolated = 1; break;
        case 'H': handoff = optarg; break;
        case 'C': count = (uint32_t)atoi(optarg); break;
        case 'G': gap_ns = atoll(optarg); break;
        case 'P':
            if (sscanf(optarg, "%d,%d", &a.sender_cpu, &a.vcpu_cpu) != 2) usage();
            break;
        default: usage();
        }
    }
    if (handoff) {
        if ((strcmp(handoff, "busy") && strcmp(handoff, "idle")) || count == 0) usage();
        return run_handoff(!strcmp(handoff, "idle"), count, gap_ns, a.sender_cpu, a.vcpu_cpu);
    }
    if (!a.host || !ports || !have_sender || !have_receiver || a.batch == 0 || a.cap == 0 ||
        a.duration <= 0 || a.wait_timeout <= 0)
        usage();
    if (parse_ports(ports, &a) || map_needed(&a)) return 1;

    ctl = mmap(NULL, sizeof *ctl, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (ctl == MAP_FAILED) {
        fail("cannot map the control page");
        return 1;
    }
    memset(ctl, 0, sizeof *ctl);
    if (isolated) return run_isolated(&a);
    fflush(NULL);
    pid_t consumer = fork();
    if (consumer == 0) {
        run_consumer(&a);
        _exit(0);
    }
    pid_t sender = consumer > 0 ? fork() : -1;
    if (sender == 0) {
        run_sender(&a);
        _exit(0);
    }
    if (consumer < 0 || sender < 0) {
        if (consumer > 0) kill(consumer, SIGKILL);
        fail("fork failed");
        return 1;
    }
    int64_t limit = now_ns() + 10 * 1000000000LL;
    while (__atomic_load_n(&ctl->ready, SEQ) < 2 && now_ns() < limit) sched_yield();
    int64_t t0 = now_ns() + 20 * 1000000;       /* both sleep until then */
    __atomic_store_n(&ctl->start_ns, t0, SEQ);
    int64_t deadline = t0 + (int64_t)(a.duration * 1e9) + 30 * 1000000000LL;
    int bad = wait_child(sender, deadline, "sender");
    bad |= wait_child(consumer, deadline, "consumer");
    if (bad) return 1;
    int64_t elapsed = ctl->last_ns - t0;
    printf("{\"abi\": \"%s\", \"sent\": %lld, \"edges\": %lld, \"refused\": %lld, "
           "\"batches\": %lld, \"kicks\": %lld, \"lost_lock_tries\": %lld, "
           "\"link_gave_up\": %lld, \"delivered\": %lld, \"consume_calls\": %lld, "
           "\"nonempty_calls\": %lld, \"full_calls\": %lld, \"waits\": %lld, "
           "\"futex_sleeps\": %lld, \"elapsed_ns\": %lld, \"sender_ns\": %lld, "
           "\"consumer_ns\": %lld, \"left_pending\": %lld}\n",
           doms[a.receiver]->abi == EVL_ABI_FIFO ? "fifo" : "2l", (long long)ctl->sent,
           (long long)ctl->edges, (long long)ctl->refused, (long long)ctl->batches,
           (long long)ctl->kicks, (long long)ctl->lost_lockq, (long long)ctl->link_gaveup,
           (long long)ctl->delivered, (long long)ctl->calls, (long long)ctl->nonempty_calls,
           (long long)ctl->full_calls, (long long)ctl->waits, (long long)ctl->sleeps,
           (long long)elapsed, (long long)(ctl->sender_end_ns - t0),
           (long long)(ctl->consumer_end_ns - t0), (long long)left_pending(&a));
    return 0;
}

/* ---------------------------------------------------------------------------------------- */
/* --headline: the shape of `python -m stress` (its data path) as C, the headline's anchor   */
/*
 * On a host whose channels Python bound (sender domains 1..N, each with interdomain channels to
 * dom0, dom0's ports spread over its vCPUs and, for fifo, priorities), run:
 *
 *   N sender processes  sender s finds its own channels (its domain's INTERDOMAIN ports whose
 *                       peer is the receiver) and, until told to stop, sends batches of --batch
 *                       random ones of them (send(), the EVTCHNOP_send above); every new edge is
 *                       tallied per dom0 port in its own shared row, as stress's Sender does.
 *   V vCPU processes    vCPU v blocks as evtchn's wait() does (wait_upcall: the upcall flag, then
 *                       the kick futex, --wait-timeout slices), drains with consume() into a
 *                       --cap buffer until a call returns less than --cap, tallies every
 *                       delivery per port in its own shared row, publishes its count, then naps
 *                       --nap-us (stress's interrupt moderation) before it waits again.
 *
 * The parent measures deliveries over --duration seconds from the common start (the vCPUs'
 * published counts, as stress's parent reads them), then stops the senders; the vCPUs drain
 * what is left and stop. It then checks its own accounting: for every dom0 port, the deliveries
 * of all vCPUs equal the edges of all senders, nothing is left PENDING (or LINKED), no send was
 * refused. Prints one JSON object; exit status 1 if the accounting failed (the JSON says how).
 * CPU seconds of each role count from the start to the stop (CLOCK_PROCESS_CPUTIME_ID).
 *
 *   BUILD/evtchn_ref --headline --host evtchn-123-abcd [--senders 2] [--vcpus 64] \
 *                    [--batch 2048] [--cap 4096] [--nap-us 8000] [--duration 10] \
 *                    [--wait-timeout 0.05] [--seed 1]
 */

#include <sys/prctl.h>

typedef struct {
    _Alignas(64) int64_t progress;              /* vCPU: deliveries so far (release) */
    int64_t sent, edges, refused, batches, kicks, lost_lockq, link_gaveup;   /* senders */
    int64_t delivered, wakeups, timeouts, calls, sleeps, consumer_kicks;     /* vCPUs */
    int64_t cpu_ns;                             /* CPU time from the start to the stop */
    int64_t channels;                           /* senders: channels found; vCPUs: 0 */
} hl_slot_t;

typedef struct {
    _Alignas(64) int64_t start_ns;              /* common CLOCK_MONOTONIC start */
    _Alignas(64) uint32_t ready;                /* children mapped and waiting */
    _Alignas(64) uint32_t stop;                 /* 1: senders finish their batch and leave */
    _Alignas(64) uint32_t senders_done;         /* senders that made their last send */
    _Alignas(64) hl_slot_t slot[];              /* N senders, then V vCPUs */
} hl_ctl_t;

typedef struct {
    const char *host;
    uint32_t receiver, senders, vcpus, batch, cap, nports;
    int64_t nap_ns, wait_timeout_ns;
    double duration;
    uint64_t seed;
    hl_ctl_t *c;
    uint32_t *edges;                            /* [senders][nports] */
    uint32_t *delivered;                        /* [vcpus][nports] */
} hl_t;

static inline int64_t cpu_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* Each child counts into a private ctl_t (the existing kernels' diagnostic counters), so that
 * N + V processes do not share one cache line of counters; they are copied to its slot. */
static void hl_private_ctl(void) {
    ctl = calloc(1, sizeof *ctl);
    if (!ctl) _exit(2);
}

static void hl_wait_start(hl_t *h) {
    __atomic_fetch_add(&h->c->ready, 1, SEQ);
    while (__atomic_load_n(&h->c->start_ns, ACQ) == 0) {
        struct timespec ts = {0, 200000};       /* 66 processes: do not spin while others start */
        nanosleep(&ts, NULL);
    }
    sleep_until(h->c->start_ns);
}

static void hl_sender(hl_t *h, uint32_t s) {
    hl_slot_t *slot = &h->c->slot[s];
    dom_t *ld = doms[1 + s], *d0 = doms[h->receiver];
    uint64_t me = self_owner();
    uint32_t valid = hdr(ld, EVL_H_VALID), n = 0;
    uint32_t *lport = malloc(sizeof(uint32_t) * valid), *dport = malloc(sizeof(uint32_t) * valid);
    uint32_t *tally = h->edges + (size_t)s * h->nports;
    for (uint32_t p = 1; p < valid; p++) {      /* its own channels to vCPUs that run here */
        uint8_t *pe = ld->base + port_off(ld, p);
        if (pe[EVL_P_STATE] != EVL_ECS_INTERDOMAIN ||
            *(uint16_t *)(pe + EVL_P_REMOTE_DOM) != h->receiver)
            continue;
        uint32_t rp = *(uint32_t *)(pe + EVL_P_REMOTE_PORT);
        if (rp >= h->nports ||
            *(uint16_t *)(d0->base + port_off(d0, rp) + EVL_P_NOTIFY_VCPU) >= h->vcpus)
            continue;
        lport[n] = p;
        dport[n++] = rp;
    }
    slot->channels = n;
    hl_private_ctl();
    uint64_t rng = h->seed * 0x100000001B3ULL + s + 1;
    int64_t sent = 0, edges = 0, refused = 0, batches = 0, kicks = 0;
    hl_wait_start(h);
    int64_t cpu0 = cpu_now_ns();
    while (n && !__atomic_load_n(&h->c->stop, ACQ)) {
        for (uint32_t i = 0; i < h->batch; i++) {
            uint32_t k = (uint32_t)(((splitmix64(&rng) >> 32) * n) >> 32);
            int r = send(ld, lport[k], me, &kicks);
            if (r < 0)
                refused++;
            else if (r) {
                tally[dport[k]]++;
                edges++;
            }
        }
        sent += h->batch;
        batches++;
    }
    slot->cpu_ns = cpu_now_ns() - cpu0;
    slot->sent = sent;
    slot->edges = edges;
    slot->refused = refused;
    slot->batches = batches;
    slot->kicks = kicks;
    slot->lost_lockq = ctl->lost_lockq;
    slot->link_gaveup = ctl->link_gaveup;
    __atomic_fetch_add(&h->c->senders_done, 1, SEQ);
}

static void hl_vcpu(hl_t *h, uint32_t v) {
    hl_slot_t *slot = &h->c->slot[h->senders + v];
    dom_t *d = doms[h->receiver];
    uint64_t me = self_owner();
    uint32_t *buf = malloc(sizeof(uint32_t) * h->cap);
    uint32_t *tally = h->delivered + (size_t)v * h->nports;
    int64_t delivered = 0, wakeups = 0, timeouts = 0, calls = 0, cpu0 = 0;
    hl_private_ctl();
    hl_wait_start(h);
    cpu0 = cpu_now_ns();
    for (;;) {
        /* once every sender is done, one more drain sees every last event, then leave */
        int last = __atomic_load_n(&h->c->senders_done, SEQ) == h->senders;
        if (last && !slot->cpu_ns) slot->cpu_ns = cpu_now_ns() - cpu0;
        if (!last && !wait_upcall(d, v, h->wait_timeout_ns, me)) {
            timeouts++;
            continue;
        }
        wakeups += !last;
        uint32_t got;
        do {
            got = consume(d, v, buf, h->cap, me);
            calls++;
            for (uint32_t i = 0; i < got; i++) tally[buf[i]]++;
            delivered += got;
        } while (got == h->cap);
        __atomic_store_n(&slot->progress, delivered, REL);
        if (last) break;
        if (h->nap_ns > 0) {
            struct timespec ts = {h->nap_ns / 1000000000, h->nap_ns % 1000000000};
            nanosleep(&ts, NULL);
        }
    }
    slot->delivered = delivered;
    slot->wakeups = wakeups;
    slot->timeouts = timeouts;
    slot->calls = calls;
    slot->sleeps = ctl->sleeps;
    slot->consumer_kicks = ctl->consumer_kicks;
    free(buf);
}

static int64_t hl_progress(const hl_t *h) {
    int64_t sum = 0;
    for (uint32_t v = 0; v < h->vcpus; v++)
        sum += __atomic_load_n(&h->c->slot[h->senders + v].progress, ACQ);
    return sum;
}

/* dom0 ports still PENDING (or LINKED) after the drain, and the per-port accounting. */
static void hl_check(const hl_t *h, int64_t *left, int64_t *lost, int64_t *phantom,
                     int64_t *bad_ports) {
    dom_t *d = doms[h->receiver];
    *left = *lost = *phantom = *bad_ports = 0;
    for (uint32_t p = 1; p < h->nports; p++) {
        int64_t e = 0, got = 0;
        for (uint32_t s = 0; s < h->senders; s++) e += h->edges[(size_t)s * h->nports + p];
        for (uint32_t v = 0; v < h->vcpus; v++) got += h->delivered[(size_t)v * h->nports + p];
        if (e != got) {
            (*bad_ports)++;
            if (e > got) *lost += e - got;
            else *phantom += got - e;
        }
        if (d->abi == EVL_ABI_FIFO) {
            if (p < hdr(d, EVL_H_ARRAY_PAGES) * (uint32_t)EVL_FIFO_WORDS_PER_PAGE &&
                (__atomic_load_n(event_word(d, p), SEQ) & (PENDING | LINKED)))
                (*left)++;
        } else {
            uint64_t *pend = U64(d, d->shared_info + EVL_SI_PENDING);
            if (__atomic_load_n(&pend[p / 64], SEQ) >> (p % 64) & 1) (*left)++;
        }
    }
}

static int hl_run(hl_t *h) {
    uint32_t nproc = h->senders + h->vcpus;
    size_t csize = sizeof(hl_ctl_t) + sizeof(hl_slot_t) * nproc;
    size_t tsize = sizeof(uint32_t) * (size_t)h->nports * nproc;
    h->c = mmap(NULL, csize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    uint32_t *tallies = mmap(NULL, tsize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (h->c == MAP_FAILED || tallies == MAP_FAILED) return fail("cannot map the tallies");
    h->edges = tallies;
    h->delivered = tallies + (size_t)h->nports * h->senders;
    pid_t *pids = calloc(nproc, sizeof(pid_t));
    fflush(NULL);
    for (uint32_t i = 0; i < nproc; i++) {      /* vCPUs first: there before any send */
        uint32_t j = (i + h->senders) % nproc;
        pid_t parent = getpid(), pid = fork();
        if (pid == 0) {
            /* a killed parent (Ctrl-C on stress or bench) takes its children along */
            if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) _exit(1);
            if (j < h->senders)
                hl_sender(h, j);
            else
                hl_vcpu(h, j - h->senders);
            _exit(0);
        }
        if (pid < 0) {
            for (uint32_t k = 0; k < nproc; k++)
                if (pids[k] > 0) kill(pids[k], SIGKILL);
            return fail("fork failed");
        }
        pids[j] = pid;
    }
    int64_t limit = now_ns() + 60 * 1000000000LL;
    while (__atomic_load_n(&h->c->ready, SEQ) < nproc && now_ns() < limit) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    int64_t t0 = now_ns() + 20 * 1000000;
    __atomic_store_n(&h->c->start_ns, t0, SEQ);
    sleep_until(t0);
    int64_t d0 = hl_progress(h);
    sleep_until(t0 + (int64_t)(h->duration * 1e9));
    int64_t d1 = hl_progress(h), t1 = now_ns();
    __atomic_store_n(&h->c->stop, 1, SEQ);
    int64_t deadline = t1 + 30 * 1000000000LL;
    int bad = 0;
    for (uint32_t i = 0; i < nproc; i++) {
        char what[32];
        snprintf(what, sizeof what, i < h->senders ? "sender %u" : "vcpu %u",
                 i < h->senders ? i : i - h->senders);
        if (bad) {
            kill(pids[i], SIGKILL);
            waitpid(pids[i], NULL, 0);
        } else {
            bad = wait_child(pids[i], deadline, what);
        }
    }
    free(pids);
    if (bad) return 1;
    int64_t sum[14] = {0}, cpu_s = 0, cpu_v = 0, channels = 0;
    for (uint32_t i = 0; i < nproc; i++) {
        hl_slot_t *sl = &h->c->slot[i];
        int64_t vals[14] = {sl->sent, sl->edges, sl->refused, sl->batches, sl->kicks,
                            sl->lost_lockq, sl->link_gaveup, sl->delivered, sl->wakeups,
                            sl->timeouts, sl->calls, sl->sleeps, sl->consumer_kicks, 0};
        for (int k = 0; k < 14; k++) sum[k] += vals[k];
        if (i < h->senders) {
            cpu_s += sl->cpu_ns;
            channels += sl->channels;
        } else {
            cpu_v += sl->cpu_ns;
        }
    }
    int64_t left, lost, phantom, bad_ports;
    hl_check(h, &left, &lost, &phantom, &bad_ports);
    double race_s = (double)(t1 - t0) / 1e9;
    int ok = left == 0 && bad_ports == 0 && sum[2] == 0 && sum[1] == sum[7] && sum[7] > 0;
    printf("{\"abi\": \"%s\", \"mode\": \"headline\", \"senders\": %u, \"vcpus\": %u, "
           "\"channels\": %lld, \"batch\": %u, \"cap\": %u, \"nap_ns\": %lld, "
           "\"race_s\": %.6f, \"race_delivered\": %lld, \"delivered_per_s\": %.1f, "
           "\"sent\": %lld, \"edges\": %lld, \"refused\": %lld, \"batches\": %lld, "
           "\"kicks\": %lld, \"lost_lock_tries\": %lld, \"link_gave_up\": %lld, "
           "\"delivered\": %lld, \"vcpu_wakeups\": %lld, \"wait_timeouts\": %lld, "
           "\"consume_calls\": %lld, \"futex_sleeps\": %lld, \"consumer_kicks\": %lld, "
           "\"cpu_s\": {\"senders\": %.3f, \"vcpus\": %.3f}, \"left_pending\": %lld, "
           "\"lost\": %lld, \"phantom\": %lld, \"ports_miscounted\": %lld, \"ok\": %s}\n",
           doms[h->receiver]->abi == EVL_ABI_FIFO ? "fifo" : "2l", h->senders, h->vcpus,
           (long long)channels, h->batch, h->cap, (long long)h->nap_ns, race_s,
           (long long)(d1 - d0), race_s > 0 ? (double)(d1 - d0) / race_s : 0.0,
           (long long)sum[0], (long long)sum[1], (long long)sum[2], (long long)sum[3],
           (long long)sum[4], (long long)sum[5], (long long)sum[6], (long long)sum[7],
           (long long)sum[8], (long long)sum[9], (long long)sum[10], (long long)sum[11],
           (long long)sum[12], cpu_s / 1e9, cpu_v / 1e9, (long long)left, (long long)lost,
           (long long)phantom, (long long)bad_ports, ok ? "true" : "false");
    if (!ok) fail("headline accounting failed: %lld lost, %lld phantom, %lld left pending, "
                  "%lld refused", (long long)lost, (long long)phantom, (long long)left,
                  (long long)sum[2]);
    return ok ? 0 : 1;
}

static void hl_usage(void) {
    fprintf(stderr,
            "usage: evtchn_ref --headline --host NAME [--receiver DOMID] [--senders N]\n"
            "                  [--vcpus V] [--batch N] [--cap N] [--nap-us US] [--duration S]\n"
            "                  [--wait-timeout S] [--seed N]\n"
            "  (sender domains are 1..N; vCPUs 0..V-1 of the receiver, default all of them)\n");
    exit(2);
}

static int headline_main(int argc, char **argv) {
    hl_t h = {.receiver = 0, .senders = 2, .vcpus = 0, .batch = 2048, .cap = 4096,
              .nap_ns = 8000000, .wait_timeout_ns = 50000000, .duration = 10.0, .seed = 1};
    static struct option opts[] = {
        {"headline", no_argument, 0, 'L'},        {"host", required_argument, 0, 'h'},
        {"receiver", required_argument, 0, 'r'},  {"senders", required_argument, 0, 'N'},
        {"vcpus", required_argument, 0, 'V'},     {"batch", required_argument, 0, 'b'},
        {"cap", required_argument, 0, 'c'},       {"nap-us", required_argument, 0, 'Z'},
        {"duration", required_argument, 0, 'd'},  {"wait-timeout", required_argument, 0, 'w'},
        {"seed", required_argument, 0, 'S'},      {0, 0, 0, 0}};
    int c;
    double nap_us = 8000, wait_timeout = 0.05;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 'L': break;
        case 'h': h.host = optarg; break;
        case 'r': h.receiver = (uint32_t)atoi(optarg); break;
        case 'N': h.senders = (uint32_t)atoi(optarg); break;
        case 'V': h.vcpus = (uint32_t)atoi(optarg); break;
        case 'b': h.batch = (uint32_t)atoi(optarg); break;
        case 'c': h.cap = (uint32_t)atoi(optarg); break;
        case 'Z': nap_us = atof(optarg); break;
        case 'd': h.duration = atof(optarg); break;
        case 'w': wait_timeout = atof(optarg); break;
        case 'S': h.seed = strtoull(optarg, NULL, 0); break;
        default: hl_usage();
        }
    }
    if (!h.host || optind != argc || h.senders < 1 || h.batch < 1 || h.cap < 1 ||
        !(h.duration > 0) || !(wait_timeout > 0) || nap_us < 0)
        hl_usage();
    h.nap_ns = (int64_t)(nap_us * 1000);
    h.wait_timeout_ns = (int64_t)(wait_timeout * 1e9);
    uint32_t want = h.receiver > h.senders ? h.receiver : h.senders;
    if (want >= MAX_DOMS) {
        fail("domid %u is beyond this program's table", want);
        return 2;
    }
    if (h.receiver >= 1 && h.receiver <= h.senders) {
        fail("the receiver %u is one of the sender domains 1..%u", h.receiver, h.senders);
        return 2;
    }
    for (uint32_t i = 0; i <= want; i++) {
        if (i != h.receiver && (i < 1 || i > h.senders)) continue;
        if (!(doms[i] = map_domain(h.host, i))) return 1;
    }
    dom_t *d0 = doms[h.receiver];
    if (h.vcpus == 0) h.vcpus = d0->vcpus;
    if (h.vcpus > d0->vcpus) {
        fail("domain %u has %u vcpus, not %u", h.receiver, d0->vcpus, h.vcpus);
        return 2;
    }
    h.nports = hdr(d0, EVL_H_VALID);
    return hl_run(&h);
}
