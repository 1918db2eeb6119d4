/*
 * mt_stress.c - many threads sharing one qsnap_image handle.
 *
 * The workers split the virtual disk into disjoint byte regions whose
 * boundaries fall inside clusters (so neighbours share a cluster), and each
 * keeps a model: what every byte of its region must read as.  On the one
 * shared handle they write, read, discard, zero, write compressed
 * clusters, flush, ask for block status and read, through views, the
 * snapshots taken before they started.  Every read of a worker's own bytes
 * must match its model exactly, and every read of a snapshot must match
 * the copy of the disk kept when the snapshot was taken.
 *
 * include/qsnap.h documents a handle as shared by any number of threads,
 * with snapshot calls taking the image lock exclusively and views readable
 * while other threads write the live disk.  So one more thread creates,
 * reads and deletes snapshots while the workers run.  To know what such a
 * snapshot must hold, it holds back the workers' changes (with a lock of
 * this program's own, not the library's) while it creates the snapshot and
 * copies the models; it also creates snapshots without holding anyone
 * back, which are read but not compared, and deleted at once, and saves
 * checkpoints with VM state (the section container, whose encoding and
 * writing run on threads of the library's own) that must read back
 * exactly before they are deleted.
 *
 * At the end the disk and every snapshot are compared in full, qsnap_check
 * must find nothing, the image is closed, reopened and compared again, and
 * `$QEMU_IMG check` (when QEMU_IMG names a program) must pass.
 *
 * Exit status: 0 success, 1 a mismatch or a failed call, 2 usage.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <qsnap.h>

#define PROG "mt_stress"
#define N_PRE 2   /* snapshots taken before the workers start */
#define MAX_DYN 3 /* snapshots the snapshot thread keeps at once */
#define HIST 128  /* changes each thread remembers, for reports */
#define MAX_IOV 4 /* pieces a request is cut into */
#define CHUNK (1024u * 1024u)

extern char **environ;

static const char *const pre_names[N_PRE] = {"pre-a", "pre-b"};

enum op {
    OP_WRITE,
    OP_READ,
    OP_WIDE_READ,
    OP_DISCARD,
    OP_ZERO,
    OP_COMPRESSED,
    OP_FLUSH,
    OP_STATUS,
    OP_VIEW,
    OP_INFO,
    OP_SNAP_CREATE,
    OP_SNAP_RACE,
    OP_SNAP_VERIFY,
    OP_SNAP_DELETE,
    OP_SNAP_LIST,
    OP_SNAP_BUSY,
    OP_SNAP_CKPT,
    N_OPS
};

static const char *const op_names[N_OPS] = {
    "write",       "read",      "wide-read",   "discard",     "zero",
    "compress",    "flush",     "status",      "view",        "info",
    "snap-create", "snap-race", "snap-verify", "snap-delete", "snap-list",
    "snap-busy",   "snap-ckpt",
};

/* Relative weights of the workers' operations (per mille). */
static const struct {
    enum op op;
    unsigned weight;
} worker_mix[] = {
    {OP_WRITE, 300}, {OP_READ, 220},      {OP_WIDE_READ, 60}, {OP_DISCARD, 50},
    {OP_ZERO, 50},   {OP_COMPRESSED, 30}, {OP_FLUSH, 20},     {OP_STATUS, 110},
    {OP_VIEW, 130},  {OP_INFO, 30},
};

struct config {
    unsigned threads;
    double seconds;      /* 0: no time limit */
    uint64_t iterations; /* operations per worker; 0: no count limit */
    uint64_t seed;
    uint32_t cluster_size;
    uint64_t size;
    uint64_t cache_size;
    int compression; /* enum qsnap_compression */
    bool snapshots;  /* run the snapshot thread */
    bool aligned;    /* region boundaries on cluster boundaries */
    bool keep;
    bool verbose;
    const char *path;
    const char *dump_dir;
};

/* xoshiro256** */
struct rng {
    uint64_t s[4];
};

struct op_rec {
    uint64_t seq;
    uint64_t off;
    uint64_t len;
    enum op op;
};

/* A disk image kept for a snapshot: what reads of it must return. */
struct snapcopy {
    char name[32];
    uint8_t *data;
    bool live;
};

struct stress;

/* One thread's state (workers, the snapshot thread, the main thread). */
struct actor {
    struct stress *st;
    unsigned idx;
    const char *label;
    uint64_t lo, hi; /* the guest bytes this thread owns */
    struct rng rng;
    uint64_t counts[N_OPS];
    uint8_t *buf;  /* read buffer, max_io bytes */
    uint8_t *data; /* write buffer, max_io bytes */
    struct op_rec hist[HIST];
    uint64_t n_hist;
    unsigned snap_seq;
    pthread_t tid;
};

struct stress {
    const struct config *cfg;
    qsnap_image *img;
    uint64_t size;
    uint64_t cs;
    uint64_t max_io;
    uint8_t *model; /* the whole disk; each worker changes only its part */
    struct snapcopy pre[N_PRE];
    struct snapcopy dyn[MAX_DYN];
    double deadline;

    /*
     * Workers hold `hold` shared from just before a change until their
     * model says what it did; the snapshot thread takes it exclusively to
     * create a snapshot that matches the model.  `hold_wanted` makes the
     * workers step back so that it gets it.
     */
    pthread_rwlock_t hold;
    atomic_int hold_wanted;
    atomic_bool stop;
    atomic_bool failed;
    pthread_mutex_t print_mtx;

    unsigned n_workers;
    struct actor *workers;
};

/* ------------------------------------------------------------------ */
/* Helpers                                                            */
/* ------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);

    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void rng_seed(struct rng *r, uint64_t seed)
{
    for (int i = 0; i < 4; i++) {
        r->s[i] = splitmix64(&seed);
    }
}

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t rng_next(struct rng *r)
{
    uint64_t *s = r->s;
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;

    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

/* A number in [0, n). */
static uint64_t rng_below(struct rng *r, uint64_t n)
{
    return n ? rng_next(r) % n : 0;
}

static double now_sec(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

static uint64_t max_u64(uint64_t a, uint64_t b)
{
    return a > b ? a : b;
}

static void *xmalloc(size_t len)
{
    void *p = malloc(len ? len : 1);

    if (!p) {
        fprintf(stderr, PROG ": out of memory (%zu bytes)\n", len);
        exit(1);
    }
    return p;
}

static bool all_zero(const uint8_t *p, uint64_t len)
{
    for (uint64_t i = 0; i < len; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

static bool stopping(struct stress *st)
{
    return atomic_load_explicit(&st->stop, memory_order_relaxed);
}

/* ------------------------------------------------------------------ */
/* Reports                                                            */
/* ------------------------------------------------------------------ */

static void fail(struct actor *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Reports a failure of thread `a` and makes every thread stop. */
static void fail(struct actor *a, const char *fmt, ...)
{
    struct stress *st = a->st;
    va_list ap;

    atomic_store(&st->failed, true);
    atomic_store(&st->stop, true);
    pthread_mutex_lock(&st->print_mtx);
    fprintf(stderr, PROG ": FAIL: [%s] ", a->label);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    pthread_mutex_unlock(&st->print_mtx);
}

/* Reports a call that returned `ret` < 0, with the handle's message. */
static void call_failed(struct actor *a, const char *call, uint64_t off,
                        uint64_t len, int ret)
{
    char msg[1024];

    qsnap_errmsg_copy(a->st->img, msg, sizeof(msg));
    fail(a, "%s at 0x%" PRIx64 "+0x%" PRIx64 ": %s (%s)", call, off, len,
         qsnap_strerror(ret), msg);
}

static void record(struct actor *a, enum op op, uint64_t off, uint64_t len)
{
    struct op_rec *r = &a->hist[a->n_hist % HIST];

    r->seq = a->n_hist++;
    r->op = op;
    r->off = off;
    r->len = len;
}

/* Prints the remembered changes of `owner` touching guest_off's cluster. */
static void print_history(struct stress *st, const struct actor *owner,
                          uint64_t guest_off)
{
    const uint64_t c_lo = guest_off / st->cs * st->cs;
    const uint64_t c_hi = c_lo + st->cs;
    const uint64_t n = min_u64(owner->n_hist, HIST);
    unsigned shown = 0;

    pthread_mutex_lock(&st->print_mtx);
    fprintf(stderr,
            PROG ":   %s's last changes touching cluster 0x%" PRIx64
                 " (newest first, of %" PRIu64 "):\n",
            owner->label, c_lo, owner->n_hist);
    for (uint64_t i = 0; i < n; i++) {
        const struct op_rec *r = &owner->hist[(owner->n_hist - 1 - i) % HIST];
        if (r->off < c_hi && r->off + r->len > c_lo) {
            fprintf(stderr,
                    PROG ":     #%" PRIu64 " %s 0x%" PRIx64 "+0x%" PRIx64
                         "%s\n",
                    r->seq, op_names[r->op], r->off, r->len,
                    (guest_off >= r->off && guest_off < r->off + r->len)
                        ? " (covers it)"
                        : "");
            shown++;
        }
    }
    if (!shown) {
        fprintf(stderr, PROG ":     none remembered\n");
    }
    pthread_mutex_unlock(&st->print_mtx);
}

static const struct actor *owner_of(const struct stress *st, uint64_t off)
{
    for (unsigned i = 0; i < st->n_workers; i++) {
        if (off >= st->workers[i].lo && off < st->workers[i].hi) {
            return &st->workers[i];
        }
    }
    return NULL;
}

/*
 * Compares what a read of [off, off + len) returned with what it must
 * return; on a difference reports it (naming `what`) and returns false.
 * `live` says the read was of the live disk, whose history is worth
 * printing.
 */
static bool same(struct actor *a, const char *what, const uint8_t *got,
                 const uint8_t *want, uint64_t off, uint64_t len, bool live)
{
    if (memcmp(got, want, len) == 0) {
        return true;
    }
    uint64_t i = 0;
    while (got[i] == want[i]) {
        i++;
    }
    uint64_t n_diff = 0;
    uint64_t last = i;
    for (uint64_t j = i; j < len; j++) {
        if (got[j] != want[j]) {
            n_diff++;
            last = j;
        }
    }
    fail(a,
         "%s at 0x%" PRIx64 "+0x%" PRIx64 ": first difference at guest "
         "offset 0x%" PRIx64 " (read 0x%02x, expected 0x%02x); %" PRIu64
         " bytes differ, the last at 0x%" PRIx64,
         what, off, len, off + i, got[i], want[i], n_diff, off + last);
    if (live) {
        struct stress *st = a->st;
        const struct actor *owner = owner_of(st, off + i);
        uint64_t pnum = 0, host = 0;
        unsigned flags = 0;
        int depth = 0;
        const int ret = qsnap_block_status(st->img, off + i, 1, &pnum, &flags,
                                           &host, &depth);
        pthread_mutex_lock(&st->print_mtx);
        fprintf(stderr,
                PROG ":   block status there now: ret %d flags 0x%x host "
                     "0x%" PRIx64 "\n",
                ret, flags, host);
        pthread_mutex_unlock(&st->print_mtx);
        if (owner) {
            print_history(st, owner, off + i);
        }
        if (owner != a) {
            print_history(st, a, off + i);
        }
    }
    return false;
}

/* ------------------------------------------------------------------ */
/* Choosing requests                                                  */
/* ------------------------------------------------------------------ */

/* A request length in [1, max]: mostly small, sometimes several clusters. */
static uint64_t pick_len(struct actor *a, uint64_t max)
{
    const struct stress *st = a->st;
    const uint64_t r = rng_below(&a->rng, 100);
    uint64_t cap;

    if (r < 35) {
        cap = 512;
    } else if (r < 65) {
        cap = st->cs;
    } else if (r < 90) {
        cap = 4 * st->cs + st->cs / 2;
    } else {
        cap = st->max_io;
    }
    cap = min_u64(min_u64(cap, max), st->max_io);
    return 1 + rng_below(&a->rng, cap);
}

/* A start in [lo, hi - len]: anywhere, on a sector, or near a cluster. */
static uint64_t pick_off(struct actor *a, uint64_t lo, uint64_t hi,
                         uint64_t len)
{
    const uint64_t cs = a->st->cs;
    const uint64_t last = hi - len;
    uint64_t off = lo + rng_below(&a->rng, last - lo + 1);

    switch (rng_below(&a->rng, 4)) {
    case 1:
        off &= ~(uint64_t)511;
        break;
    case 2:
        off = off / cs * cs;
        break;
    case 3: {
        const uint64_t d = rng_below(&a->rng, 1201);
        off = off / cs * cs + d;
        off = off >= 600 ? off - 600 : 0;
        break;
    }
    default:
        break;
    }
    if (off < lo) {
        off = lo;
    }
    if (off > last) {
        off = last;
    }
    return off;
}

/* Fills p with random bytes, zero runs, a repeating stamp or zeros. */
static void fill_data(struct actor *a, uint8_t *p, uint64_t len,
                      bool compressible)
{
    const uint64_t r = rng_below(&a->rng, 100);

    if (r < 4) {
        memset(p, 0, len);
        return;
    }
    if (compressible || r < 25) {
        uint8_t stamp[16];
        uint64_t v = rng_next(&a->rng);
        memcpy(stamp, &v, 8);
        stamp[8] = (uint8_t)a->idx;
        memset(stamp + 9, 0, 7);
        for (uint64_t i = 0; i < len; i++) {
            p[i] = stamp[i % 16];
        }
        return;
    }
    uint64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const uint64_t v = rng_next(&a->rng);
        memcpy(p + i, &v, 8);
    }
    if (i < len) {
        const uint64_t v = rng_next(&a->rng);
        memcpy(p + i, &v, (size_t)(len - i));
    }
    if (r < 40) {
        const unsigned holes = 1 + (unsigned)rng_below(&a->rng, 4);
        for (unsigned h = 0; h < holes; h++) {
            const uint64_t at = rng_below(&a->rng, len);
            const uint64_t n = 1 + rng_below(&a->rng, len - at);
            memset(p + at, 0, (size_t)n);
        }
    }
}

/* Cuts [p, p + len) into 1..MAX_IOV non-empty pieces. */
static int split_iov(struct actor *a, uint8_t *p, uint64_t len,
                     struct iovec *iov)
{
    uint64_t n = 1 + rng_below(&a->rng, MAX_IOV);
    uint64_t left = len;

    if (n > len) {
        n = len;
    }
    for (uint64_t i = 0; i < n; i++) {
        const uint64_t piece =
            i == n - 1 ? left : 1 + rng_below(&a->rng, left - (n - 1 - i));
        iov[i].iov_base = p;
        iov[i].iov_len = (size_t)piece;
        p += piece;
        left -= piece;
    }
    return (int)n;
}

/* ------------------------------------------------------------------ */
/* Changes: the request and the model update, as one step             */
/* ------------------------------------------------------------------ */

static void change_begin(struct stress *st)
{
    /* Sleep rather than spin: the holder has a model to copy. */
    while (atomic_load_explicit(&st->hold_wanted, memory_order_relaxed)) {
        const struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    pthread_rwlock_rdlock(&st->hold);
}

static void change_end(struct stress *st)
{
    pthread_rwlock_unlock(&st->hold);
}

static void do_write(struct actor *a, uint64_t off, uint64_t len)
{
    struct stress *st = a->st;
    struct iovec iov[MAX_IOV];

    fill_data(a, a->data, len, false);
    const int n = split_iov(a, a->data, len, iov);
    record(a, OP_WRITE, off, len);
    change_begin(st);
    const int ret = qsnap_pwritev(st->img, iov, n, off);
    if (ret == 0) {
        memcpy(st->model + off, a->data, (size_t)len);
    }
    change_end(st);
    a->counts[OP_WRITE]++;
    if (ret < 0) {
        call_failed(a, "qsnap_pwritev", off, len, ret);
    }
}

static void do_zero(struct actor *a, enum op op, uint64_t off, uint64_t len)
{
    struct stress *st = a->st;
    const unsigned flags = rng_below(&a->rng, 2) ? QSNAP_ZERO_MAY_UNMAP : 0;
    int ret;

    record(a, op, off, len);
    change_begin(st);
    if (op == OP_DISCARD) {
        ret = qsnap_discard(st->img, off, len);
    } else {
        ret = qsnap_write_zeroes(st->img, off, len, flags);
    }
    if (ret == 0) {
        memset(st->model + off, 0, (size_t)len);
    }
    change_end(st);
    a->counts[op]++;
    if (ret < 0) {
        call_failed(a,
                    op == OP_DISCARD ? "qsnap_discard" : "qsnap_write_zeroes",
                    off, len, ret);
    }
}

/* Writes cluster `off` (aligned, wholly the caller's) compressed. */
static void do_compressed(struct actor *a, uint64_t off)
{
    struct stress *st = a->st;
    const uint64_t cs = st->cs;

    /* Mostly compressible; random data takes the uncompressed path. */
    fill_data(a, a->data, cs, rng_below(&a->rng, 4) != 0);
    record(a, OP_COMPRESSED, off, cs);
    change_begin(st);
    const int ret = qsnap_write_compressed(st->img, a->data, cs, off);
    if (ret == 0) {
        memcpy(st->model + off, a->data, cs);
    }
    change_end(st);
    a->counts[OP_COMPRESSED]++;
    if (ret < 0) {
        call_failed(a, "qsnap_write_compressed", off, cs, ret);
    }
}

/* ------------------------------------------------------------------ */
/* Worker operations                                                  */
/* ------------------------------------------------------------------ */

static void op_write(struct actor *a)
{
    const uint64_t len = pick_len(a, a->hi - a->lo);

    do_write(a, pick_off(a, a->lo, a->hi, len), len);
}

static void op_zero(struct actor *a, enum op op)
{
    const uint64_t len = pick_len(a, a->hi - a->lo);

    do_zero(a, op, pick_off(a, a->lo, a->hi, len), len);
}

static void op_compressed(struct actor *a)
{
    const uint64_t cs = a->st->cs;
    const uint64_t first = (a->lo + cs - 1) / cs;
    const uint64_t end = a->hi / cs;

    if (end <= first) {
        op_write(a);
        return;
    }
    do_compressed(a, (first + rng_below(&a->rng, end - first)) * cs);
}

/* Reads [off, off + len) of the live disk into a->buf, in pieces. */
static int read_live(struct actor *a, uint64_t off, uint64_t len)
{
    struct iovec iov[MAX_IOV];
    const int n = split_iov(a, a->buf, len, iov);
    const int ret = qsnap_preadv(a->st->img, iov, n, off);

    if (ret < 0) {
        call_failed(a, "qsnap_preadv", off, len, ret);
    }
    return ret;
}

static void op_read(struct actor *a)
{
    struct stress *st = a->st;
    const uint64_t len = pick_len(a, a->hi - a->lo);
    const uint64_t off = pick_off(a, a->lo, a->hi, len);

    a->counts[OP_READ]++;
    if (read_live(a, off, len) == 0) {
        same(a, "read", a->buf, st->model + off, off, len, true);
    }
}

/*
 * Reads across one end of the region into the neighbour's, which changes
 * meanwhile: only the own bytes are compared.
 */
static void op_wide_read(struct actor *a)
{
    struct stress *st = a->st;
    const uint64_t edge =
        (a->lo == 0 || (a->hi < st->size && rng_below(&a->rng, 2))) ? a->hi
                                                                    : a->lo;
    if (edge == 0 || edge == st->size) {
        op_read(a);
        return;
    }
    const uint64_t back = min_u64(edge, 1 + rng_below(&a->rng, 2 * st->cs));
    const uint64_t off = edge - back;
    const uint64_t len =
        min_u64(back + pick_len(a, st->max_io - back), st->size - off);
    a->counts[OP_WIDE_READ]++;
    if (read_live(a, off, len) < 0) {
        return;
    }
    const uint64_t o_lo = max_u64(off, a->lo);
    const uint64_t o_hi = min_u64(off + len, a->hi);
    if (o_lo < o_hi) {
        same(a, "wide read", a->buf + (o_lo - off), st->model + o_lo, o_lo,
             o_hi - o_lo, true);
    }
}

static void op_flush(struct actor *a)
{
    const int ret = qsnap_flush(a->st->img);

    a->counts[OP_FLUSH]++;
    if (ret < 0) {
        call_failed(a, "qsnap_flush", 0, 0, ret);
    }
}

/*
 * Block status over part of the region: the extents must tile the range,
 * say data or zero (there is no backing file), and a zero extent must be
 * zero in the model.
 */
static void op_status(struct actor *a)
{
    struct stress *st = a->st;
    const uint64_t len =
        min_u64(a->hi - a->lo, 1 + rng_below(&a->rng, 8 * st->cs));
    const uint64_t off = pick_off(a, a->lo, a->hi, len);
    const uint64_t end = off + len;

    a->counts[OP_STATUS]++;
    for (uint64_t p = off; p < end && !stopping(st);) {
        uint64_t pnum = 0, host = 0;
        unsigned flags = 0;
        int depth = -1;
        const int ret = qsnap_block_status(st->img, p, end - p, &pnum, &flags,
                                           &host, &depth);
        if (ret < 0) {
            call_failed(a, "qsnap_block_status", p, end - p, ret);
            return;
        }
        const bool zero = flags & QSNAP_BS_ZERO;
        const bool data = flags & QSNAP_BS_DATA;
        if (pnum == 0 || pnum > end - p || depth != 0 || zero == data) {
            fail(a,
                 "qsnap_block_status at 0x%" PRIx64 "+0x%" PRIx64
                 ": pnum 0x%" PRIx64 " flags 0x%x depth %d",
                 p, end - p, pnum, flags, depth);
            return;
        }
        if ((flags & QSNAP_BS_OFFSET) && host == 0) {
            fail(a,
                 "qsnap_block_status at 0x%" PRIx64 ": flags 0x%x "
                 "but host offset 0",
                 p, flags);
            return;
        }
        if (zero && !all_zero(st->model + p, pnum)) {
            fail(a,
                 "qsnap_block_status says 0x%" PRIx64 "+0x%" PRIx64
                 " reads as zeros (flags 0x%x), but the model has data "
                 "there",
                 p, pnum, flags);
            print_history(st, a, p);
            return;
        }
        p += pnum;
    }
}

/* Reads `n_reads` random ranges of a view and compares them with `copy`. */
static void check_view(struct actor *a, qsnap_view *v, const char *name,
                       const uint8_t *copy, unsigned n_reads)
{
    struct stress *st = a->st;
    char what[64];

    snprintf(what, sizeof(what), "view of %s", name);
    if (qsnap_view_size(v) != st->size) {
        fail(a, "%s: size %" PRIu64 ", expected %" PRIu64, what,
             qsnap_view_size(v), st->size);
        return;
    }
    for (unsigned i = 0; i < n_reads && !stopping(st); i++) {
        const uint64_t len = pick_len(a, st->size);
        const uint64_t off = pick_off(a, 0, st->size, len);
        if (rng_below(&a->rng, 4) == 0) {
            uint64_t pnum = 0;
            unsigned flags = 0;
            const int ret = qsnap_view_block_status(v, off, len, &pnum, &flags);
            if (ret < 0) {
                call_failed(a, "qsnap_view_block_status", off, len, ret);
                return;
            }
            if (pnum == 0 || pnum > len ||
                ((flags & QSNAP_BS_ZERO) && !all_zero(copy + off, pnum))) {
                fail(a,
                     "%s: block status 0x%" PRIx64 "+0x%" PRIx64
                     ": pnum 0x%" PRIx64 " flags 0x%x, not what the copy "
                     "holds",
                     what, off, len, pnum, flags);
                return;
            }
            continue;
        }
        struct iovec iov[MAX_IOV];
        const int n = split_iov(a, a->buf, len, iov);
        const int ret = qsnap_view_preadv(v, iov, n, off);
        if (ret < 0) {
            call_failed(a, "qsnap_view_preadv", off, len, ret);
            return;
        }
        if (!same(a, what, a->buf, copy + off, off, len, false)) {
            return;
        }
    }
}

static void op_view(struct actor *a)
{
    struct stress *st = a->st;
    const struct snapcopy *sc = &st->pre[rng_below(&a->rng, N_PRE)];
    qsnap_view *v;

    a->counts[OP_VIEW]++;
    const int ret = qsnap_view_open(st->img, sc->name, &v);
    if (ret < 0) {
        call_failed(a, "qsnap_view_open", 0, 0, ret);
        return;
    }
    check_view(a, v, sc->name, sc->data, 1 + (unsigned)rng_below(&a->rng, 4));
    qsnap_view_close(v);
}

static void op_info(struct actor *a)
{
    struct stress *st = a->st;
    struct qsnap_info info;

    memset(&info, 0, sizeof(info));
    info.struct_size = sizeof(info);
    a->counts[OP_INFO]++;
    const int ret = qsnap_get_info(st->img, &info);
    if (ret < 0) {
        call_failed(a, "qsnap_get_info", 0, 0, ret);
        return;
    }
    if (info.virtual_size != st->size || info.cluster_size != st->cs ||
        info.format != QSNAP_FMT_QCOW2 || info.read_only || info.corrupt ||
        info.nb_snapshots < N_PRE ||
        info.compression_type != st->cfg->compression) {
        fail(a,
             "qsnap_get_info: size %" PRIu64 " cluster %" PRIu32
             " format %d read-only %d corrupt %d snapshots %" PRIu32
             " compression %d",
             info.virtual_size, info.cluster_size, info.format, info.read_only,
             info.corrupt, info.nb_snapshots, info.compression_type);
    }
}

static void worker_step(struct actor *a)
{
    unsigned total = 0;

    for (size_t i = 0; i < sizeof(worker_mix) / sizeof(worker_mix[0]); i++) {
        total += worker_mix[i].weight;
    }
    unsigned r = (unsigned)rng_below(&a->rng, total);
    enum op op = OP_READ;
    for (size_t i = 0; i < sizeof(worker_mix) / sizeof(worker_mix[0]); i++) {
        if (r < worker_mix[i].weight) {
            op = worker_mix[i].op;
            break;
        }
        r -= worker_mix[i].weight;
    }
    switch (op) {
    case OP_WRITE:
        op_write(a);
        break;
    case OP_READ:
        op_read(a);
        break;
    case OP_WIDE_READ:
        op_wide_read(a);
        break;
    case OP_DISCARD:
    case OP_ZERO:
        op_zero(a, op);
        break;
    case OP_COMPRESSED:
        op_compressed(a);
        break;
    case OP_FLUSH:
        op_flush(a);
        break;
    case OP_STATUS:
        op_status(a);
        break;
    case OP_VIEW:
        op_view(a);
        break;
    default:
        op_info(a);
        break;
    }
}

static void *worker_main(void *opaque)
{
    struct actor *a = opaque;
    struct stress *st = a->st;
    const struct config *cfg = st->cfg;

    for (uint64_t i = 0; !stopping(st); i++) {
        if (cfg->iterations && i >= cfg->iterations) {
            break;
        }
        if (cfg->seconds > 0 && i % 8 == 0 && now_sec() >= st->deadline) {
            break;
        }
        worker_step(a);
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* The snapshot thread                                                */
/* ------------------------------------------------------------------ */

static struct snapcopy *pick_dyn(struct actor *a, bool live)
{
    struct stress *st = a->st;
    struct snapcopy *found[MAX_DYN];
    unsigned n = 0;

    for (unsigned i = 0; i < MAX_DYN; i++) {
        if (st->dyn[i].live == live) {
            found[n++] = &st->dyn[i];
        }
    }
    return n ? found[rng_below(&a->rng, n)] : NULL;
}

static bool verify_snapshot(struct actor *a, const struct snapcopy *sc,
                            unsigned n_reads)
{
    qsnap_view *v;
    const int ret = qsnap_view_open(a->st->img, sc->name, &v);

    if (ret < 0) {
        call_failed(a, "qsnap_view_open", 0, 0, ret);
        return false;
    }
    check_view(a, v, sc->name, sc->data, n_reads);
    qsnap_view_close(v);
    return !stopping(a->st);
}

static void snap_delete(struct actor *a)
{
    struct stress *st = a->st;
    struct snapcopy *sc = pick_dyn(a, true);

    if (!sc || !verify_snapshot(a, sc, 2)) {
        return;
    }
    a->counts[OP_SNAP_DELETE]++;
    int ret = qsnap_snapshot_delete(st->img, sc->name);
    if (ret < 0) {
        call_failed(a, "qsnap_snapshot_delete", 0, 0, ret);
        return;
    }
    sc->live = false;
    qsnap_view *v;
    ret = qsnap_view_open(st->img, sc->name, &v);
    if (ret != -ENOENT) {
        fail(a, "view of deleted snapshot %s: returned %d, not -ENOENT",
             sc->name, ret);
        if (ret == 0) {
            qsnap_view_close(v);
        }
    }
}

/*
 * Creates a snapshot while no worker is between a change and its model
 * update, and keeps a copy of the models: the snapshot must match it for
 * as long as it lives, whatever the workers write afterwards.
 */
static void snap_create(struct actor *a)
{
    struct stress *st = a->st;
    struct snapcopy *sc = pick_dyn(a, false);

    if (!sc) {
        snap_delete(a);
        return;
    }
    snprintf(sc->name, sizeof(sc->name), "dyn-%u", ++a->snap_seq);
    a->counts[OP_SNAP_CREATE]++;
    atomic_store_explicit(&st->hold_wanted, 1, memory_order_relaxed);
    pthread_rwlock_wrlock(&st->hold);
    const int ret = qsnap_snapshot_create(st->img, sc->name, NULL);
    if (ret == 0) {
        memcpy(sc->data, st->model, (size_t)st->size);
    }
    pthread_rwlock_unlock(&st->hold);
    atomic_store_explicit(&st->hold_wanted, 0, memory_order_relaxed);
    if (ret < 0) {
        call_failed(a, "qsnap_snapshot_create", 0, 0, ret);
        return;
    }
    sc->live = true;
    verify_snapshot(a, sc, 4);
}

/*
 * A snapshot taken in the middle of the workers' changes: its content is
 * not known exactly, but it must open, read and delete cleanly.
 */
static void snap_race(struct actor *a)
{
    struct stress *st = a->st;
    char name[32];
    qsnap_view *v;

    snprintf(name, sizeof(name), "race-%u", ++a->snap_seq);
    a->counts[OP_SNAP_RACE]++;
    int ret = qsnap_snapshot_create(st->img, name, NULL);
    if (ret < 0) {
        call_failed(a, "qsnap_snapshot_create", 0, 0, ret);
        return;
    }
    ret = qsnap_view_open(st->img, name, &v);
    if (ret < 0) {
        call_failed(a, "qsnap_view_open", 0, 0, ret);
        return;
    }
    for (unsigned i = 0; i < 4 && ret == 0; i++) {
        const uint64_t len = pick_len(a, st->size);
        const uint64_t off = pick_off(a, 0, st->size, len);
        ret = qsnap_view_pread(v, a->buf, (size_t)len, off);
        if (ret < 0) {
            call_failed(a, "qsnap_view_pread", off, len, ret);
        }
    }
    qsnap_view_close(v);
    if (ret == 0) {
        ret = qsnap_snapshot_delete(st->img, name);
        if (ret < 0) {
            call_failed(a, "qsnap_snapshot_delete", 0, 0, ret);
        }
    }
}

static void snap_verify(struct actor *a)
{
    const struct snapcopy *sc = pick_dyn(a, true);

    if (sc) {
        a->counts[OP_SNAP_VERIFY]++;
        verify_snapshot(a, sc, 6);
    }
}

/* Only this thread changes the table: it must hold exactly what we expect. */
static bool snap_list_check(struct actor *a, qsnap_image *img)
{
    struct stress *st = a->st;
    struct qsnap_snapshot_info *list;
    uint32_t count;
    unsigned expected = N_PRE;

    a->counts[OP_SNAP_LIST]++;
    const int ret = qsnap_snapshot_list(img, &list, &count);
    if (ret < 0) {
        call_failed(a, "qsnap_snapshot_list", 0, 0, ret);
        return false;
    }
    for (unsigned i = 0; i < MAX_DYN; i++) {
        expected += st->dyn[i].live;
    }
    bool ok = count == expected;
    for (unsigned i = 0; i < N_PRE + MAX_DYN && ok; i++) {
        const struct snapcopy *sc =
            i < N_PRE ? &st->pre[i] : &st->dyn[i - N_PRE];
        if (!sc->live) {
            continue;
        }
        bool found = false;
        for (uint32_t j = 0; j < count; j++) {
            if (strcmp(list[j].name, sc->name) == 0) {
                found =
                    list[j].disk_size == st->size && list[j].vm_state_size == 0;
                break;
            }
        }
        ok = found;
    }
    if (!ok) {
        fail(a,
             "qsnap_snapshot_list: %" PRIu32 " snapshots, expected %u "
             "(or a name or size is wrong)",
             count, expected);
        pthread_mutex_lock(&st->print_mtx);
        for (uint32_t j = 0; j < count; j++) {
            fprintf(stderr, PROG ":   ID %s name %s disk %" PRIu64 "\n",
                    list[j].id, list[j].name, list[j].disk_size);
        }
        pthread_mutex_unlock(&st->print_mtx);
    }
    qsnap_snapshot_list_free(list, count);
    return ok;
}

/* Deleting a snapshot with an open view must be refused with -EBUSY. */
static void snap_busy(struct actor *a)
{
    struct stress *st = a->st;
    const struct snapcopy *sc = &st->pre[rng_below(&a->rng, N_PRE)];
    qsnap_view *v;

    a->counts[OP_SNAP_BUSY]++;
    int ret = qsnap_view_open(st->img, sc->name, &v);
    if (ret < 0) {
        call_failed(a, "qsnap_view_open", 0, 0, ret);
        return;
    }
    ret = qsnap_snapshot_delete(st->img, sc->name);
    if (ret != -EBUSY) {
        fail(a, "deleting %s with a view open returned %d, not -EBUSY",
             sc->name, ret);
    }
    qsnap_view_close(v);
}

/* Fills `p` with pages of VM state: zero pages, random bytes (which zstd
 * cannot shrink) and repetitive ones, in runs. */
static void fill_state(struct actor *a, uint8_t *p, size_t len)
{
    for (size_t off = 0; off < len;) {
        const size_t run =
            min_u64(len - off, 4096 * (1 + rng_below(&a->rng, 48)));
        const uint64_t kind = rng_below(&a->rng, 3);
        for (size_t i = 0; i < run; i += 8) {
            const uint64_t r = kind == 0   ? 0
                               : kind == 1 ? rng_next(&a->rng)
                                           : 0x2e2e6b6f202c6f6bull + (i & 0xf0);
            memcpy(p + off + i, &r, min_u64(8, run - i));
        }
        off += run;
    }
}

/*
 * A checkpoint whose VM state is saved while the workers write: a "ram"
 * section larger than the container's output buffers, written in pieces
 * of any size, and a small "dev" one.  Both must read back exactly; the
 * checkpoint is deleted again at once.
 */
static void snap_checkpoint(struct actor *a)
{
    struct stress *st = a->st;
    const size_t ram_len = (9u << 20) + 4096 * rng_below(&a->rng, 64);
    const size_t dev_len = 1 + rng_below(&a->rng, 5000);
    uint8_t *ram = xmalloc(ram_len);
    uint8_t *dev = xmalloc(dev_len);
    uint8_t *back = xmalloc(ram_len);
    char name[32];
    qsnap_checkpoint *ck;
    qsnap_vmstate *vs;

    snprintf(name, sizeof(name), "ckpt-%u", ++a->snap_seq);
    a->counts[OP_SNAP_CKPT]++;
    fill_state(a, ram, ram_len);
    fill_state(a, dev, dev_len);
    int ret = qsnap_checkpoint_begin(st->img, name, NULL,
                                     QSNAP_CHECKPOINT_SECTIONS, &ck);
    if (ret < 0) {
        call_failed(a, "qsnap_checkpoint_begin", 0, 0, ret);
        goto out;
    }
    ret = qsnap_checkpoint_section_begin(ck, "ram");
    for (size_t off = 0; ret == 0 && off < ram_len;) {
        const size_t n = min_u64(ram_len - off, 1 + rng_below(&a->rng, CHUNK));
        ret = qsnap_checkpoint_section_write(ck, ram + off, n);
        off += n;
    }
    if (ret == 0) {
        ret = qsnap_checkpoint_section_end(ck);
    }
    if (ret == 0) {
        ret = qsnap_checkpoint_section_begin(ck, "dev");
    }
    if (ret == 0) {
        ret = qsnap_checkpoint_section_write(ck, dev, dev_len);
    }
    if (ret < 0) {
        call_failed(a, "writing the checkpoint", 0, 0, ret);
        qsnap_checkpoint_abort(ck);
        goto out;
    }
    ret = qsnap_checkpoint_commit(ck);
    if (ret < 0) {
        call_failed(a, "qsnap_checkpoint_commit", 0, 0, ret);
        goto out;
    }
    ret = qsnap_vmstate_open(st->img, name, &vs);
    if (ret < 0) {
        call_failed(a, "qsnap_vmstate_open", 0, 0, ret);
        goto out;
    }
    ret = qsnap_vmstate_section_pread(vs, "ram", back, ram_len, 0);
    if (ret < 0) {
        call_failed(a, "qsnap_vmstate_section_pread ram", 0, ram_len, ret);
    } else if (memcmp(back, ram, ram_len) != 0) {
        fail(a, "checkpoint %s: section ram reads back wrong", name);
    }
    if (ret == 0) {
        ret = qsnap_vmstate_section_pread(vs, "dev", back, dev_len, 0);
        if (ret < 0) {
            call_failed(a, "qsnap_vmstate_section_pread dev", 0, dev_len, ret);
        } else if (memcmp(back, dev, dev_len) != 0) {
            fail(a, "checkpoint %s: section dev reads back wrong", name);
        }
    }
    qsnap_vmstate_close(vs);
    ret = qsnap_snapshot_delete(st->img, name);
    if (ret < 0) {
        call_failed(a, "qsnap_snapshot_delete", 0, 0, ret);
    }
out:
    free(ram);
    free(dev);
    free(back);
}

static void *snapper_main(void *opaque)
{
    struct actor *a = opaque;
    struct stress *st = a->st;

    while (!stopping(st)) {
        sleep_ms(5 + (unsigned)rng_below(&a->rng, 40));
        if (stopping(st)) {
            break;
        }
        const uint64_t r = rng_below(&a->rng, 100);
        if (r < 20) {
            snap_create(a);
        } else if (r < 35) {
            snap_delete(a);
        } else if (r < 55) {
            snap_race(a);
        } else if (r < 62) {
            snap_checkpoint(a);
        } else if (r < 75) {
            snap_verify(a);
        } else if (r < 85) {
            snap_list_check(a, st->img);
        } else {
            snap_busy(a);
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Before and after the threads                                       */
/* ------------------------------------------------------------------ */

/* Gives every part of the disk some content: data, zeros, or nothing. */
static void populate(struct actor *a)
{
    struct stress *st = a->st;

    for (uint64_t p = 0; p < st->size && !stopping(st);) {
        const uint64_t len =
            min_u64(st->size - p, 1 + rng_below(&a->rng, 3 * st->cs));
        const uint64_t r = rng_below(&a->rng, 100);
        if (r < 55) {
            do_write(a, p, len);
        } else if (r < 65) {
            do_zero(a, OP_ZERO, p, len);
        } else if (r < 72) {
            do_zero(a, OP_DISCARD, p, len);
        } else if (r < 80 && p % st->cs == 0 && p + st->cs <= st->size) {
            do_compressed(a, p);
        }
        p += len;
    }
}

/* Random changes anywhere on the disk (before the workers start). */
static void scramble(struct actor *a, unsigned n)
{
    struct stress *st = a->st;

    for (unsigned i = 0; i < n && !stopping(st); i++) {
        const uint64_t len = pick_len(a, st->size);
        const uint64_t off = pick_off(a, 0, st->size, len);
        const uint64_t r = rng_below(&a->rng, 100);
        if (r < 70) {
            do_write(a, off, len);
        } else if (r < 80) {
            do_zero(a, OP_DISCARD, off, len);
        } else if (r < 90) {
            do_zero(a, OP_ZERO, off, len);
        } else if (off / st->cs * st->cs + st->cs <= st->size) {
            do_compressed(a, off / st->cs * st->cs);
        }
    }
}

/* Reads the whole live disk and compares it with the model. */
static bool verify_live(struct actor *a, qsnap_image *img, const char *when)
{
    struct stress *st = a->st;
    char what[96];

    snprintf(what, sizeof(what), "%s: live disk", when);
    for (uint64_t p = 0; p < st->size; p += CHUNK) {
        const uint64_t len = min_u64(CHUNK, st->size - p);
        const int ret = qsnap_pread(img, a->buf, (size_t)len, p);
        if (ret < 0) {
            call_failed(a, "qsnap_pread", p, len, ret);
            return false;
        }
        if (!same(a, what, a->buf, st->model + p, p, len, true)) {
            return false;
        }
    }
    return true;
}

static bool verify_view_full(struct actor *a, qsnap_image *img,
                             const struct snapcopy *sc, const char *when)
{
    struct stress *st = a->st;
    char what[96];
    qsnap_view *v;
    bool ok = true;

    snprintf(what, sizeof(what), "%s: snapshot %s", when, sc->name);
    int ret = qsnap_view_open(img, sc->name, &v);
    if (ret < 0) {
        char msg[1024];
        qsnap_errmsg_copy(img, msg, sizeof(msg));
        fail(a, "%s: qsnap_view_open: %s (%s)", what, qsnap_strerror(ret), msg);
        return false;
    }
    for (uint64_t p = 0; p < st->size && ok; p += CHUNK) {
        const uint64_t len = min_u64(CHUNK, st->size - p);
        ret = qsnap_view_pread(v, a->buf, (size_t)len, p);
        if (ret < 0) {
            char msg[1024];
            qsnap_errmsg_copy(img, msg, sizeof(msg));
            fail(a, "%s: qsnap_view_pread at 0x%" PRIx64 ": %s (%s)", what, p,
                 qsnap_strerror(ret), msg);
            ok = false;
        } else {
            ok = same(a, what, a->buf, sc->data + p, p, len, false);
        }
    }
    qsnap_view_close(v);
    return ok;
}

static bool verify_all(struct actor *a, qsnap_image *img, const char *when)
{
    struct stress *st = a->st;

    if (!verify_live(a, img, when)) {
        return false;
    }
    for (unsigned i = 0; i < N_PRE + MAX_DYN; i++) {
        const struct snapcopy *sc =
            i < N_PRE ? &st->pre[i] : &st->dyn[i - N_PRE];
        if (sc->live && !verify_view_full(a, img, sc, when)) {
            return false;
        }
    }
    return true;
}

static void check_report(void *opaque, int level, const char *msg)
{
    unsigned *n = opaque;

    if ((*n)++ < 20) {
        fprintf(stderr, PROG ":   check: %s%s\n", level == 0 ? "ERROR " : "",
                msg);
    }
}

static bool run_check(struct actor *a, qsnap_image *img, const char *when)
{
    struct qsnap_check_result res;
    unsigned n_reports = 0;

    memset(&res, 0, sizeof(res));
    res.struct_size = sizeof(res);
    const int ret = qsnap_check(img, 0, &res, check_report, &n_reports);
    if (ret < 0) {
        char msg[1024];
        qsnap_errmsg_copy(img, msg, sizeof(msg));
        fail(a, "%s: qsnap_check: %s (%s)", when, qsnap_strerror(ret), msg);
        return false;
    }
    if (res.corruptions || res.leaks || res.check_errors) {
        fail(a,
             "%s: qsnap_check: %" PRIu64 " corruptions, %" PRIu64
             " leaks, %" PRIu64 " errors",
             when, res.corruptions, res.leaks, res.check_errors);
        return false;
    }
    return true;
}

static int open_image(const struct config *cfg, bool rw, uint64_t cache_size,
                      qsnap_image **img)
{
    struct qsnap_open_opts o;
    char err[1024];

    qsnap_open_opts_init(&o);
    o.flags = rw ? QSNAP_OPEN_RDWR : 0;
    o.format = QSNAP_FMT_QCOW2;
    o.cache_size = cache_size;
    const int ret = qsnap_open(cfg->path, &o, img, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, PROG ": FAIL: opening %s: %s\n", cfg->path, err);
    }
    return ret;
}

static bool write_file(const char *path, const uint8_t *p, uint64_t len)
{
    FILE *f = fopen(path, "wb");

    if (!f) {
        fprintf(stderr, PROG ": FAIL: %s: %s\n", path, strerror(errno));
        return false;
    }
    const bool ok = fwrite(p, 1, (size_t)len, f) == len;
    if (fclose(f) != 0 || !ok) {
        fprintf(stderr, PROG ": FAIL: writing %s\n", path);
        return false;
    }
    return true;
}

/* Writes live.raw and snap-NAME.raw, what each must read as, to dir. */
static bool dump_models(const struct stress *st, const char *dir)
{
    char path[4096];

    snprintf(path, sizeof(path), "%s/live.raw", dir);
    if (!write_file(path, st->model, st->size)) {
        return false;
    }
    for (unsigned i = 0; i < N_PRE + MAX_DYN; i++) {
        const struct snapcopy *sc =
            i < N_PRE ? &st->pre[i] : &st->dyn[i - N_PRE];
        if (!sc->live) {
            continue;
        }
        snprintf(path, sizeof(path), "%s/snap-%s.raw", dir, sc->name);
        if (!write_file(path, sc->data, st->size)) {
            return false;
        }
    }
    return true;
}

/* Runs `$QEMU_IMG check` on the image; true if it is clean. */
static bool qemu_check(const char *qemu_img, const char *path)
{
    char *argv[] = {(char *)qemu_img, "check",      "-q", "-f",
                    "qcow2",          (char *)path, NULL};
    pid_t pid;
    int status;

    const int err = posix_spawnp(&pid, qemu_img, NULL, NULL, argv, environ);
    if (err != 0) {
        fprintf(stderr, PROG ": FAIL: running %s: %s\n", qemu_img,
                strerror(err));
        return false;
    }
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) {
            fprintf(stderr, PROG ": FAIL: waiting for %s: %s\n", qemu_img,
                    strerror(errno));
            return false;
        }
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, PROG ": FAIL: %s check %s: exit status %d\n", qemu_img,
                path, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------ */
/* Main                                                               */
/* ------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: " PROG " [options] [IMAGE]\n"
            "Many threads on one qsnap_image handle, checked against a "
            "model.\n"
            "IMAGE is created (replaced) and kept; without it the image\n"
            "goes to a temporary directory, removed unless --keep.\n"
            "  -t, --threads N        worker threads (default 4)\n"
            "  -s, --seconds S        run for S seconds (default 3)\n"
            "  -n, --iterations N     operations per worker\n"
            "      --seed N           random seed (default: from the clock)\n"
            "  -c, --cluster-size N   cluster size (default 64K)\n"
            "      --size N           virtual size (default 64M)\n"
            "      --cache-size N     qsnap_open_opts.cache_size (default:\n"
            "                         8 clusters, the smallest caches)\n"
            "      --compression T    zlib (default) or zstd\n"
            "      --no-snapshots     no snapshot thread\n"
            "      --aligned          region boundaries on clusters\n"
            "      --dump DIR         write live.raw and snap-NAME.raw\n"
            "      --keep             keep the temporary directory\n"
            "  -v, --verbose\n");
}

static bool parse_size(const char *s, uint64_t *out)
{
    char *end;

    errno = 0;
    uint64_t v = strtoull(s, &end, 0);
    if (errno || end == s || *s == '-') {
        return false;
    }
    unsigned shift = 0;
    switch (*end) {
    case 'k':
    case 'K':
        shift = 10;
        end++;
        break;
    case 'm':
    case 'M':
        shift = 20;
        end++;
        break;
    case 'g':
    case 'G':
        shift = 30;
        end++;
        break;
    default:
        break;
    }
    if (*end || (shift && v > (UINT64_MAX >> shift))) {
        return false;
    }
    *out = v << shift;
    return true;
}

enum {
    OPT_SEED = 256,
    OPT_SIZE,
    OPT_CACHE,
    OPT_COMPRESSION,
    OPT_NO_SNAP,
    OPT_ALIGNED,
    OPT_DUMP,
    OPT_KEEP,
};

static int parse_args(int argc, char **argv, struct config *cfg)
{
    static const struct option longopts[] = {
        {"threads", required_argument, NULL, 't'},
        {"seconds", required_argument, NULL, 's'},
        {"iterations", required_argument, NULL, 'n'},
        {"cluster-size", required_argument, NULL, 'c'},
        {"seed", required_argument, NULL, OPT_SEED},
        {"size", required_argument, NULL, OPT_SIZE},
        {"cache-size", required_argument, NULL, OPT_CACHE},
        {"compression", required_argument, NULL, OPT_COMPRESSION},
        {"no-snapshots", no_argument, NULL, OPT_NO_SNAP},
        {"aligned", no_argument, NULL, OPT_ALIGNED},
        {"dump", required_argument, NULL, OPT_DUMP},
        {"keep", no_argument, NULL, OPT_KEEP},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    bool seeded = false, timed = false, cache_set = false;
    uint64_t v;
    int c;

    memset(cfg, 0, sizeof(*cfg));
    cfg->threads = 4;
    cfg->cluster_size = 65536;
    cfg->size = 64ull << 20;
    cfg->snapshots = true;
    while ((c = getopt_long(argc, argv, "t:s:n:c:vh", longopts, NULL)) != -1) {
        switch (c) {
        case 't':
            if (!parse_size(optarg, &v) || v < 1 || v > 256) {
                fprintf(stderr, PROG ": bad thread count '%s'\n", optarg);
                return 2;
            }
            cfg->threads = (unsigned)v;
            break;
        case 's': {
            char *end;
            cfg->seconds = strtod(optarg, &end);
            if (*end || end == optarg || !(cfg->seconds > 0)) {
                fprintf(stderr, PROG ": bad seconds '%s'\n", optarg);
                return 2;
            }
            timed = true;
            break;
        }
        case 'n':
            if (!parse_size(optarg, &cfg->iterations) || !cfg->iterations) {
                fprintf(stderr, PROG ": bad iterations '%s'\n", optarg);
                return 2;
            }
            break;
        case 'c':
            if (!parse_size(optarg, &v) || v < 512 || v > (2u << 20) ||
                (v & (v - 1))) {
                fprintf(stderr, PROG ": bad cluster size '%s'\n", optarg);
                return 2;
            }
            cfg->cluster_size = (uint32_t)v;
            break;
        case OPT_SEED:
            if (!parse_size(optarg, &cfg->seed)) {
                fprintf(stderr, PROG ": bad seed '%s'\n", optarg);
                return 2;
            }
            seeded = true;
            break;
        case OPT_SIZE:
            if (!parse_size(optarg, &cfg->size) || cfg->size % 512 ||
                cfg->size > (SIZE_MAX >> 2)) {
                fprintf(stderr, PROG ": bad size '%s' (whole sectors)\n",
                        optarg);
                return 2;
            }
            break;
        case OPT_CACHE:
            if (!parse_size(optarg, &cfg->cache_size)) {
                fprintf(stderr, PROG ": bad cache size '%s'\n", optarg);
                return 2;
            }
            cache_set = true;
            break;
        case OPT_COMPRESSION:
            if (strcmp(optarg, "zlib") == 0) {
                cfg->compression = QSNAP_COMPRESSION_ZLIB;
            } else if (strcmp(optarg, "zstd") == 0) {
                cfg->compression = QSNAP_COMPRESSION_ZSTD;
            } else {
                fprintf(stderr, PROG ": bad compression '%s'\n", optarg);
                return 2;
            }
            break;
        case OPT_NO_SNAP:
            cfg->snapshots = false;
            break;
        case OPT_ALIGNED:
            cfg->aligned = true;
            break;
        case OPT_DUMP:
            cfg->dump_dir = optarg;
            break;
        case OPT_KEEP:
            cfg->keep = true;
            break;
        case 'v':
            cfg->verbose = true;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind + 1 < argc) {
        usage(stderr);
        return 2;
    }
    cfg->path = optind < argc ? argv[optind] : NULL;
    if (!timed && !cfg->iterations) {
        cfg->seconds = 3;
    }
    if (!seeded) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        cfg->seed = (uint64_t)ts.tv_sec * 1000003u ^ (uint64_t)ts.tv_nsec ^
                    (uint64_t)getpid() << 32;
    }
    if (!cache_set) {
        cfg->cache_size = 8ull * cfg->cluster_size;
    }
    if (cfg->size / cfg->threads < 4ull * cfg->cluster_size) {
        fprintf(stderr,
                PROG ": %" PRIu64 " bytes are too few for %u threads "
                     "(each needs 4 clusters)\n",
                cfg->size, cfg->threads);
        return 2;
    }
    return 0;
}

static void actor_init(struct actor *a, struct stress *st, unsigned idx,
                       const char *label)
{
    memset(a, 0, sizeof(*a));
    a->st = st;
    a->idx = idx;
    a->label = label;
    a->lo = 0;
    a->hi = st->size;
    rng_seed(&a->rng, st->cfg->seed ^ ((uint64_t)(idx + 1) << 48));
    a->buf = xmalloc((size_t)st->max_io);
    a->data = xmalloc((size_t)st->max_io);
}

static void actor_free(struct actor *a)
{
    free(a->buf);
    free(a->data);
}

/* Splits the disk among the workers; inner boundaries fall mid-cluster. */
static void layout(struct stress *st)
{
    const uint64_t n = st->n_workers;
    const uint64_t cs = st->cs;

    for (uint64_t i = 0; i < n; i++) {
        struct actor *w = &st->workers[i];
        w->lo = i ? st->workers[i - 1].hi : 0;
        if (i == n - 1) {
            w->hi = st->size;
        } else {
            w->hi = (i + 1) * (st->size / n) / cs * cs;
            if (!st->cfg->aligned) {
                w->hi += cs / 2 + 3;
            }
        }
    }
}

static bool create_image(const struct config *cfg)
{
    struct qsnap_create_opts co;
    char err[1024];

    qsnap_create_opts_init(&co);
    co.size = cfg->size;
    co.cluster_size = cfg->cluster_size;
    co.compression_type = cfg->compression;
    const int ret = qsnap_create(cfg->path, &co, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, PROG ": FAIL: creating %s: %s\n", cfg->path, err);
        return false;
    }
    return true;
}

/* Takes snapshot pre[i] of the disk as the model says it is now. */
static bool take_pre(struct actor *a, unsigned i)
{
    struct stress *st = a->st;
    struct snapcopy *sc = &st->pre[i];
    const int ret = qsnap_snapshot_create(st->img, sc->name, NULL);

    if (ret < 0) {
        call_failed(a, "qsnap_snapshot_create", 0, 0, ret);
        return false;
    }
    memcpy(sc->data, st->model, (size_t)st->size);
    sc->live = true;
    return true;
}

/* Creates the image and the snapshots the workers will read. */
static bool setup(struct actor *m)
{
    struct stress *st = m->st;
    const struct config *cfg = st->cfg;

    if (!create_image(cfg) ||
        open_image(cfg, true, cfg->cache_size, &st->img) < 0) {
        return false;
    }
    populate(m);
    if (stopping(st) || !take_pre(m, 0)) {
        return false;
    }
    scramble(m, 200);
    if (stopping(st) || !take_pre(m, 1)) {
        return false;
    }
    scramble(m, 200);
    return !stopping(st) && verify_all(m, st->img, "setup");
}

static int run_threads(struct stress *st, struct actor *snapper)
{
    const struct config *cfg = st->cfg;
    unsigned started = 0;
    bool snapper_started = false;
    int err = 0;

    st->deadline = now_sec() + cfg->seconds;
    for (; started < st->n_workers && err == 0; started++) {
        err = pthread_create(&st->workers[started].tid, NULL, worker_main,
                             &st->workers[started]);
        if (err) {
            break;
        }
    }
    if (err == 0 && cfg->snapshots) {
        err = pthread_create(&snapper->tid, NULL, snapper_main, snapper);
        snapper_started = err == 0;
    }
    if (err) {
        fprintf(stderr, PROG ": FAIL: pthread_create: %s\n", strerror(err));
        atomic_store(&st->stop, true);
        atomic_store(&st->failed, true);
    }
    for (unsigned i = 0; i < started; i++) {
        pthread_join(st->workers[i].tid, NULL);
    }
    /* In -n mode the snapshot thread runs until the workers are done. */
    atomic_store(&st->stop, true);
    if (snapper_started) {
        pthread_join(snapper->tid, NULL);
    }
    return atomic_load(&st->failed) ? 1 : 0;
}

/* Everything after the threads: full compares, check, reopen, qemu-img. */
static bool finish(struct actor *m)
{
    struct stress *st = m->st;
    const struct config *cfg = st->cfg;

    if (!verify_all(m, st->img, "after the run") ||
        !snap_list_check(m, st->img) ||
        !run_check(m, st->img, "after the run")) {
        return false;
    }
    int ret = qsnap_close(st->img);
    st->img = NULL;
    if (ret < 0) {
        fprintf(stderr, PROG ": FAIL: qsnap_close: %s\n", qsnap_strerror(ret));
        return false;
    }
    if (open_image(cfg, false, 0, &st->img) < 0) {
        return false;
    }
    const bool ok = verify_all(m, st->img, "after reopening") &&
                    snap_list_check(m, st->img) &&
                    run_check(m, st->img, "after reopening");
    ret = qsnap_close(st->img);
    st->img = NULL;
    if (!ok) {
        return false;
    }
    if (ret < 0) {
        fprintf(stderr, PROG ": FAIL: qsnap_close (read-only): %s\n",
                qsnap_strerror(ret));
        return false;
    }
    if (cfg->dump_dir && !dump_models(st, cfg->dump_dir)) {
        return false;
    }
    const char *qemu_img = getenv("QEMU_IMG");
    if (qemu_img && *qemu_img && !qemu_check(qemu_img, cfg->path)) {
        return false;
    }
    return true;
}

static void print_summary(const struct stress *st, const struct actor *snapper,
                          double elapsed)
{
    const struct config *cfg = st->cfg;
    uint64_t total[N_OPS] = {0};
    uint64_t sum = 0;

    for (unsigned i = 0; i < st->n_workers; i++) {
        for (unsigned k = 0; k < N_OPS; k++) {
            total[k] += st->workers[i].counts[k];
        }
    }
    for (unsigned k = 0; k < N_OPS; k++) {
        total[k] += snapper->counts[k];
        sum += total[k];
    }
    printf(PROG ": ok: seed %" PRIu64 ", %u threads%s, cluster %" PRIu32
                " %s, %.1f s, %" PRIu64 " ops:",
           cfg->seed, cfg->threads, cfg->snapshots ? " + snapshots" : "",
           cfg->cluster_size,
           cfg->compression == QSNAP_COMPRESSION_ZSTD ? "zstd" : "zlib",
           elapsed, sum);
    for (unsigned k = 0; k < N_OPS; k++) {
        if (total[k] || k < OP_SNAP_CREATE || cfg->snapshots) {
            printf(" %s %" PRIu64, op_names[k], total[k]);
        }
    }
    printf("\n");
}

int main(int argc, char **argv)
{
    struct config cfg;
    struct stress st;
    struct actor main_actor, snapper;
    char tmpdir[4096] = "";
    char tmppath[4096];
    char labels[257][24];

    int ret = parse_args(argc, argv, &cfg);
    if (ret) {
        return ret;
    }
    if (!cfg.path) {
        const char *t = getenv("TMPDIR");
        snprintf(tmpdir, sizeof(tmpdir), "%s/mt_stress.XXXXXX",
                 t && *t ? t : "/tmp");
        if (!mkdtemp(tmpdir)) {
            fprintf(stderr, PROG ": FAIL: mkdtemp %s: %s\n", tmpdir,
                    strerror(errno));
            return 1;
        }
        snprintf(tmppath, sizeof(tmppath), "%s/stress.qcow2", tmpdir);
        cfg.path = tmppath;
    }

    memset(&st, 0, sizeof(st));
    st.cfg = &cfg;
    st.size = cfg.size;
    st.cs = cfg.cluster_size;
    st.max_io = max_u64(1024 * 1024, 5 * st.cs);
    st.n_workers = cfg.threads;
    st.model = calloc(1, (size_t)st.size);
    if (!st.model) {
        fprintf(stderr, PROG ": out of memory for the model\n");
        return 1;
    }
    for (unsigned i = 0; i < N_PRE; i++) {
        snprintf(st.pre[i].name, sizeof(st.pre[i].name), "%s", pre_names[i]);
        st.pre[i].data = xmalloc((size_t)st.size);
    }
    if (cfg.snapshots) {
        /* Touched now, so that the first copy does not fault in pages
         * (and sanitizer shadow) while the workers are held back. */
        for (unsigned i = 0; i < MAX_DYN; i++) {
            st.dyn[i].data = xmalloc((size_t)st.size);
            memset(st.dyn[i].data, 0, (size_t)st.size);
        }
    }
    pthread_rwlock_init(&st.hold, NULL);
    pthread_mutex_init(&st.print_mtx, NULL);
    atomic_init(&st.hold_wanted, 0);
    atomic_init(&st.stop, false);
    atomic_init(&st.failed, false);

    st.workers = calloc(st.n_workers, sizeof(*st.workers));
    if (!st.workers) {
        fprintf(stderr, PROG ": out of memory\n");
        return 1;
    }
    for (unsigned i = 0; i < st.n_workers; i++) {
        snprintf(labels[i], sizeof(labels[i]), "worker %u", i);
        actor_init(&st.workers[i], &st, i, labels[i]);
    }
    layout(&st);
    actor_init(&snapper, &st, st.n_workers, "snapshots");
    actor_init(&main_actor, &st, st.n_workers + 1, "main");

    printf(PROG ": seed %" PRIu64 ", image %s, size %" PRIu64
                ", cluster %" PRIu32 ", cache %" PRIu64 ", %s\n",
           cfg.seed, cfg.path, cfg.size, cfg.cluster_size, cfg.cache_size,
           cfg.compression == QSNAP_COMPRESSION_ZSTD ? "zstd" : "zlib");
    if (cfg.verbose) {
        for (unsigned i = 0; i < st.n_workers; i++) {
            printf(PROG ": worker %u owns 0x%" PRIx64 "..0x%" PRIx64 "\n", i,
                   st.workers[i].lo, st.workers[i].hi);
        }
    }
    fflush(stdout);

    const double t0 = now_sec();
    bool ok = setup(&main_actor);
    if (cfg.verbose && ok) {
        printf(PROG ": setup done in %.2f s\n", now_sec() - t0);
        fflush(stdout);
    }
    const double t1 = now_sec();
    if (ok) {
        ok = run_threads(&st, &snapper) == 0;
    }
    const double elapsed = now_sec() - t1;
    if (ok) {
        ok = finish(&main_actor);
    }
    if (st.img) {
        qsnap_close(st.img);
    }
    if (ok) {
        print_summary(&st, &snapper, elapsed);
    } else {
        fprintf(stderr, PROG ": FAIL (seed %" PRIu64 ", image %s kept)\n",
                cfg.seed, cfg.path);
    }

    if (ok && tmpdir[0] && !cfg.keep) {
        unlink(tmppath);
        rmdir(tmpdir);
    } else if (tmpdir[0] && ok) {
        printf(PROG ": kept %s\n", tmpdir);
    }
    for (unsigned i = 0; i < st.n_workers; i++) {
        actor_free(&st.workers[i]);
    }
    actor_free(&snapper);
    actor_free(&main_actor);
    for (unsigned i = 0; i < N_PRE; i++) {
        free(st.pre[i].data);
    }
    for (unsigned i = 0; i < MAX_DYN; i++) {
        free(st.dyn[i].data);
    }
    free(st.workers);
    free(st.model);
    pthread_rwlock_destroy(&st.hold);
    pthread_mutex_destroy(&st.print_mtx);
    return ok ? 0 : 1;
}
