/*
 * faultio.c - the fault-injecting host file layer (see qs_fault.h).
 *
 * Invariants:
 *   1. Every field of a wrapper and of its plan is read and written under
 *      the plan's mutex; wrappers sharing a plan share the mutex, so a
 *      power cut sees every cache at one instant.
 *   2. In volatile mode each pending record holds what its operation
 *      overwrote (bytes and the file size before it), so undoing all
 *      records newest first gives back the file as of the last flush.
 *   3. A recorded write covers whole sectors: what survives a power cut is,
 *      sector by sector, one of the versions the disk was given.
 *   4. A dead wrapper touches nothing: every call fails with -EIO.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qs_fault.h"
#include "qs_int.h"

/* The unit a disk writes atomically. */
#define FAULT_SECTOR 512u

/* One operation the write cache could still lose. */
struct pending_op {
    enum qs_fault_op op; /* WRITE, PUNCH, TRUNCATE, FALLOC or RESERVE */
    uint64_t seq;        /* issue order over every wrapper of the plan */
    uint64_t off;        /* TRUNCATE: the new size */
    uint64_t len;
    uint8_t *data;     /* WRITE: the bytes written */
    uint64_t old_size; /* file size before the operation */
    uint64_t pre_off;  /* the bytes it overwrote: */
    uint64_t pre_len;
    uint8_t *pre;
};

struct fault_arm {
    unsigned long at; /* fail when calls reach this count (0: disarmed) */
    int err;
    bool sticky;
};

struct fault_plan {
    pthread_mutex_t mtx;
    unsigned long calls[QS_FAULT_N_OPS];
    struct fault_arm arm[QS_FAULT_N_OPS];
    unsigned long injected;
    uint64_t seq;

    /* The plan from the environment, shared by every file opened. */
    bool shared;
    bool start_volatile;
    unsigned long cut_at; /* power fails before this modifying call */
    unsigned long modifying;
    uint64_t seed;
    unsigned keep_percent;
    bool cut_done;
    char *log_path;
    struct faultio *wrappers; /* every live (or kept) wrapper */
};

struct faultio {
    qs_io base;
    struct fault_plan *plan; /* its own, or the shared one */
    qs_io *inner;
    char *name;
    bool dead;
    bool is_volatile;
    bool closed; /* closed with a cache a later power cut must see */
    struct pending_op *pending;
    size_t n_pending;
    size_t cap_pending;
    struct faultio *next; /* in plan->wrappers */
};

static const char *const op_names[QS_FAULT_N_OPS] = {
    "read", "write", "flush", "punch", "truncate", "falloc", "reserve",
};

static struct faultio *to_fault(qs_io *io)
{
    return (struct faultio *)io;
}

static uint64_t iov_total(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++) {
        t += iov[i].iov_len;
    }
    return t;
}

/* Appends one line to QSNAP_FAULT_LOG, if set.  Plan lock held. */
static void plan_log(const struct fault_plan *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void plan_log(const struct fault_plan *p, const char *fmt, ...)
{
    if (!p->log_path) {
        return;
    }
    const int fd =
        open(p->log_path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        return;
    }
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n > 0) {
        n = QS_MIN(n, (int)sizeof(line) - 2);
        line[n++] = '\n';
        const ssize_t w = write(fd, line, (size_t)n);
        (void)w; /* the log is best effort */
    }
    close(fd);
}

/* ---------------------------------------------------------------- cache */

static void pending_free(struct pending_op *q)
{
    free(q->data);
    free(q->pre);
    q->data = NULL;
    q->pre = NULL;
}

static void pending_clear(struct faultio *f)
{
    for (size_t i = 0; i < f->n_pending; i++) {
        pending_free(&f->pending[i]);
    }
    f->n_pending = 0;
}

/*
 * Records an operation about to be issued: what it will overwrite and, for
 * a write, its bytes.  Plan lock held.
 */
static int pending_add(struct faultio *f, enum qs_fault_op op, uint64_t off,
                       uint64_t len, const struct iovec *iov, int n)
{
    if (f->n_pending == f->cap_pending) {
        const size_t cap = f->cap_pending ? f->cap_pending * 2 : 64;
        struct pending_op *a = realloc(f->pending, cap * sizeof(*a));
        if (!a) {
            return -ENOMEM;
        }
        f->pending = a;
        f->cap_pending = cap;
    }
    struct pending_op q = {.op = op, .off = off, .len = len};
    int ret = qs_io_size(f->inner, &q.old_size);
    if (ret < 0) {
        return ret;
    }
    if (op == QS_FAULT_WRITE) {
        /* A disk writes whole sectors, and the page cache hands it what it
         * holds around a partial write: record the write widened to its
         * sectors (not past the file's end), as they will read after it. */
        const uint64_t end = off + len;
        q.off = off - off % FAULT_SECTOR;
        q.len = QS_MIN(QS_DIV_ROUND_UP(end, FAULT_SECTOR) * FAULT_SECTOR,
                       QS_MAX(q.old_size, end)) -
                q.off;
    }
    if (op == QS_FAULT_WRITE || op == QS_FAULT_PUNCH) {
        q.pre_off = q.off;
        q.pre_len =
            q.off < q.old_size ? QS_MIN(q.len, q.old_size - q.off) : 0;
    } else if (op == QS_FAULT_TRUNCATE && off < q.old_size) {
        q.pre_off = off;
        q.pre_len = q.old_size - off;
    }
    if (q.pre_len) {
        q.pre = malloc((size_t)q.pre_len);
        if (!q.pre) {
            return -ENOMEM;
        }
        ret = qs_io_pread(f->inner, q.pre, (size_t)q.pre_len, q.pre_off);
        if (ret < 0) {
            free(q.pre);
            return ret;
        }
    }
    if (op == QS_FAULT_WRITE) {
        q.data = malloc(q.len ? (size_t)q.len : 1);
        if (!q.data) {
            free(q.pre);
            return -ENOMEM;
        }
        if (q.pre_len) { /* (q.pre is NULL otherwise) */
            memcpy(q.data, q.pre, (size_t)q.pre_len);
        }
        memset(q.data + q.pre_len, 0, (size_t)(q.len - q.pre_len));
        uint64_t pos = off - q.off;
        for (int i = 0; i < n; i++) {
            if (iov[i].iov_len) {
                memcpy(q.data + pos, iov[i].iov_base, iov[i].iov_len);
            }
            pos += iov[i].iov_len;
        }
    }
    q.seq = ++f->plan->seq;
    f->pending[f->n_pending++] = q;
    return 0;
}

static int pending_undo(struct faultio *f, const struct pending_op *q)
{
    uint64_t size;
    int ret = qs_io_size(f->inner, &size);
    if (ret == 0 && size != q->old_size) {
        ret = qs_io_truncate(f->inner, q->old_size);
    }
    if (ret == 0 && q->pre_len) {
        ret = qs_io_pwrite(f->inner, q->pre, (size_t)q->pre_len, q->pre_off);
    }
    return ret;
}

static int pending_redo(struct faultio *f, const struct pending_op *q)
{
    switch (q->op) {
    case QS_FAULT_WRITE:
        return qs_io_pwrite(f->inner, q->data, (size_t)q->len, q->off);
    case QS_FAULT_PUNCH:
        return qs_io_punch(f->inner, q->off, q->len);
    case QS_FAULT_TRUNCATE:
        return qs_io_truncate(f->inner, q->off);
    case QS_FAULT_FALLOC:
        return qs_io_falloc(f->inner, q->off, q->len);
    case QS_FAULT_RESERVE:
        return qs_io_reserve(f->inner, q->off, q->len);
    default:
        return -EINVAL;
    }
}

struct cached {
    struct faultio *f;
    const struct pending_op *q;
};

static int cached_cmp(const void *a, const void *b)
{
    const uint64_t x = ((const struct cached *)a)->q->seq;
    const uint64_t y = ((const struct cached *)b)->q->seq;
    return x < y ? -1 : x > y;
}

/*
 * Power loss over `n_fs` wrappers of one plan: undoes every cached
 * operation newest first, replays the ones `keep` accepts oldest first,
 * and kills the wrappers.  Plan lock held.  Dropped count or -errno.
 */
static int crash_all(struct faultio **fs, size_t n_fs, qs_faultio_keep_fn keep,
                     void *opaque, size_t *n_total)
{
    size_t n = 0;
    for (size_t i = 0; i < n_fs; i++) {
        n += fs[i]->n_pending;
    }
    *n_total = n;
    struct cached *all = calloc(n ? n : 1, sizeof(*all));
    int ret = all ? 0 : -ENOMEM;
    size_t k = 0;
    for (size_t i = 0; all && i < n_fs; i++) {
        for (size_t j = 0; j < fs[i]->n_pending; j++) {
            all[k++] = (struct cached){fs[i], &fs[i]->pending[j]};
        }
    }
    int dropped = 0;
    if (ret == 0) {
        qsort(all, n, sizeof(*all), cached_cmp);
        for (size_t i = n; i-- > 0 && ret == 0;) {
            ret = pending_undo(all[i].f, all[i].q);
        }
        for (size_t i = 0; i < n && ret == 0; i++) {
            const struct pending_op *q = all[i].q;
            if (keep && !keep(opaque, i, q->op, q->off, q->len)) {
                dropped++;
                continue;
            }
            ret = pending_redo(all[i].f, q);
        }
    }
    free(all);
    for (size_t i = 0; i < n_fs; i++) {
        pending_clear(fs[i]);
        fs[i]->dead = true;
    }
    return ret < 0 ? ret : dropped;
}

struct random_keep {
    uint64_t state;
    unsigned percent;
};

/* A well-mixed, non-zero generator state from any seed (small seeds
 * would otherwise give correlated first draws). */
static uint64_t seed_state(uint64_t seed)
{
    uint64_t z = seed + UINT64_C(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    z ^= z >> 31;
    return z ? z : 1;
}

static bool keep_random(void *opaque, size_t idx, enum qs_fault_op op,
                        uint64_t off, uint64_t len)
{
    struct random_keep *k = opaque;
    (void)idx;
    (void)op;
    (void)off;
    (void)len;
    /* xorshift64* */
    k->state ^= k->state >> 12;
    k->state ^= k->state << 25;
    k->state ^= k->state >> 27;
    const uint64_t r = k->state * UINT64_C(2685821657736338717);
    return (r >> 32) % 100 < k->percent;
}

static void wrapper_free(struct faultio *f);

/* The power fails for every file of the shared plan, just before a call
 * of kind `op`.  Plan lock held. */
static void power_cut(struct fault_plan *p, enum qs_fault_op op)
{
    size_t n_fs = 0;
    for (struct faultio *f = p->wrappers; f; f = f->next) {
        n_fs++;
    }
    struct faultio **fs = calloc(n_fs ? n_fs : 1, sizeof(*fs));
    size_t i = 0;
    for (struct faultio *f = p->wrappers; fs && f; f = f->next) {
        fs[i++] = f;
    }
    struct random_keep k = {seed_state(p->seed), p->keep_percent};
    size_t n_total = 0;
    const int dropped =
        fs ? crash_all(fs, n_fs, keep_random, &k, &n_total) : -ENOMEM;
    p->cut_done = true;
    plan_log(p, "power cut before modifying call %lu (a %s): %d of %zu "
                "cached operations lost over %zu files",
             p->modifying, op_names[op], dropped, n_total, n_fs);
    /* Files closed while their cache was full can go now. */
    struct faultio **link = &p->wrappers;
    while (*link) {
        struct faultio *f = *link;
        if (f->closed) {
            *link = f->next;
            wrapper_free(f);
        } else {
            link = &f->next;
        }
    }
    free(fs);
}

/* ---------------------------------------------------------------- gate */

/* Counts a call and decides whether it fails.  Plan lock held. */
static int fault_gate(struct faultio *f, enum qs_fault_op op)
{
    struct fault_plan *p = f->plan;
    if (f->dead) {
        return -EIO;
    }
    p->calls[op]++;
    const struct fault_arm *a = &p->arm[op];
    if (a->at && p->calls[op] >= a->at &&
        (p->calls[op] == a->at || a->sticky)) {
        p->injected++;
        plan_log(p, "injected: %s call %lu on %s failed with %s",
                 op_names[op], p->calls[op], f->name, strerror(a->err));
        return -a->err;
    }
    if (p->cut_at && !p->cut_done && op != QS_FAULT_READ &&
        ++p->modifying >= p->cut_at) {
        power_cut(p, op);
        return -EIO;
    }
    return 0;
}

/* ---------------------------------------------------------------- ops */

static int fault_preadv(qs_io *io, const struct iovec *iov, int n, uint64_t off)
{
    struct faultio *f = to_fault(io);
    pthread_mutex_lock(&f->plan->mtx);
    int ret = fault_gate(f, QS_FAULT_READ);
    if (ret == 0) {
        ret = qs_io_preadv(f->inner, iov, n, off);
    }
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

/* Plain and bulk writes alike are "write" calls. */
static int fault_write(qs_io *io, const struct iovec *iov, int n, uint64_t off,
                       bool bulk)
{
    struct faultio *f = to_fault(io);
    pthread_mutex_lock(&f->plan->mtx);
    int ret = fault_gate(f, QS_FAULT_WRITE);
    if (ret == 0 && f->is_volatile) {
        ret = pending_add(f, QS_FAULT_WRITE, off, iov_total(iov, n), iov, n);
    }
    if (ret == 0) {
        ret = bulk ? qs_io_pwritev_bulk(f->inner, iov, n, off)
                   : qs_io_pwritev(f->inner, iov, n, off);
    }
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

static int fault_pwritev(qs_io *io, const struct iovec *iov, int n,
                         uint64_t off)
{
    return fault_write(io, iov, n, off, false);
}

static int fault_pwritev_bulk(qs_io *io, const struct iovec *iov, int n,
                              uint64_t off)
{
    return fault_write(io, iov, n, off, true);
}

static int fault_flush(qs_io *io)
{
    struct faultio *f = to_fault(io);
    pthread_mutex_lock(&f->plan->mtx);
    int ret = fault_gate(f, QS_FAULT_FLUSH);
    if (ret == 0) {
        ret = qs_io_flush(f->inner);
    }
    if (ret == 0) {
        pending_clear(f);
    }
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

/* Truncate, punch, falloc and reserve: gate, record, forward. */
static int fault_modify(qs_io *io, enum qs_fault_op op, uint64_t off,
                        uint64_t len)
{
    struct faultio *f = to_fault(io);
    pthread_mutex_lock(&f->plan->mtx);
    int ret = fault_gate(f, op);
    if (ret == 0 && f->is_volatile) {
        ret = pending_add(f, op, off, len, NULL, 0);
    }
    if (ret == 0) {
        switch (op) {
        case QS_FAULT_TRUNCATE:
            ret = qs_io_truncate(f->inner, off);
            break;
        case QS_FAULT_PUNCH:
            ret = qs_io_punch(f->inner, off, len);
            break;
        case QS_FAULT_RESERVE:
            ret = qs_io_reserve(f->inner, off, len);
            break;
        default:
            ret = qs_io_falloc(f->inner, off, len);
            break;
        }
    }
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

static int fault_truncate(qs_io *io, uint64_t size)
{
    return fault_modify(io, QS_FAULT_TRUNCATE, size, 0);
}

static int fault_punch(qs_io *io, uint64_t off, uint64_t len)
{
    return fault_modify(io, QS_FAULT_PUNCH, off, len);
}

static int fault_falloc(qs_io *io, uint64_t off, uint64_t len)
{
    return fault_modify(io, QS_FAULT_FALLOC, off, len);
}

static int fault_reserve(qs_io *io, uint64_t off, uint64_t len)
{
    return fault_modify(io, QS_FAULT_RESERVE, off, len);
}

static int fault_size(qs_io *io, uint64_t *size)
{
    struct faultio *f = to_fault(io);
    pthread_mutex_lock(&f->plan->mtx);
    const int ret = f->dead ? -EIO : qs_io_size(f->inner, size);
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

static int fault_disk_usage(qs_io *io, uint64_t *bytes)
{
    struct faultio *f = to_fault(io);
    pthread_mutex_lock(&f->plan->mtx);
    const int ret = f->dead ? -EIO : qs_io_disk_usage(f->inner, bytes);
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

static int fault_seek(qs_io *io, uint64_t off, bool hole, uint64_t *res)
{
    struct faultio *f = to_fault(io);
    pthread_mutex_lock(&f->plan->mtx);
    const int ret = f->dead ? -EIO : qs_io_seek(f->inner, off, hole, res);
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

/* Frees a wrapper already off its plan's list (or never on one). */
static void wrapper_free(struct faultio *f)
{
    pending_clear(f);
    free(f->pending);
    qs_io_close(f->inner);
    free(f->name);
    free(f);
}

static void fault_close(qs_io *io)
{
    struct faultio *f = to_fault(io);
    struct fault_plan *p = f->plan;
    if (!p->shared) {
        wrapper_free(f);
        pthread_mutex_destroy(&p->mtx);
        free(p);
        return;
    }
    pthread_mutex_lock(&p->mtx);
    if (f->n_pending && !f->dead) {
        /* Closing a file does not empty a disk's cache: keep the records
         * (and the descriptor) for the power cut. */
        f->closed = true;
        pthread_mutex_unlock(&p->mtx);
        return;
    }
    for (struct faultio **link = &p->wrappers; *link; link = &(*link)->next) {
        if (*link == f) {
            *link = f->next;
            break;
        }
    }
    pthread_mutex_unlock(&p->mtx);
    wrapper_free(f);
}

static const struct qs_io_ops fault_ops = {
    .preadv = fault_preadv,
    .pwritev = fault_pwritev,
    .pwritev_bulk = fault_pwritev_bulk,
    .flush = fault_flush,
    .truncate = fault_truncate,
    .punch = fault_punch,
    .falloc = fault_falloc,
    .reserve = fault_reserve,
    .size = fault_size,
    .disk_usage = fault_disk_usage,
    .seek = fault_seek,
    .close = fault_close,
};

static struct faultio *wrapper_new(qs_io *inner, const char *name)
{
    struct faultio *f = calloc(1, sizeof(*f));
    char *copy = strdup(name);
    if (!f || !copy) {
        free(f);
        free(copy);
        return NULL;
    }
    f->base.ops = &fault_ops;
    f->inner = inner;
    f->name = copy;
    return f;
}

/* ---------------------------------------------------------------- tests */

qs_io *qs_faultio_new(qs_io *inner)
{
    struct fault_plan *p = calloc(1, sizeof(*p));
    struct faultio *f = p ? wrapper_new(inner, "(test io)") : NULL;
    if (!f) {
        free(p);
        qs_io_close(inner);
        return NULL;
    }
    pthread_mutex_init(&p->mtx, NULL);
    f->plan = p;
    return &f->base;
}

qs_io *qs_faultio_inner(qs_io *fio)
{
    return to_fault(fio)->inner;
}

void qs_faultio_fail_nth(qs_io *fio, enum qs_fault_op op, unsigned long n,
                         int err, bool sticky)
{
    struct fault_plan *p = to_fault(fio)->plan;
    pthread_mutex_lock(&p->mtx);
    p->arm[op].at = n ? p->calls[op] + n : 0;
    p->arm[op].err = err;
    p->arm[op].sticky = sticky;
    pthread_mutex_unlock(&p->mtx);
}

unsigned long qs_faultio_calls(qs_io *fio, enum qs_fault_op op)
{
    struct fault_plan *p = to_fault(fio)->plan;
    pthread_mutex_lock(&p->mtx);
    const unsigned long n = p->calls[op];
    pthread_mutex_unlock(&p->mtx);
    return n;
}

unsigned long qs_faultio_injected(qs_io *fio)
{
    struct fault_plan *p = to_fault(fio)->plan;
    pthread_mutex_lock(&p->mtx);
    const unsigned long n = p->injected;
    pthread_mutex_unlock(&p->mtx);
    return n;
}

int qs_faultio_set_volatile(qs_io *fio, bool on)
{
    struct faultio *f = to_fault(fio);
    int ret = 0;
    pthread_mutex_lock(&f->plan->mtx);
    if (f->dead) {
        ret = -EIO;
    } else if (!on && f->is_volatile) {
        ret = qs_io_flush(f->inner);
        pending_clear(f);
    }
    if (ret == 0) {
        f->is_volatile = on;
    }
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

size_t qs_faultio_pending(qs_io *fio)
{
    struct faultio *f = to_fault(fio);
    pthread_mutex_lock(&f->plan->mtx);
    const size_t n = f->n_pending;
    pthread_mutex_unlock(&f->plan->mtx);
    return n;
}

int qs_faultio_crash(qs_io *fio, qs_faultio_keep_fn keep, void *opaque)
{
    struct faultio *f = to_fault(fio);
    pthread_mutex_lock(&f->plan->mtx);
    size_t n_total;
    const int ret = crash_all(&f, 1, keep, opaque, &n_total);
    pthread_mutex_unlock(&f->plan->mtx);
    return ret;
}

int qs_faultio_crash_random(qs_io *fio, uint64_t seed, unsigned keep_percent)
{
    struct random_keep k = {seed_state(seed), keep_percent};
    return qs_faultio_crash(fio, keep_random, &k);
}

/* ---------------------------------------------------------------- environment */

static struct fault_plan env_plan = {
    .mtx = PTHREAD_MUTEX_INITIALIZER,
    .shared = true,
};
static pthread_once_t env_once = PTHREAD_ONCE_INIT;
static bool env_on;
static char env_error[256];

static bool parse_ulong(const char *s, unsigned long long min,
                        unsigned long long max, unsigned long long *out)
{
    if (!s || !*s || *s == '-') {
        return false;
    }
    char *end;
    errno = 0;
    const unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end || v < min || v > max) {
        return false;
    }
    *out = v;
    return true;
}

static bool parse_errno(const char *s, int *err)
{
    static const struct {
        const char *name;
        int err;
    } names[] = {
        {"EIO", EIO}, {"ENOSPC", ENOSPC}, {"EDQUOT", EDQUOT},
        {"EROFS", EROFS}, {"ENOMEM", ENOMEM},
    };
    if (!s) {
        *err = EIO;
        return true;
    }
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcmp(s, names[i].name) == 0) {
            *err = names[i].err;
            return true;
        }
    }
    unsigned long long v;
    if (parse_ulong(s, 1, 4095, &v)) {
        *err = (int)v;
        return true;
    }
    return false;
}

/* Parses QSNAP_FAULT into env_plan; false with env_error set if bad. */
static bool env_parse(const char *spec)
{
    char buf[256];
    if (strlen(spec) >= sizeof(buf)) {
        return false;
    }
    strcpy(buf, spec);
    char *field[5] = {NULL};
    size_t n = 0;
    char *save = NULL;
    for (char *t = strtok_r(buf, ":", &save); t; t = strtok_r(NULL, ":", &save)) {
        if (n == 5) {
            return false;
        }
        field[n++] = t;
    }
    unsigned long long v;
    if (n < 2 || !parse_ulong(field[1], 1, ULONG_MAX, &v)) {
        return false;
    }
    if (strcmp(field[0], "powercut") == 0) {
        unsigned long long seed = 1;
        unsigned long long percent = 50;
        if (n > 4 || (field[2] && !parse_ulong(field[2], 0, UINT64_MAX, &seed)) ||
            (field[3] && !parse_ulong(field[3], 0, 100, &percent))) {
            return false;
        }
        env_plan.start_volatile = true;
        env_plan.cut_at = (unsigned long)v;
        env_plan.seed = seed;
        env_plan.keep_percent = (unsigned)percent;
        return true;
    }
    for (int op = QS_FAULT_WRITE; op < QS_FAULT_N_OPS; op++) {
        if (strcmp(field[0], op_names[op]) == 0) {
            int err;
            if (n > 3 || !parse_errno(field[2], &err)) {
                return false;
            }
            env_plan.arm[op] = (struct fault_arm){(unsigned long)v, err, false};
            return true;
        }
    }
    return false;
}

static void env_init(void)
{
    const char *spec = secure_getenv("QSNAP_FAULT");
    if (!spec || !*spec) {
        return;
    }
    env_on = true;
    if (!env_parse(spec)) {
        snprintf(env_error, sizeof(env_error),
                 "QSNAP_FAULT: cannot parse '%.160s' (want OP:N[:ERR] or "
                 "powercut:N[:SEED[:PERCENT]])",
                 spec);
        return;
    }
    const char *log = secure_getenv("QSNAP_FAULT_LOG");
    if (log && *log) {
        env_plan.log_path = strdup(log);
    }
}

int qs_fault_env_wrap(const char *path, qs_io **io, char *err, size_t errlen)
{
    pthread_once(&env_once, env_init);
    if (!env_on) {
        return 0;
    }
    if (env_error[0]) {
        qs_fmt_err(err, errlen, "%s", env_error);
        qs_io_close(*io);
        *io = NULL;
        return -EINVAL;
    }
    struct faultio *f = wrapper_new(*io, path);
    if (!f) {
        qs_io_close(*io);
        *io = NULL;
        return -ENOMEM;
    }
    pthread_mutex_lock(&env_plan.mtx);
    f->plan = &env_plan;
    f->is_volatile = env_plan.start_volatile;
    f->dead = env_plan.cut_done;
    f->next = env_plan.wrappers;
    env_plan.wrappers = f;
    pthread_mutex_unlock(&env_plan.mtx);
    *io = &f->base;
    return 0;
}
