/*
 * testio.c - in-memory and fault-injecting qs_io back-ends for the unit
 * suites, and small shared helpers (see unit_util.h).
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unit_util.h"

/* ================================================================ memio */

struct memio {
    qs_io base;
    pthread_mutex_t mtx;
    unsigned refs;
    uint8_t *buf;
    uint64_t size;
    uint64_t cap;
    uint64_t max_size;
    bool logging;
    struct unit_op_rec *log;
    size_t n_log;
    size_t cap_log;
};

static const struct qs_io_ops memio_ops;

static struct memio *to_mem(qs_io *io)
{
    return (struct memio *)io;
}

static void mem_log(struct memio *m, enum unit_op op, uint64_t off,
                    uint64_t len)
{
    if (!m->logging) {
        return;
    }
    if (m->n_log == m->cap_log) {
        const size_t cap = m->cap_log ? m->cap_log * 2 : 256;
        struct unit_op_rec *n = realloc(m->log, cap * sizeof(*n));
        if (!n) {
            return; /* the log is best effort */
        }
        m->log = n;
        m->cap_log = cap;
    }
    m->log[m->n_log++] = (struct unit_op_rec){op, off, len};
}

/* Makes room for `size` bytes; new bytes read as zeros.  Lock held. */
static int mem_resize(struct memio *m, uint64_t size)
{
    if (size > m->cap) {
        uint64_t cap = m->cap ? m->cap : 65536;
        while (cap < size) {
            cap *= 2;
        }
        uint8_t *n = realloc(m->buf, (size_t)cap);
        if (!n) {
            return -ENOMEM;
        }
        memset(n + m->cap, 0, (size_t)(cap - m->cap));
        m->buf = n;
        m->cap = cap;
    }
    if (size < m->size) {
        memset(m->buf + size, 0, (size_t)(m->size - size));
    }
    m->size = size;
    return 0;
}

static uint64_t iov_total(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++) {
        t += iov[i].iov_len;
    }
    return t;
}

static int mem_preadv(qs_io *io, const struct iovec *iov, int n, uint64_t off)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    mem_log(m, UNIT_OP_READ, off, iov_total(iov, n));
    uint64_t pos = off;
    for (int i = 0; i < n; i++) {
        uint8_t *dst = iov[i].iov_base;
        const uint64_t len = iov[i].iov_len;
        uint64_t have = 0;
        if (pos < m->size) {
            have = QS_MIN(len, m->size - pos);
            memcpy(dst, m->buf + pos, (size_t)have);
        }
        memset(dst + have, 0, (size_t)(len - have));
        pos += len;
    }
    pthread_mutex_unlock(&m->mtx);
    return 0;
}

static int mem_pwritev(qs_io *io, const struct iovec *iov, int n, uint64_t off)
{
    struct memio *m = to_mem(io);
    const uint64_t len = iov_total(iov, n);
    int ret = 0;

    pthread_mutex_lock(&m->mtx);
    mem_log(m, UNIT_OP_WRITE, off, len);
    if (m->max_size && off + len > m->max_size) {
        ret = -ENOSPC;
        goto out;
    }
    if (off + len > m->size) {
        ret = mem_resize(m, off + len);
        if (ret < 0) {
            goto out;
        }
    }
    uint64_t pos = off;
    for (int i = 0; i < n; i++) {
        memcpy(m->buf + pos, iov[i].iov_base, iov[i].iov_len);
        pos += iov[i].iov_len;
    }
out:
    pthread_mutex_unlock(&m->mtx);
    return ret;
}

static int mem_flush(qs_io *io)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    mem_log(m, UNIT_OP_FLUSH, 0, 0);
    pthread_mutex_unlock(&m->mtx);
    return 0;
}

static int mem_truncate(qs_io *io, uint64_t size)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    mem_log(m, UNIT_OP_TRUNCATE, size, 0);
    int ret =
        (m->max_size && size > m->max_size) ? -ENOSPC : mem_resize(m, size);
    pthread_mutex_unlock(&m->mtx);
    return ret;
}

static int mem_punch(qs_io *io, uint64_t off, uint64_t len)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    mem_log(m, UNIT_OP_PUNCH, off, len);
    if (off < m->size) {
        memset(m->buf + off, 0, (size_t)QS_MIN(len, m->size - off));
    }
    pthread_mutex_unlock(&m->mtx);
    return 0;
}

static int mem_falloc(qs_io *io, uint64_t off, uint64_t len)
{
    struct memio *m = to_mem(io);
    int ret = 0;
    pthread_mutex_lock(&m->mtx);
    mem_log(m, UNIT_OP_FALLOC, off, len);
    if (off + len > m->size) {
        ret = (m->max_size && off + len > m->max_size)
                  ? -ENOSPC
                  : mem_resize(m, off + len);
    }
    pthread_mutex_unlock(&m->mtx);
    return ret;
}

static int mem_size(qs_io *io, uint64_t *size)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    *size = m->size;
    pthread_mutex_unlock(&m->mtx);
    return 0;
}

static int mem_seek(qs_io *io, uint64_t off, bool hole, uint64_t *res)
{
    /* Everything is data; the only hole is the end of the file. */
    uint64_t size;
    mem_size(io, &size);
    if (hole) {
        *res = off < size ? size : off;
    } else {
        *res = off < size ? off : size;
    }
    return 0;
}

static void mem_close(qs_io *io)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    const unsigned left = --m->refs;
    pthread_mutex_unlock(&m->mtx);
    if (left) {
        return;
    }
    pthread_mutex_destroy(&m->mtx);
    free(m->buf);
    free(m->log);
    free(m);
}

static const struct qs_io_ops memio_ops = {
    .preadv = mem_preadv,
    .pwritev = mem_pwritev,
    .flush = mem_flush,
    .truncate = mem_truncate,
    .punch = mem_punch,
    .falloc = mem_falloc,
    .reserve = mem_falloc,
    .size = mem_size,
    .disk_usage = mem_size,
    .seek = mem_seek,
    .close = mem_close,
};

qs_io *memio_new(void)
{
    struct memio *m = calloc(1, sizeof(*m));
    if (!m) {
        return NULL;
    }
    m->base.ops = &memio_ops;
    m->refs = 1;
    pthread_mutex_init(&m->mtx, NULL);
    return &m->base;
}

qs_io *memio_new_copy(const void *data, size_t len)
{
    qs_io *io = memio_new();
    if (io && len && qs_io_pwrite(io, data, len, 0) < 0) {
        qs_io_close(io);
        return NULL;
    }
    return io;
}

int memio_load_file(const char *path, qs_io **out)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        return -errno;
    }
    qs_io *io = memio_new();
    int ret = io ? 0 : -ENOMEM;
    uint8_t chunk[65536];
    uint64_t off = 0;
    while (ret == 0) {
        const size_t n = fread(chunk, 1, sizeof(chunk), f);
        if (n == 0) {
            ret = ferror(f) ? -EIO : 0;
            break;
        }
        ret = qs_io_pwrite(io, chunk, n, off);
        off += n;
    }
    fclose(f);
    if (ret < 0) {
        qs_io_close(io);
        return ret;
    }
    *out = io;
    return 0;
}

int memio_save_file(qs_io *io, const char *path)
{
    struct memio *m = to_mem(io);
    FILE *f = fopen(path, "wb");
    if (!f) {
        return -errno;
    }
    pthread_mutex_lock(&m->mtx);
    const size_t n = fwrite(m->buf, 1, (size_t)m->size, f);
    const bool ok = n == m->size;
    pthread_mutex_unlock(&m->mtx);
    if (fclose(f) != 0 || !ok) {
        return -EIO;
    }
    return 0;
}

qs_io *memio_clone(qs_io *io)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    qs_io *c = memio_new_copy(m->buf, (size_t)m->size);
    pthread_mutex_unlock(&m->mtx);
    return c;
}

qs_io *memio_ref(qs_io *io)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    m->refs++;
    pthread_mutex_unlock(&m->mtx);
    return io;
}

unsigned memio_refs(qs_io *io)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    const unsigned r = m->refs;
    pthread_mutex_unlock(&m->mtx);
    return r;
}

uint8_t *memio_data(qs_io *io, size_t *len)
{
    struct memio *m = to_mem(io);
    if (len) {
        *len = (size_t)m->size;
    }
    return m->buf;
}

uint64_t memio_size(qs_io *io)
{
    uint64_t s;
    mem_size(io, &s);
    return s;
}

void memio_set_max_size(qs_io *io, uint64_t max)
{
    to_mem(io)->max_size = max;
}

void memio_log_start(qs_io *io)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    m->n_log = 0;
    m->logging = true;
    pthread_mutex_unlock(&m->mtx);
}

void memio_log_stop(qs_io *io)
{
    struct memio *m = to_mem(io);
    pthread_mutex_lock(&m->mtx);
    m->logging = false;
    pthread_mutex_unlock(&m->mtx);
}

size_t memio_log_count(qs_io *io)
{
    return to_mem(io)->n_log;
}

const struct unit_op_rec *memio_log_get(qs_io *io, size_t i)
{
    struct memio *m = to_mem(io);
    return i < m->n_log ? &m->log[i] : NULL;
}

long memio_log_find(qs_io *io, size_t from, enum unit_op op, uint64_t off,
                    uint64_t len)
{
    struct memio *m = to_mem(io);
    for (size_t i = from; i < m->n_log; i++) {
        const struct unit_op_rec *r = &m->log[i];
        if (r->op != op) {
            continue;
        }
        if (op == UNIT_OP_FLUSH || op == UNIT_OP_TRUNCATE) {
            return (long)i;
        }
        if (r->off < off + len && off < r->off + r->len) {
            return (long)i;
        }
    }
    return -1;
}

/* ================================================================ misc */

uint64_t unit_rand(uint64_t *state)
{
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * UINT64_C(0x2545F4914F6CDD1D);
}

void unit_fill(uint8_t *buf, size_t len, uint64_t seed, uint64_t base)
{
    for (size_t i = 0; i < len; i++) {
        uint64_t x = (base + i) * UINT64_C(0x9E3779B97F4A7C15) + seed;
        x ^= x >> 29;
        x *= UINT64_C(0xBF58476D1CE4E5B9);
        x ^= x >> 32;
        buf[i] = (uint8_t)x;
    }
}

bool unit_all(const uint8_t *buf, size_t len, uint8_t v)
{
    for (size_t i = 0; i < len; i++) {
        if (buf[i] != v) {
            return false;
        }
    }
    return true;
}

char *unit_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    char *dir = malloc(4096);
    if (!dir) {
        return NULL;
    }
    snprintf(dir, 4096, "%s/qsnap-unit-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(dir)) {
        free(dir);
        return NULL;
    }
    return dir;
}

void unit_rmtree(char *dir)
{
    if (!dir) {
        return;
    }
    DIR *d = opendir(dir);
    if (d) {
        const struct dirent *e;
        char path[8192];
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
                continue;
            }
            snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
            unlink(path);
        }
        closedir(d);
    }
    rmdir(dir);
    free(dir);
}

int unit_make_image(const struct qsnap_create_opts *o, qs_io **out, char *err,
                    size_t errlen)
{
    char *dir = unit_tmpdir();
    if (!dir) {
        qs_fmt_err(err, errlen, "cannot make a temporary directory");
        return -EIO;
    }
    char path[4200];
    snprintf(path, sizeof(path), "%s/%s", dir, UNIT_IMAGE_NAME);
    int ret = qsnap_create(path, o, err, errlen);
    if (ret == 0) {
        ret = memio_load_file(path, out);
        if (ret < 0) {
            qs_fmt_err(err, errlen, "%s: loading: %s", path, strerror(-ret));
        }
    }
    unit_rmtree(dir);
    return ret;
}

int unit_make_simple(uint64_t size, uint32_t cluster_size, int version,
                     int refcount_bits, qs_io **out)
{
    struct qsnap_create_opts o;
    qsnap_create_opts_init(&o);
    o.size = size;
    o.cluster_size = cluster_size;
    o.version = version;
    o.refcount_bits = refcount_bits;
    return unit_make_image(&o, out, NULL, 0);
}

int unit_open(qs_io *io, unsigned flags, qsnap_image **out, char *err,
              size_t errlen)
{
    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    o.flags = flags;
    o.format = QSNAP_FMT_QCOW2;
    return qs_open_io(UNIT_IMAGE_NAME, io, &o, out, err, errlen);
}

int unit_check(qsnap_image *img, struct qsnap_check_result *res)
{
    memset(res, 0, sizeof(*res));
    res->struct_size = sizeof(*res);
    return qsnap_check(img, 0, res, NULL, NULL);
}
