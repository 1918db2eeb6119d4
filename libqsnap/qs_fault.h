/*
 * qs_fault.h - the fault-injecting host file layer.
 *
 * A wrapper over any qs_io that fails chosen calls and, in volatile mode,
 * behaves like a disk with a write cache that loses part of its contents
 * on power loss.  It is off unless a test turns it on, in one of two ways:
 *
 *   In process: qs_faultio_new() wraps an io the test made (the unit suites
 *   wrap the in-memory back-end) and the qs_faultio_*() calls arm it.
 *
 *   From the environment: when QSNAP_FAULT is set (and the program is not
 *   set-id), every file the library opens is wrapped, with one plan shared
 *   by all of them, so a front end run by a test script fails where the
 *   script asks:
 *
 *     QSNAP_FAULT=OP:N[:ERR]         the Nth OP call (counted over all files
 *                                    from program start) fails once with ERR
 *                                    (EIO, the default, or ENOSPC); OP is
 *                                    write, flush, falloc, reserve, punch or
 *                                    truncate
 *     QSNAP_FAULT=powercut:N[:SEED[:PERCENT]]
 *                                    every file runs with a write cache; the
 *                                    Nth modifying call (write, flush, punch,
 *                                    truncate, falloc or reserve, over all
 *                                    files)
 *                                    never happens: the power fails first,
 *                                    each cached operation survives with
 *                                    PERCENT% chance (default 50, chosen by
 *                                    SEED), and every later call fails
 *                                    with EIO
 *
 *   QSNAP_FAULT_LOG names a file to which each injected fault appends one
 *   line, so a script can tell "failed here" from "ran past the end".  The
 *   library itself never prints.
 *
 * Write cache model: writes reach the inner io at once (so reads see them)
 * and the wrapper keeps, for every write, punch, truncation or
 * allocation since the last flush, what it overwrote.  Power loss undoes
 * all of them, newest first, which restores the flushed state, then
 * replays the survivors in their original order.  A flush that succeeds
 * empties the cache.
 */
#ifndef QS_FAULT_H
#define QS_FAULT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qs_io.h"

enum qs_fault_op {
    QS_FAULT_READ,
    QS_FAULT_WRITE,
    QS_FAULT_FLUSH,
    QS_FAULT_PUNCH,
    QS_FAULT_TRUNCATE,
    QS_FAULT_FALLOC,
    QS_FAULT_RESERVE, /* space reserved ahead (qs_io_reserve) */
    QS_FAULT_N_OPS
};

/* Wraps `inner` (owned from now on, closed with the wrapper); NULL if out
 * of memory (inner is closed then). */
qs_io *qs_faultio_new(qs_io *inner);
qs_io *qs_faultio_inner(qs_io *fio);
/*
 * Arms a fault: the nth call of `op` from now (n >= 1) fails with -err
 * (err positive, e.g. EIO or ENOSPC).  With `sticky` every later call of
 * that kind fails too.  n == 0 disarms.
 */
void qs_faultio_fail_nth(qs_io *fio, enum qs_fault_op op, unsigned long n,
                         int err, bool sticky);
/* Calls of `op` since the wrapper was made. */
unsigned long qs_faultio_calls(qs_io *fio, enum qs_fault_op op);
/* Calls that failed because of an armed fault. */
unsigned long qs_faultio_injected(qs_io *fio);

/* Starts or stops write caching; stopping first flushes.  0 or -errno. */
int qs_faultio_set_volatile(qs_io *fio, bool on);
/* Operations waiting in the write cache. */
size_t qs_faultio_pending(qs_io *fio);

/* Decides whether pending operation `idx` survives a crash. */
typedef bool (*qs_faultio_keep_fn)(void *opaque, size_t idx,
                                   enum qs_fault_op op, uint64_t off,
                                   uint64_t len);
/*
 * Power loss: keeps the pending operations `keep` accepts (all if keep is
 * NULL) and undoes the others.  Afterwards every call fails with -EIO.
 * Returns the number of operations dropped or -errno.
 */
int qs_faultio_crash(qs_io *fio, qs_faultio_keep_fn keep, void *opaque);
/* As qs_faultio_crash, keeping each operation with `keep_percent` chance. */
int qs_faultio_crash_random(qs_io *fio, uint64_t seed, unsigned keep_percent);

/*
 * Called by the POSIX back-end for every file it opens: wraps *io when
 * QSNAP_FAULT asks for it, otherwise leaves it alone.  0, or -errno with a
 * message in err (a QSNAP_FAULT that does not parse; *io is closed).
 */
int qs_fault_env_wrap(const char *path, qs_io **io, char *err, size_t errlen);

#endif /* QS_FAULT_H */
