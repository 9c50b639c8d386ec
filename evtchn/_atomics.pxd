# Lock-free atomics, futexes, lock owner ids and a robust process-shared spinlock over shared
# memory.
#
#     from evtchn._atomics cimport at_load32, at_cas32, evlock_acquire, ...
#
# Everything here is a `static inline` C function over GCC's __atomic builtins, callable nogil
# and noexcept. Several processes map the same segment, so only lock-free atomics are valid: a
# libatomic lock would live in one process's memory and exclude nobody else. The asserts below
# make a platform without them fail to compile rather than corrupt state silently.
#
# Orders: at_load* is acquire, at_load_sc* seq_cst (a load that closes a store-buffering pair
# after a seq_cst RMW), at_store* is release, the *_relaxed variants are relaxed, every
# read-modify-write (fetch_*, exchange, cas, test_and_*_bit) is seq_cst; evlock_* take the lock
# with acquire and drop it with release, which is all a lock needs.
#
# Linux-only: the futex helpers use the futex(2) system call.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

# (A raw string, so the macro's backslash-newlines reach the generated C intact.)
cdef extern from * nogil:
    r"""
    #ifndef EVTCHN_ATOMICS_H
    #define EVTCHN_ATOMICS_H
    #include <errno.h>
    #include <fcntl.h>
    #include <pthread.h>
    #include <stdlib.h>
    #include <stdio.h>
    #include <string.h>
    #include <sched.h>
    #include <signal.h>
    #include <stdint.h>
    #include <sys/syscall.h>
    #include <sys/types.h>
    #include <time.h>
    #include <unistd.h>
    #include <linux/futex.h>

    _Static_assert(__atomic_always_lock_free(1, 0), "evtchn needs lock-free 1-byte atomics");
    _Static_assert(__atomic_always_lock_free(2, 0), "evtchn needs lock-free 2-byte atomics");
    _Static_assert(__atomic_always_lock_free(4, 0), "evtchn needs lock-free 4-byte atomics");
    _Static_assert(__atomic_always_lock_free(8, 0), "evtchn needs lock-free 8-byte atomics");

    #define EVTCHN_SC __ATOMIC_SEQ_CST
    #define EVTCHN_AT_OPS(N, T)                                                                 \
    static inline T at_load##N(const T *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }    \
    static inline T at_load_relaxed##N(const T *p) {                                           \
        return __atomic_load_n(p, __ATOMIC_RELAXED); }                                         \
    static inline T at_load_sc##N(const T *p) { return __atomic_load_n(p, EVTCHN_SC); }        \
    static inline void at_store##N(T *p, T v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }    \
    static inline void at_store_relaxed##N(T *p, T v) {                                        \
        __atomic_store_n(p, v, __ATOMIC_RELAXED); }                                            \
    static inline T at_fetch_or##N(T *p, T v) { return __atomic_fetch_or(p, v, EVTCHN_SC); }   \
    static inline T at_fetch_and##N(T *p, T v) { return __atomic_fetch_and(p, v, EVTCHN_SC); } \
    static inline T at_fetch_add##N(T *p, T v) { return __atomic_fetch_add(p, v, EVTCHN_SC); } \
    static inline T at_fetch_sub##N(T *p, T v) { return __atomic_fetch_sub(p, v, EVTCHN_SC); } \
    static inline T at_exchange##N(T *p, T v) { return __atomic_exchange_n(p, v, EVTCHN_SC); } \
    /* Strong CAS: 1 if *p was *expected and is now desired; else 0 and *expected = *p. */    \
    static inline int at_cas##N(T *p, T *expected, T desired) {                                \
        return __atomic_compare_exchange_n(p, expected, desired, 0,                            \
                                           __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
    }                                                                                          \
    /* Set / clear bit `bit` (0 = least significant) and return its previous value, 0 or 1. */ \
    static inline int at_test_and_set_bit##N(T *p, unsigned bit) {                             \
        T m = (T)((T)1 << bit);                                                                \
        return (__atomic_fetch_or(p, m, __ATOMIC_SEQ_CST) & m) != 0;                           \
    }                                                                                          \
    static inline int at_test_and_clear_bit##N(T *p, unsigned bit) {                           \
        T m = (T)((T)1 << bit);                                                                \
        return (__atomic_fetch_and(p, (T)~m, __ATOMIC_SEQ_CST) & m) != 0;                      \
    }

    EVTCHN_AT_OPS(8, uint8_t)
    EVTCHN_AT_OPS(16, uint16_t)
    EVTCHN_AT_OPS(32, uint32_t)
    EVTCHN_AT_OPS(64, uint64_t)
    #undef EVTCHN_AT_OPS

    static inline void at_fence(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

    /* Spin-wait hint: on x86 PAUSE stops the spinning core from starving its SMT sibling and
       avoids the memory-order mis-speculation flush when the awaited line finally changes. */
    static inline void cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }

    static inline int64_t monotonic_ns(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    }

    /* Sleep while *addr == expected. FUTEX_WAIT without FUTEX_PRIVATE_FLAG keys the wait on the
       mapped file and offset, so waiters and wakers in different processes meet. Returns 0
       when woken or when *addr already differed (the caller re-checks its condition either way:
       wake-ups may be spurious), ETIMEDOUT once timeout_ns (relative, CLOCK_MONOTONIC) passed,
       EINTR on a signal. timeout_ns < 0 waits forever. */
    static inline int futex_wait_u32(uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
        struct timespec ts, *tsp = NULL;
        if (timeout_ns >= 0) {
            ts.tv_sec = (time_t)(timeout_ns / 1000000000);
            ts.tv_nsec = (long)(timeout_ns % 1000000000);
            tsp = &ts;
        }
        if (syscall(SYS_futex, addr, FUTEX_WAIT, expected, tsp, NULL, 0) == 0) return 0;
        return errno == EAGAIN ? 0 : errno;
    }

    /* Wake up to n waiters on addr (INT_MAX: all); returns how many woke, or -errno. */
    static inline int futex_wake_u32(uint32_t *addr, int n) {
        long r = syscall(SYS_futex, addr, FUTEX_WAKE, n, NULL, NULL, 0);
        return r < 0 ? -errno : (int)r;
    }

    /* Lock owners (evtchn/layout.py, "Lock words"): one id per THREAD, surviving pid reuse:
       low 32 bits the tid (bit 31 is CHANNEL_LOCK_READER in a lock word), high 32 bits the
       thread's start time in clock ticks since boot (field 22 of /proc/<tid>/stat), masked to
       31 bits. evtchn/owner.py computes the same value in Python. */
    #define EVTCHN_OWNER_TID_MASK 0x7FFFFFFFu
    #define EVTCHN_OWNER_START_MASK 0x7FFFFFFFu

    /* /proc/<tid>/stat: 1 with the state letter and start time, -1 when the task is gone
       (ENOENT/ESRCH), 0 when it could not be read for another reason (then nobody is declared
       dead: running out of file descriptors must not make a live owner's lock stealable). */
    static inline int evtchn_proc_stat(uint32_t tid, char *state, uint64_t *start) {
        char path[40], buf[512];
        ssize_t n;
        char *p;
        int fd, field;
        snprintf(path, sizeof path, "/proc/%u/stat", tid);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return (errno == ENOENT || errno == ESRCH) ? -1 : 0;
        n = read(fd, buf, sizeof buf - 1);
        if (n < 0 && errno == ESRCH) {         /* exited between open and read */
            close(fd);
            return -1;
        }
        close(fd);
        if (n <= 0)
            return 0;
        buf[n] = 0;
        p = strrchr(buf, ')');                 /* "tid (comm) S ...": comm may hold ") " */
        if (p == NULL || p[1] != ' ')
            return 0;
        p += 2;                                /* field 3, the state */
        *state = *p;
        for (field = 3; field < 22; field++) {
            p = strchr(p, ' ');
            if (p == NULL)
                return 0;
            p++;
        }
        *start = strtoull(p, NULL, 10);
        return 1;
    }

    static inline uint64_t evtchn_make_owner(uint32_t tid, uint64_t start) {
        return ((start & EVTCHN_OWNER_START_MASK) << 32) | (tid & EVTCHN_OWNER_TID_MASK);
    }

    /* The calling thread's owner id, computed once per thread. A forked child's only thread
       has another tid: the atfork handler (evtchn_owner_init) clears the cached id there.
       When /proc cannot be read the start time stays 0, "unknown" to evlock_owner_dead; it
       is cached all the same, since a lock is released by the id it was taken with. */
    static __thread uint64_t evtchn_self_cached;

    static inline uint64_t evtchn_self(void) {
        uint64_t o = evtchn_self_cached;
        if (__builtin_expect(o == 0, 0)) {
            uint32_t tid = (uint32_t)syscall(SYS_gettid);
            uint64_t start = 0;
            char state;
            evtchn_proc_stat(tid, &state, &start);
            o = evtchn_make_owner(tid, start);
            evtchn_self_cached = o;
        }
        return o;
    }

    static inline void evtchn_owner_atfork_child(void) { evtchn_self_cached = 0; }

    static inline int evtchn_owner_init(void) {
        return pthread_atfork(NULL, NULL, evtchn_owner_atfork_child);
    }

    /* Dead: the thread is gone, a zombie (killed, not yet reaped: a parent waiting on its lock
       before reaping would hang), or its tid now names a thread with another start time. An
       owner id with start time 0 is one whose thread could not read its own /proc entry
       (evtchn_self: out of file descriptors, say): its start is unknown, so only existence
       counts (else the live thread's locks would look like a reused tid's and be taken). */
    static inline int evlock_owner_dead(uint64_t owner) {
        char state = 0;
        uint64_t start = 0;
        int r = evtchn_proc_stat((uint32_t)(owner & EVTCHN_OWNER_TID_MASK), &state, &start);
        if (r < 0)
            return 1;
        if (r == 0)
            return 0;
        if (state == 'Z' || state == 'X' || state == 'x')
            return 1;
        if ((owner >> 32) == 0)
            return 0;
        return (start & EVTCHN_OWNER_START_MASK) != (owner >> 32);
    }

    /* Robust process-shared spinlock: the u64 word holds the owner id, 0 when free. Storing the
       owner (not just 1) is what lets a waiter notice that the holder died with the lock held
       (SIGKILL, crash) and take it over, so no process can hang the others forever. The spin
       policy is evtchn.layout's (LOCK_SPINS, LOCK_YIELDS_PER_CHECK), set by evlock_set_policy:
       spins with a CPU relax, then a yield per look, and a liveness check every so many
       yields. */
    static unsigned evlock_spins = 100;
    static unsigned evlock_yields_per_check = 256;

    static inline void evlock_set_policy(unsigned spins, unsigned yields_per_check) {
        evlock_spins = spins;
        evlock_yields_per_check = yields_per_check ? yields_per_check : 1;
    }

    static inline int evlock_try(uint64_t *w, uint64_t me) {
        uint64_t free_ = 0;
        return __atomic_compare_exchange_n(w, &free_, me, 0,
                                           __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    }

    /* Take the lock; 1 once taken, 0 if slice_ns (>= 0) passed first. */
    static inline int evlock_acquire_for(uint64_t *w, uint64_t me, int64_t slice_ns) {
        unsigned spins = 0, yields = 0;
        int64_t deadline = slice_ns >= 0 ? monotonic_ns() + slice_ns : -1;
        for (;;) {
            /* Read before CAS: waiters share the line instead of bouncing it in exclusive state. */
            uint64_t owner = __atomic_load_n(w, __ATOMIC_RELAXED);
            if (owner == 0) {
                if (__atomic_compare_exchange_n(w, &owner, me, 0,
                                                __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                    return 1;
                continue;
            }
            if (spins < evlock_spins) {
                spins++;
                cpu_relax();
                continue;
            }
            /* The holder may be descheduled (more processes than CPUs): give it the CPU. */
            sched_yield();
            if (++yields % evlock_yields_per_check == 0 && evlock_owner_dead(owner)) {
                /* CAS from the dead owner: if several waiters noticed, exactly one wins. */
                if (__atomic_compare_exchange_n(w, &owner, me, 0,
                                                __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                    return 1;
            }
            if (deadline >= 0 && monotonic_ns() >= deadline)
                return 0;
        }
    }

    static inline void evlock_acquire(uint64_t *w, uint64_t me) { evlock_acquire_for(w, me, -1); }

    /* Take the lock if it is free or its owner is dead (a robust trylock); 0 if a live owner
       holds it. */
    static inline int evlock_try_robust(uint64_t *w, uint64_t me) {
        int round;
        for (round = 0; round < 2; round++) {
            uint64_t owner = 0;
            if (__atomic_compare_exchange_n(w, &owner, me, 0,
                                            __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
                return 1;
            if (owner != 0) {
                if (!evlock_owner_dead(owner))
                    return 0;
                return __atomic_compare_exchange_n(w, &owner, me, 0,
                                                   __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
            }
        }
        return 0;
    }

    static inline void evlock_release(uint64_t *w) { __atomic_store_n(w, 0, __ATOMIC_RELEASE); }
    #endif /* EVTCHN_ATOMICS_H */
    """
    # Acquire load, release store, relaxed variants.
    uint8_t at_load8(const uint8_t *p) noexcept
    uint16_t at_load16(const uint16_t *p) noexcept
    uint32_t at_load32(const uint32_t *p) noexcept
    uint8_t at_load_sc8(const uint8_t *p) noexcept        # seq_cst: Dekker without a fence
    uint32_t at_load_sc32(const uint32_t *p) noexcept
    uint64_t at_load_sc64(const uint64_t *p) noexcept
    uint64_t at_load64(const uint64_t *p) noexcept
    uint8_t at_load_relaxed8(const uint8_t *p) noexcept
    uint16_t at_load_relaxed16(const uint16_t *p) noexcept
    uint32_t at_load_relaxed32(const uint32_t *p) noexcept
    uint64_t at_load_relaxed64(const uint64_t *p) noexcept
    void at_store8(uint8_t *p, uint8_t v) noexcept
    void at_store16(uint16_t *p, uint16_t v) noexcept
    void at_store32(uint32_t *p, uint32_t v) noexcept
    void at_store64(uint64_t *p, uint64_t v) noexcept
    void at_store_relaxed8(uint8_t *p, uint8_t v) noexcept
    void at_store_relaxed16(uint16_t *p, uint16_t v) noexcept
    void at_store_relaxed32(uint32_t *p, uint32_t v) noexcept
    void at_store_relaxed64(uint64_t *p, uint64_t v) noexcept

    # Read-modify-write, seq_cst, returning the old value.
    uint8_t at_fetch_or8(uint8_t *p, uint8_t v) noexcept
    uint16_t at_fetch_or16(uint16_t *p, uint16_t v) noexcept
    uint32_t at_fetch_or32(uint32_t *p, uint32_t v) noexcept
    uint64_t at_fetch_or64(uint64_t *p, uint64_t v) noexcept
    uint8_t at_fetch_and8(uint8_t *p, uint8_t v) noexcept
    uint16_t at_fetch_and16(uint16_t *p, uint16_t v) noexcept
    uint32_t at_fetch_and32(uint32_t *p, uint32_t v) noexcept
    uint64_t at_fetch_and64(uint64_t *p, uint64_t v) noexcept
    uint8_t at_fetch_add8(uint8_t *p, uint8_t v) noexcept
    uint16_t at_fetch_add16(uint16_t *p, uint16_t v) noexcept
    uint32_t at_fetch_add32(uint32_t *p, uint32_t v) noexcept
    uint64_t at_fetch_add64(uint64_t *p, uint64_t v) noexcept
    uint8_t at_fetch_sub8(uint8_t *p, uint8_t v) noexcept
    uint16_t at_fetch_sub16(uint16_t *p, uint16_t v) noexcept
    uint32_t at_fetch_sub32(uint32_t *p, uint32_t v) noexcept
    uint64_t at_fetch_sub64(uint64_t *p, uint64_t v) noexcept
    uint8_t at_exchange8(uint8_t *p, uint8_t v) noexcept
    uint16_t at_exchange16(uint16_t *p, uint16_t v) noexcept
    uint32_t at_exchange32(uint32_t *p, uint32_t v) noexcept
    uint64_t at_exchange64(uint64_t *p, uint64_t v) noexcept
    int at_cas8(uint8_t *p, uint8_t *expected, uint8_t desired) noexcept
    int at_cas16(uint16_t *p, uint16_t *expected, uint16_t desired) noexcept
    int at_cas32(uint32_t *p, uint32_t *expected, uint32_t desired) noexcept
    int at_cas64(uint64_t *p, uint64_t *expected, uint64_t desired) noexcept

    # Old value (0/1) of bit `bit`, which is then set / cleared.
    int at_test_and_set_bit8(uint8_t *p, unsigned bit) noexcept
    int at_test_and_set_bit16(uint16_t *p, unsigned bit) noexcept
    int at_test_and_set_bit32(uint32_t *p, unsigned bit) noexcept
    int at_test_and_set_bit64(uint64_t *p, unsigned bit) noexcept
    int at_test_and_clear_bit8(uint8_t *p, unsigned bit) noexcept
    int at_test_and_clear_bit16(uint16_t *p, unsigned bit) noexcept
    int at_test_and_clear_bit32(uint32_t *p, unsigned bit) noexcept
    int at_test_and_clear_bit64(uint64_t *p, unsigned bit) noexcept

    void at_fence() noexcept
    void cpu_relax() noexcept
    int64_t monotonic_ns() noexcept

    # 0 (woken, or *addr != expected), ETIMEDOUT, EINTR; timeout_ns < 0: no timeout.
    int futex_wait_u32(uint32_t *addr, uint32_t expected, int64_t timeout_ns) noexcept
    # Number of waiters woken, or -errno.
    int futex_wake_u32(uint32_t *addr, int n) noexcept

    # Lock owners: this thread's id, and whether an owner id's thread died.
    uint64_t evtchn_self() noexcept
    uint64_t evtchn_make_owner(uint32_t tid, uint64_t start) noexcept
    int evtchn_owner_init() noexcept
    int evlock_owner_dead(uint64_t owner) noexcept
    unsigned EVTCHN_OWNER_TID_MASK
    unsigned EVTCHN_OWNER_START_MASK

    # Robust spinlock on a u64 word holding the owner id (0 = free).
    void evlock_set_policy(unsigned spins, unsigned yields_per_check) noexcept
    void evlock_acquire(uint64_t *w, uint64_t me) noexcept
    int evlock_acquire_for(uint64_t *w, uint64_t me, int64_t slice_ns) noexcept
    int evlock_try(uint64_t *w, uint64_t me) noexcept
    int evlock_try_robust(uint64_t *w, uint64_t me) noexcept
    void evlock_release(uint64_t *w) noexcept
    unsigned evlock_spins
    unsigned evlock_yields_per_check
