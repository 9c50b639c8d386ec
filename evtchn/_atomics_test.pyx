# cython: boundscheck=True
"""Python-callable wrappers over evtchn._atomics, for the tests only (the kernels cimport it).

Each wrapper takes a C-contiguous numpy array of uint8/16/32/64 and an index, so tests can run
the helpers on memory that other processes map too. Bounds are checked even in release builds:
a wrong index from Python must raise, not scribble over a shared segment.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

from evtchn cimport _atomics as A

A.evtchn_owner_init()   # a forked child computes its own owner id

ctypedef fused word:
    uint8_t
    uint16_t
    uint32_t
    uint64_t

# Values arrive as uint64_t and are truncated to the array's width, as C would: a fused scalar
# argument would make the dispatch depend on the Python int's size instead of the array's.


def load(word[::1] a, Py_ssize_t i):
    if word is uint8_t:
        return A.at_load8(&a[i])
    elif word is uint16_t:
        return A.at_load16(&a[i])
    elif word is uint32_t:
        return A.at_load32(&a[i])
    else:
        return A.at_load64(&a[i])


def load_relaxed(word[::1] a, Py_ssize_t i):
    if word is uint8_t:
        return A.at_load_relaxed8(&a[i])
    elif word is uint16_t:
        return A.at_load_relaxed16(&a[i])
    elif word is uint32_t:
        return A.at_load_relaxed32(&a[i])
    else:
        return A.at_load_relaxed64(&a[i])


def store(word[::1] a, Py_ssize_t i, uint64_t v):
    if word is uint8_t:
        A.at_store8(&a[i], <word>v)
    elif word is uint16_t:
        A.at_store16(&a[i], <word>v)
    elif word is uint32_t:
        A.at_store32(&a[i], <word>v)
    else:
        A.at_store64(&a[i], <word>v)


def store_relaxed(word[::1] a, Py_ssize_t i, uint64_t v):
    if word is uint8_t:
        A.at_store_relaxed8(&a[i], <word>v)
    elif word is uint16_t:
        A.at_store_relaxed16(&a[i], <word>v)
    elif word is uint32_t:
        A.at_store_relaxed32(&a[i], <word>v)
    else:
        A.at_store_relaxed64(&a[i], <word>v)


def fetch_or(word[::1] a, Py_ssize_t i, uint64_t v):
    if word is uint8_t:
        return A.at_fetch_or8(&a[i], <word>v)
    elif word is uint16_t:
        return A.at_fetch_or16(&a[i], <word>v)
    elif word is uint32_t:
        return A.at_fetch_or32(&a[i], <word>v)
    else:
        return A.at_fetch_or64(&a[i], <word>v)


def fetch_and(word[::1] a, Py_ssize_t i, uint64_t v):
    if word is uint8_t:
        return A.at_fetch_and8(&a[i], <word>v)
    elif word is uint16_t:
        return A.at_fetch_and16(&a[i], <word>v)
    elif word is uint32_t:
        return A.at_fetch_and32(&a[i], <word>v)
    else:
        return A.at_fetch_and64(&a[i], <word>v)


def fetch_add(word[::1] a, Py_ssize_t i, uint64_t v):
    if word is uint8_t:
        return A.at_fetch_add8(&a[i], <word>v)
    elif word is uint16_t:
        return A.at_fetch_add16(&a[i], <word>v)
    elif word is uint32_t:
        return A.at_fetch_add32(&a[i], <word>v)
    else:
        return A.at_fetch_add64(&a[i], <word>v)


def fetch_sub(word[::1] a, Py_ssize_t i, uint64_t v):
    if word is uint8_t:
        return A.at_fetch_sub8(&a[i], <word>v)
    elif word is uint16_t:
        return A.at_fetch_sub16(&a[i], <word>v)
    elif word is uint32_t:
        return A.at_fetch_sub32(&a[i], <word>v)
    else:
        return A.at_fetch_sub64(&a[i], <word>v)


def exchange(word[::1] a, Py_ssize_t i, uint64_t v):
    if word is uint8_t:
        return A.at_exchange8(&a[i], <word>v)
    elif word is uint16_t:
        return A.at_exchange16(&a[i], <word>v)
    elif word is uint32_t:
        return A.at_exchange32(&a[i], <word>v)
    else:
        return A.at_exchange64(&a[i], <word>v)


def cas(word[::1] a, Py_ssize_t i, uint64_t expected, uint64_t desired):
    """(1, expected) if a[i] was `expected` and is now `desired`, else (0, what a[i] held)."""
    cdef word e = <word>expected
    cdef int ok
    if word is uint8_t:
        ok = A.at_cas8(&a[i], &e, <word>desired)
    elif word is uint16_t:
        ok = A.at_cas16(&a[i], &e, <word>desired)
    elif word is uint32_t:
        ok = A.at_cas32(&a[i], &e, <word>desired)
    else:
        ok = A.at_cas64(&a[i], &e, <word>desired)
    return ok, e


cdef inline void _check_bit(Py_ssize_t width, unsigned bit) except *:
    if bit >= width * 8:
        raise ValueError(f"bit {bit} outside a {width * 8}-bit word")


def test_and_set_bit(word[::1] a, Py_ssize_t i, unsigned bit):
    _check_bit(sizeof(word), bit)
    if word is uint8_t:
        return A.at_test_and_set_bit8(&a[i], bit)
    elif word is uint16_t:
        return A.at_test_and_set_bit16(&a[i], bit)
    elif word is uint32_t:
        return A.at_test_and_set_bit32(&a[i], bit)
    else:
        return A.at_test_and_set_bit64(&a[i], bit)


def test_and_clear_bit(word[::1] a, Py_ssize_t i, unsigned bit):
    _check_bit(sizeof(word), bit)
    if word is uint8_t:
        return A.at_test_and_clear_bit8(&a[i], bit)
    elif word is uint16_t:
        return A.at_test_and_clear_bit16(&a[i], bit)
    elif word is uint32_t:
        return A.at_test_and_clear_bit32(&a[i], bit)
    else:
        return A.at_test_and_clear_bit64(&a[i], bit)


def fence():
    A.at_fence()


def relax():
    A.cpu_relax()


def clock_ns():
    return A.monotonic_ns()


def hammer_fetch_add(uint64_t[::1] a, Py_ssize_t i, Py_ssize_t n):
    """a[i] += 1, n times, each one an atomic fetch_add."""
    cdef uint64_t *p = &a[i]
    cdef Py_ssize_t _k
    with nogil:
        for _k in range(n):
            A.at_fetch_add64(p, 1)


def locked_increment(uint64_t[::1] lock, Py_ssize_t li, uint64_t[::1] counter, Py_ssize_t ci,
                     Py_ssize_t n, uint64_t owner):
    """n times: take the lock at lock[li] as `owner`, counter[ci] += 1, release."""
    cdef uint64_t *w = &lock[li]
    cdef uint64_t *c = &counter[ci]
    cdef Py_ssize_t _k
    with nogil:
        for _k in range(n):
            A.evlock_acquire(w, owner)
            c[0] += 1       # a plain load and store: only the lock keeps the count exact
            A.evlock_release(w)


def lock_acquire(uint64_t[::1] lock, Py_ssize_t i, uint64_t owner):
    with nogil:
        A.evlock_acquire(&lock[i], owner)


def lock_acquire_for(uint64_t[::1] lock, Py_ssize_t i, uint64_t owner, int64_t slice_ns):
    """1 once taken, 0 if slice_ns passed first."""
    cdef int r
    with nogil:
        r = A.evlock_acquire_for(&lock[i], owner, slice_ns)
    return r


def lock_try(uint64_t[::1] lock, Py_ssize_t i, uint64_t owner):
    return A.evlock_try(&lock[i], owner)


def lock_try_robust(uint64_t[::1] lock, Py_ssize_t i, uint64_t owner):
    return A.evlock_try_robust(&lock[i], owner)


def lock_release(uint64_t[::1] lock, Py_ssize_t i):
    A.evlock_release(&lock[i])


def owner_self():
    """The calling thread's owner id (tid and start time)."""
    return A.evtchn_self()


def owner_dead(uint64_t owner):
    return bool(A.evlock_owner_dead(owner))


def futex_wait(uint32_t[::1] a, Py_ssize_t i, uint32_t expected, int64_t timeout_ns):
    """0 (woken or a[i] != expected), errno.ETIMEDOUT or errno.EINTR."""
    cdef uint32_t *p = &a[i]
    cdef int rc
    with nogil:
        rc = A.futex_wait_u32(p, expected, timeout_ns)
    return rc


def futex_wake(uint32_t[::1] a, Py_ssize_t i, int n):
    """Number of waiters woken (or -errno)."""
    return A.futex_wake_u32(&a[i], n)
