/*
 * qsnap_tool.c - a test driver for libqsnap, built on the public API only.
 *
 * The integration scripts use it to drive the library the way a VMM block
 * layer would and to read images back for comparison with QEMU:
 *
 *   random   seeded sequences of writes, zeroing, discards, flushes and
 *            reopens, mirrored on a raw model file, then compared
 *   stress   several threads writing interleaved clusters of one handle
 *   dump     guest content to a raw file
 *   digest   XXH64 of the guest content
 *   hash     XXH64 of a plain host file (no libqsnap involved)
 *   walk     read everything, map everything, check; exit 1 on any error
 *   ops      explicit operations read from standard input (reproducers)
 *   fill, discard-all, write, verify, hold, create, info
 *
 * Exit status: 0 success, 1 failure (mismatch or library error), 2 usage.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <xxhash.h>

#include <qsnap.h>

#include "driver_util.h"

#define PROG "qsnap-tool"
#define CHUNK (1024u * 1024u)

const char drv_prog[] = PROG;

/* ------------------------------------------------------------------ */
/* Small helpers                                                      */
/* ------------------------------------------------------------------ */

static uint8_t need_byte(const char *s)
{
    uint64_t v;

    if (!parse_size(s, &v) || v > 255) {
        msg("invalid pattern byte '%s' (0..255, e.g. 0xa5)", s);
        exit(2);
    }
    return (uint8_t)v;
}

static int get_info(qsnap_image *img, struct qsnap_info *info)
{
    int rc;

    memset(info, 0, sizeof(*info));
    info->struct_size = sizeof(*info);
    rc = qsnap_get_info(img, info);
    if (rc < 0) {
        report(img, "get_info", rc);
    }
    return rc;
}

static bool all_zero(const uint8_t *buf, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++) {
        if (buf[i]) {
            return false;
        }
    }
    return true;
}

/* Index of the first differing byte, or len if equal. */
static size_t first_diff(const uint8_t *a, const uint8_t *b, size_t len)
{
    size_t i;

    if (memcmp(a, b, len) == 0) {
        return len;
    }
    for (i = 0; i < len; i++) {
        if (a[i] != b[i]) {
            break;
        }
    }
    return i;
}

static int write_full(int fd, const void *buf, size_t len, off_t off)
{
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = pwrite(fd, p, len, off);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return -1;
        }
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

static ssize_t read_full(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;
    size_t done = 0;

    while (done < len) {
        ssize_t n = read(fd, p + done, len - done);

        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return -1;
        }
        if (n == 0) {
            break;
        }
        done += (size_t)n;
    }
    return (ssize_t)done;
}

/* ------------------------------------------------------------------ */
/* Deterministic PRNG (splitmix64)                                    */
/* ------------------------------------------------------------------ */

struct rng {
    uint64_t s;
};

static uint64_t rng_next(struct rng *r)
{
    uint64_t z;

    r->s += 0x9E3779B97F4A7C15ull;
    z = r->s;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform-enough value in [0, n); 0 when n is 0. */
static uint64_t rng_below(struct rng *r, uint64_t n)
{
    return n ? rng_next(r) % n : 0;
}

static bool rng_percent(struct rng *r, unsigned pct)
{
    return rng_below(r, 100) < pct;
}

/* Random bytes, or (sometimes) zeros or a compressible pattern. */
static void rng_data(struct rng *r, uint8_t *buf, size_t len)
{
    const uint64_t kind = rng_below(r, 10);
    size_t i;

    if (kind == 0) {
        memset(buf, 0, len);
    } else if (kind == 1) {
        memset(buf, (int)(1 + rng_below(r, 255)), len);
    } else if (kind == 2) {
        /* Compressible: short random runs. */
        for (i = 0; i < len;) {
            const size_t run = 1 + (size_t)rng_below(r, 64);
            const uint8_t b = (uint8_t)rng_next(r);
            size_t j;

            for (j = 0; j < run && i < len; j++) {
                buf[i++] = b;
            }
        }
    } else {
        for (i = 0; i + 8 <= len; i += 8) {
            const uint64_t v = rng_next(r);

            memcpy(buf + i, &v, 8);
        }
        for (; i < len; i++) {
            buf[i] = (uint8_t)rng_next(r);
        }
    }
}

/* ------------------------------------------------------------------ */
/* Whole-disk reading                                                 */
/* ------------------------------------------------------------------ */

typedef int (*chunk_fn)(void *ctx, const uint8_t *buf, size_t len,
                        uint64_t off);

static int read_all(qsnap_image *img, uint64_t size, chunk_fn fn, void *ctx)
{
    uint8_t *buf = xmalloc(CHUNK);
    uint64_t off;
    int rc = 0;

    for (off = 0; off < size; off += CHUNK) {
        const size_t len =
            (size - off < CHUNK) ? (size_t)(size - off) : (size_t)CHUNK;

        rc = qsnap_pread(img, buf, len, off);
        if (rc < 0) {
            char what[96];

            snprintf(what, sizeof(what), "read of %zu bytes at 0x%" PRIx64, len,
                     off);
            report(img, what, rc);
            break;
        }
        rc = fn(ctx, buf, len, off);
        if (rc < 0) {
            break;
        }
    }
    free(buf);
    return rc < 0 ? rc : 0;
}

/* ------------------------------------------------------------------ */
/* random                                                             */
/* ------------------------------------------------------------------ */

enum op_kind {
    OP_PWRITE,
    OP_PWRITEV,
    OP_ZERO,
    OP_ZERO_UNMAP,
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_COMPRESSED,
    OP_REOPEN,
    OP_COUNT
};

static const char *const op_names[OP_COUNT] = {
    "pwrite",  "pwritev", "write_zeroes", "write_zeroes(unmap)",
    "discard", "flush",   "read",         "write_compressed",
    "reopen",
};

struct rstate {
    const char *path;
    qsnap_image *img;
    uint8_t *model;
    uint64_t size;
    uint64_t cluster;
    uint64_t max_len;
    uint64_t cache_size;
    unsigned open_flags; /* extra QSNAP_OPEN_* flags */
    uint64_t hot[8];
    struct rng rng;
    uint64_t seed;
    uint8_t *buf;     /* data to write */
    uint8_t *scatter; /* iovec pieces, spread out */
    uint8_t *rbuf;    /* read-back */
    size_t buf_len;
    char desc[200];
    unsigned long opno;
    unsigned long counts[OP_COUNT];
    bool verbose;
};

static uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

static uint64_t pick_offset(struct rstate *st)
{
    struct rng *r = &st->rng;
    const uint64_t c = st->cluster;
    const uint64_t kind = rng_below(r, 100);
    uint64_t off;

    if (kind < 40) {
        /* Around a few hot spots, so that ranges overlap often. */
        const uint64_t base = st->hot[rng_below(r, 8)];
        const uint64_t delta = rng_below(r, 4 * c);

        off = base + delta;
        off = off >= 2 * c ? off - 2 * c : 0;
    } else if (kind < 60) {
        off = rng_below(r, (st->size + c - 1) / c) * c;
    } else if (kind < 70) {
        off = st->size - rng_below(r, min_u64(st->size, 3 * c) + 1);
    } else if (kind < 80) {
        off = rng_below(r, (st->size + 511) / 512) * 512;
    } else {
        off = rng_below(r, st->size);
    }
    return off >= st->size ? st->size - 1 : off;
}

static uint64_t pick_len(struct rstate *st, uint64_t off)
{
    struct rng *r = &st->rng;
    const uint64_t c = st->cluster;
    const uint64_t kind = rng_below(r, 100);
    uint64_t len;

    if (kind < 2) {
        len = 0;
    } else if (kind < 22) {
        len = 1 + rng_below(r, 511);
    } else if (kind < 45) {
        len = 1 + rng_below(r, c);
    } else if (kind < 60) {
        len = c * (1 + rng_below(r, 4));
    } else if (kind < 80) {
        len = c + rng_below(r, 3 * c);
    } else {
        len = 1 + rng_below(r, st->max_len);
    }
    len = min_u64(len, st->max_len);
    return min_u64(len, st->size - off);
}

/*
 * Builds an iovec array over `len` bytes of st->buf copied into
 * st->scatter, with gaps and odd alignment between the pieces.
 */
static int make_iov(struct rstate *st, struct iovec *iov, int max_iov,
                    size_t len, bool copy)
{
    const int n = 1 + (int)rng_below(&st->rng, (uint64_t)max_iov);
    size_t done = 0;
    size_t pos = 1;
    int i;

    if (len == 0) {
        iov[0].iov_base = st->scatter;
        iov[0].iov_len = 0;
        return 1;
    }
    for (i = 0; i < n && done < len; i++) {
        size_t piece;

        if (i == n - 1) {
            piece = len - done;
        } else if (rng_percent(&st->rng, 30)) {
            piece = 1 + (size_t)rng_below(&st->rng, 7);
        } else {
            piece = 1 + (size_t)rng_below(&st->rng, len - done);
        }
        piece = piece > len - done ? len - done : piece;
        iov[i].iov_base = st->scatter + pos;
        iov[i].iov_len = piece;
        if (copy) {
            memcpy(st->scatter + pos, st->buf + done, piece);
        }
        done += piece;
        pos += piece + 1 + (size_t)rng_below(&st->rng, 63);
    }
    return i;
}

static void print_mismatch(const struct rstate *st, uint64_t off, uint8_t got,
                           uint8_t want, const char *when)
{
    msg("MISMATCH at guest offset 0x%" PRIx64 " (%" PRIu64 "): image has "
        "0x%02x, model has 0x%02x (%s, seed 0x%016" PRIx64 ")",
        off, off, got, want, when, st->seed);
    if (st->opno) {
        msg("last operation #%lu: %s", st->opno, st->desc);
    }
}

/* Reads [off, off+len) back and compares it with the model. */
static int verify_range(struct rstate *st, uint64_t off, uint64_t len,
                        const char *when)
{
    while (len > 0) {
        const size_t n = (size_t)min_u64(len, st->buf_len);
        size_t d;
        int rc = qsnap_pread(st->img, st->rbuf, n, off);

        if (rc < 0) {
            char what[96];

            snprintf(what, sizeof(what), "read of %zu bytes at 0x%" PRIx64, n,
                     off);
            report(st->img, what, rc);
            msg("after operation #%lu: %s", st->opno, st->desc);
            return -1;
        }
        d = first_diff(st->rbuf, st->model + off, n);
        if (d < n) {
            print_mismatch(st, off + d, st->rbuf[d], st->model[off + d], when);
            return -1;
        }
        off += n;
        len -= n;
    }
    return 0;
}

static int verify_around(struct rstate *st, uint64_t off, uint64_t len)
{
    const uint64_t c = st->cluster;
    const uint64_t lo = off >= c ? off - c : 0;
    const uint64_t hi = min_u64(st->size, off + len + c);

    return verify_range(st, lo, hi - lo, "read-back after the operation");
}

static int random_reopen(struct rstate *st)
{
    int rc = close_image(st->img);

    st->img = NULL;
    if (rc < 0) {
        return rc;
    }
    return open_image(st->path, QSNAP_OPEN_RDWR | st->open_flags,
                      QSNAP_FMT_AUTO, st->cache_size, &st->img);
}

static int random_op(struct rstate *st, enum op_kind kind)
{
    struct iovec iov[16];
    uint64_t off = pick_offset(st);
    uint64_t len = pick_len(st, off);
    unsigned flags = 0;
    int rc = 0;
    int n;

    switch (kind) {
    case OP_PWRITE:
        rng_data(&st->rng, st->buf, (size_t)len);
        snprintf(st->desc, sizeof(st->desc),
                 "pwrite off=0x%" PRIx64 " len=0x%" PRIx64, off, len);
        if (st->verbose) {
            msg("#%lu %s", st->opno, st->desc);
        }
        rc = qsnap_pwrite(st->img, st->buf, (size_t)len, off);
        if (rc >= 0) {
            memcpy(st->model + off, st->buf, (size_t)len);
        }
        break;
    case OP_PWRITEV:
        rng_data(&st->rng, st->buf, (size_t)len);
        n = make_iov(st, iov, 16, (size_t)len, true);
        snprintf(st->desc, sizeof(st->desc),
                 "pwritev off=0x%" PRIx64 " len=0x%" PRIx64 " iovcnt=%d", off,
                 len, n);
        if (st->verbose) {
            msg("#%lu %s", st->opno, st->desc);
        }
        rc = qsnap_pwritev(st->img, iov, n, off);
        if (rc >= 0) {
            memcpy(st->model + off, st->buf, (size_t)len);
        }
        break;
    case OP_ZERO_UNMAP:
        flags = QSNAP_ZERO_MAY_UNMAP;
        /* fall through */
    case OP_ZERO:
        snprintf(st->desc, sizeof(st->desc),
                 "write_zeroes off=0x%" PRIx64 " len=0x%" PRIx64 " flags=%u",
                 off, len, flags);
        if (st->verbose) {
            msg("#%lu %s", st->opno, st->desc);
        }
        rc = qsnap_write_zeroes(st->img, off, len, flags);
        if (rc >= 0) {
            memset(st->model + off, 0, (size_t)len);
        }
        break;
    case OP_DISCARD:
        snprintf(st->desc, sizeof(st->desc),
                 "discard off=0x%" PRIx64 " len=0x%" PRIx64, off, len);
        if (st->verbose) {
            msg("#%lu %s", st->opno, st->desc);
        }
        rc = qsnap_discard(st->img, off, len);
        if (rc >= 0) {
            memset(st->model + off, 0, (size_t)len);
        }
        break;
    case OP_FLUSH:
        len = 0;
        snprintf(st->desc, sizeof(st->desc), "flush");
        if (st->verbose) {
            msg("#%lu %s", st->opno, st->desc);
        }
        rc = qsnap_flush(st->img);
        break;
    case OP_READ:
        n = make_iov(st, iov, 16, (size_t)len, false);
        snprintf(st->desc, sizeof(st->desc),
                 "preadv off=0x%" PRIx64 " len=0x%" PRIx64 " iovcnt=%d", off,
                 len, n);
        if (st->verbose) {
            msg("#%lu %s", st->opno, st->desc);
        }
        rc = qsnap_preadv(st->img, iov, n, off);
        if (rc >= 0) {
            uint64_t pos = off;
            int i;

            for (i = 0; i < n; i++) {
                const size_t d = first_diff(iov[i].iov_base, st->model + pos,
                                            iov[i].iov_len);

                if (d < iov[i].iov_len) {
                    print_mismatch(st, pos + d, ((uint8_t *)iov[i].iov_base)[d],
                                   st->model[pos + d], "preadv");
                    return -1;
                }
                pos += iov[i].iov_len;
            }
        }
        len = 0;
        break;
    case OP_COMPRESSED:
        off = rng_below(&st->rng, (st->size + st->cluster - 1) / st->cluster) *
              st->cluster;
        len = min_u64(st->cluster, st->size - off);
        rng_data(&st->rng, st->buf, (size_t)len);
        snprintf(st->desc, sizeof(st->desc),
                 "write_compressed off=0x%" PRIx64 " len=0x%" PRIx64, off, len);
        if (st->verbose) {
            msg("#%lu %s", st->opno, st->desc);
        }
        rc = qsnap_write_compressed(st->img, st->buf, (size_t)len, off);
        if (rc >= 0) {
            memcpy(st->model + off, st->buf, (size_t)len);
        }
        break;
    case OP_REOPEN:
        len = 0;
        snprintf(st->desc, sizeof(st->desc), "close and reopen");
        if (st->verbose) {
            msg("#%lu %s", st->opno, st->desc);
        }
        return random_reopen(st) < 0 ? -1 : 0;
    case OP_COUNT:
        break;
    }
    if (rc < 0) {
        char what[240];

        snprintf(what, sizeof(what), "operation #%lu %s", st->opno, st->desc);
        report(st->img, what, rc);
        return -1;
    }
    if (len > 0) {
        return verify_around(st, off, len);
    }
    return 0;
}

static enum op_kind pick_op(struct rstate *st, bool reopen, bool compress)
{
    /* Weights, in the order of enum op_kind. */
    static const unsigned weights[OP_COUNT] = {
        34, 14, 9, 8, 10, 4, 12, 6, 2,
    };
    unsigned total = 0;
    unsigned i;
    uint64_t x;

    for (i = 0; i < OP_COUNT; i++) {
        if ((i == OP_REOPEN && !reopen) || (i == OP_COMPRESSED && !compress)) {
            continue;
        }
        total += weights[i];
    }
    x = rng_below(&st->rng, total);
    for (i = 0; i < OP_COUNT; i++) {
        if ((i == OP_REOPEN && !reopen) || (i == OP_COMPRESSED && !compress)) {
            continue;
        }
        if (x < weights[i]) {
            return (enum op_kind)i;
        }
        x -= weights[i];
    }
    return OP_PWRITE;
}

static int cmd_random(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"seed", required_argument, NULL, 's'},
        {"ops", required_argument, NULL, 'n'},
        {"max-len", required_argument, NULL, 'm'},
        {"cache-size", required_argument, NULL, 'c'},
        {"reopen", no_argument, NULL, 'r'},
        {"compress", no_argument, NULL, 'z'},
        {"nocache", no_argument, NULL, 'D'},
        {"writethrough", no_argument, NULL, 'W'},
        {"verbose", no_argument, NULL, 'v'},
        {NULL, 0, NULL, 0},
    };
    struct rstate st;
    struct qsnap_info info;
    uint64_t seed = 1;
    uint64_t ops = 200;
    uint64_t max_len = 0;
    bool reopen = false;
    bool compress = false;
    struct stat sb;
    const char *model_path;
    int fd;
    int c;
    int ret = 1;
    unsigned i;

    memset(&st, 0, sizeof(st));
    while ((c = getopt_long(argc, argv, "s:n:m:c:rzDWv", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 's':
            seed = need_size("seed", optarg);
            break;
        case 'n':
            ops = need_size("operation count", optarg);
            break;
        case 'm':
            max_len = need_size("maximum length", optarg);
            break;
        case 'c':
            st.cache_size = need_size("cache size", optarg);
            break;
        case 'r':
            reopen = true;
            break;
        case 'z':
            compress = true;
            break;
        case 'D':
            st.open_flags |= QSNAP_OPEN_NOCACHE;
            break;
        case 'W':
            st.open_flags |= QSNAP_OPEN_WRITETHROUGH;
            break;
        case 'v':
            st.verbose = true;
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 2) {
        msg("random: expected MODEL.raw IMAGE");
        return 2;
    }
    model_path = argv[optind];
    st.path = argv[optind + 1];
    printf("seed %" PRIu64 "\n", seed);
    fflush(stdout);

    if (open_image(st.path, QSNAP_OPEN_RDWR | st.open_flags, QSNAP_FMT_AUTO,
                   st.cache_size, &st.img) < 0) {
        return 1;
    }
    if (get_info(st.img, &info) < 0) {
        goto out;
    }
    st.size = info.virtual_size;
    st.cluster = info.cluster_size ? info.cluster_size : 65536;
    if (st.size == 0) {
        msg("%s: virtual size is 0, nothing to test", st.path);
        goto out;
    }
    if (max_len == 0) {
        max_len = min_u64(4 * st.cluster + 4097, 8u * 1024 * 1024);
    }
    st.max_len = min_u64(max_len, st.size);
    st.buf_len = (size_t)(st.max_len + 2 * st.cluster);
    if (st.buf_len < CHUNK) {
        st.buf_len = CHUNK;
    }
    st.buf = xmalloc(st.buf_len);
    st.rbuf = xmalloc(st.buf_len);
    st.scatter = xmalloc(st.buf_len + 16 * 64 + 64);

    fd = open(model_path, O_RDWR);
    if (fd < 0 || fstat(fd, &sb) < 0) {
        msg("%s: %s", model_path, strerror(errno));
        goto out;
    }
    if ((uint64_t)sb.st_size != st.size) {
        msg("%s: model size %lld differs from the virtual size %" PRIu64,
            model_path, (long long)sb.st_size, st.size);
        close(fd);
        goto out;
    }
    st.model =
        mmap(NULL, (size_t)st.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (st.model == MAP_FAILED) {
        msg("%s: mmap: %s", model_path, strerror(errno));
        st.model = NULL;
        goto out;
    }

    st.seed = seed;
    st.rng.s = seed;
    for (i = 0; i < 8; i++) {
        st.hot[i] = rng_below(&st.rng, st.size);
    }
    st.hot[0] = 0;
    st.hot[1] = st.size - 1;

    if (verify_range(&st, 0, st.size, "initial content") < 0) {
        goto out;
    }
    for (st.opno = 1; st.opno <= ops; st.opno++) {
        const enum op_kind k = pick_op(&st, reopen, compress);

        st.counts[k]++;
        if (random_op(&st, k) < 0) {
            goto out;
        }
    }
    st.opno = ops;
    snprintf(st.desc, sizeof(st.desc), "(end of the sequence)");
    if (verify_range(&st, 0, st.size, "final read of the whole disk") < 0) {
        goto out;
    }
    ret = 0;
    printf("ok: %" PRIu64 " operations on %s (%" PRIu64
           " bytes, cluster %" PRIu64 "):",
           ops, st.path, st.size, st.cluster);
    for (i = 0; i < OP_COUNT; i++) {
        if (st.counts[i]) {
            printf(" %s=%lu", op_names[i], st.counts[i]);
        }
    }
    printf("\n");

out:
    if (st.img && close_image(st.img) < 0) {
        ret = 1;
    }
    if (st.model) {
        msync(st.model, (size_t)st.size, MS_SYNC);
        munmap(st.model, (size_t)st.size);
    }
    free(st.buf);
    free(st.rbuf);
    free(st.scatter);
    return ret;
}

/* ------------------------------------------------------------------ */
/* stress: threads on interleaved clusters of one handle              */
/* ------------------------------------------------------------------ */

struct stress_shared {
    qsnap_image *img;
    uint8_t *model;
    uint64_t size;
    uint64_t cluster;
    uint64_t n_clusters;
    unsigned n_threads;
    uint64_t ops;
    uint64_t seed;
    atomic_int failed;
    pthread_mutex_t lock;
};

struct stress_thread {
    struct stress_shared *sh;
    unsigned idx;
    pthread_t tid;
};

static void stress_fail(struct stress_shared *sh, unsigned t, uint64_t opno,
                        const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void stress_fail(struct stress_shared *sh, unsigned t, uint64_t opno,
                        const char *fmt, ...)
{
    va_list ap;

    pthread_mutex_lock(&sh->lock);
    if (!sh->failed) {
        const char *m = qsnap_errmsg(sh->img);

        fprintf(stderr, PROG ": stress thread %u op #%" PRIu64 ": ", t, opno);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        if (m && m[0]) {
            fprintf(stderr, PROG ": last library message: %s\n", m);
        }
    }
    sh->failed = 1;
    pthread_mutex_unlock(&sh->lock);
}

static void *stress_main(void *arg)
{
    struct stress_thread *th = arg;
    struct stress_shared *sh = th->sh;
    const uint64_t c = sh->cluster;
    const uint64_t mine =
        (sh->n_clusters - th->idx + sh->n_threads - 1) / sh->n_threads;
    uint8_t *buf = xmalloc((size_t)c);
    uint8_t *rbuf = xmalloc((size_t)c);
    struct rng r;
    uint64_t opno;

    r.s = sh->seed ^ (0xA24BAED4963EE407ull * (th->idx + 1));
    for (opno = 1; opno <= sh->ops && !sh->failed; opno++) {
        const uint64_t cl = th->idx + sh->n_threads * rng_below(&r, mine);
        const uint64_t base = cl * c;
        const uint64_t clen = min_u64(c, sh->size - base);
        const uint64_t kind = rng_below(&r, 100);
        uint64_t off = base;
        uint64_t len = clen;
        size_t d;
        int rc;

        if (rng_percent(&r, 60)) {
            off = base + rng_below(&r, clen);
            len = 1 + rng_below(&r, base + clen - off);
        }
        if (kind < 55) {
            rng_data(&r, buf, (size_t)len);
            rc = qsnap_pwrite(sh->img, buf, (size_t)len, off);
            if (rc >= 0) {
                memcpy(sh->model + off, buf, (size_t)len);
            }
        } else if (kind < 70) {
            rc = qsnap_write_zeroes(sh->img, off, len,
                                    rng_percent(&r, 50) ? QSNAP_ZERO_MAY_UNMAP
                                                        : 0);
            if (rc >= 0) {
                memset(sh->model + off, 0, (size_t)len);
            }
        } else if (kind < 85) {
            rc = qsnap_discard(sh->img, off, len);
            if (rc >= 0) {
                memset(sh->model + off, 0, (size_t)len);
            }
        } else if (kind < 88) {
            rc = qsnap_flush(sh->img);
        } else if (kind < 95) {
            /* A whole cluster, compressed (in parallel with the others). */
            off = base;
            len = clen;
            rng_data(&r, buf, (size_t)len);
            rc = qsnap_write_compressed(sh->img, buf, (size_t)len, off);
            if (rc >= 0) {
                memcpy(sh->model + off, buf, (size_t)len);
            }
        } else {
            rc = 0;
        }
        if (rc < 0) {
            stress_fail(sh, th->idx, opno,
                        "operation %" PRIu64 " at 0x%" PRIx64 "+0x%" PRIx64
                        " failed: %s",
                        kind, off, len, qsnap_strerror(rc));
            break;
        }
        rc = qsnap_pread(sh->img, rbuf, (size_t)clen, base);
        if (rc < 0) {
            stress_fail(sh, th->idx, opno, "read at 0x%" PRIx64 " failed: %s",
                        base, qsnap_strerror(rc));
            break;
        }
        d = first_diff(rbuf, sh->model + base, (size_t)clen);
        if (d < clen) {
            stress_fail(sh, th->idx, opno,
                        "MISMATCH at guest offset 0x%" PRIx64
                        ": image 0x%02x, model 0x%02x (after op kind %" PRIu64
                        " at 0x%" PRIx64 "+0x%" PRIx64 ")",
                        base + d, rbuf[d], sh->model[base + d], kind, off, len);
            break;
        }
    }
    free(buf);
    free(rbuf);
    return NULL;
}

struct cmp_ctx {
    const uint8_t *model;
    uint64_t mismatch;
    bool bad;
};

static int cmp_chunk(void *ctx, const uint8_t *buf, size_t len, uint64_t off)
{
    struct cmp_ctx *cc = ctx;
    const size_t d = first_diff(buf, cc->model + off, len);

    if (d < len) {
        msg("MISMATCH at guest offset 0x%" PRIx64 ": image 0x%02x, model "
            "0x%02x",
            off + d, buf[d], cc->model[off + d]);
        cc->bad = true;
        return -1;
    }
    return 0;
}

static int copy_chunk(void *ctx, const uint8_t *buf, size_t len, uint64_t off)
{
    memcpy((uint8_t *)ctx + off, buf, len);
    return 0;
}

static int cmd_stress(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"seed", required_argument, NULL, 's'},
        {"ops", required_argument, NULL, 'n'},
        {"threads", required_argument, NULL, 't'},
        {"cache-size", required_argument, NULL, 'c'},
        {NULL, 0, NULL, 0},
    };
    struct stress_shared sh;
    struct stress_thread th[64];
    struct qsnap_info info;
    struct cmp_ctx cc;
    uint64_t threads = 4;
    uint64_t cache_size = 0;
    unsigned i;
    int c;
    int ret = 1;

    memset(&sh, 0, sizeof(sh));
    sh.seed = 1;
    sh.ops = 500;
    while ((c = getopt_long(argc, argv, "s:n:t:c:", longopts, NULL)) != -1) {
        switch (c) {
        case 's':
            sh.seed = need_size("seed", optarg);
            break;
        case 'n':
            sh.ops = need_size("operation count", optarg);
            break;
        case 't':
            threads = need_size("thread count", optarg);
            break;
        case 'c':
            cache_size = need_size("cache size", optarg);
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 1 || threads < 1 || threads > 64) {
        msg("stress: expected [--threads 1..64] IMAGE");
        return 2;
    }
    printf("seed %" PRIu64 "\n", sh.seed);
    fflush(stdout);
    if (open_image(argv[optind], QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, cache_size,
                   &sh.img) < 0) {
        return 1;
    }
    if (get_info(sh.img, &info) < 0) {
        goto out;
    }
    sh.size = info.virtual_size;
    sh.cluster = info.cluster_size ? info.cluster_size : 65536;
    sh.n_clusters = (sh.size + sh.cluster - 1) / sh.cluster;
    sh.n_threads = (unsigned)threads;
    if (sh.n_clusters < threads) {
        msg("stress: the image has fewer clusters than threads");
        goto out;
    }
    sh.model = xmalloc((size_t)sh.size);
    if (read_all(sh.img, sh.size, copy_chunk, sh.model) < 0) {
        goto out;
    }
    pthread_mutex_init(&sh.lock, NULL);
    for (i = 0; i < sh.n_threads; i++) {
        th[i].sh = &sh;
        th[i].idx = i;
        if (pthread_create(&th[i].tid, NULL, stress_main, &th[i]) != 0) {
            msg("pthread_create failed");
            exit(1);
        }
    }
    for (i = 0; i < sh.n_threads; i++) {
        pthread_join(th[i].tid, NULL);
    }
    pthread_mutex_destroy(&sh.lock);
    if (sh.failed) {
        goto out;
    }
    cc.model = sh.model;
    cc.bad = false;
    if (read_all(sh.img, sh.size, cmp_chunk, &cc) < 0) {
        goto out;
    }
    printf("ok: %u threads x %" PRIu64 " operations\n", sh.n_threads, sh.ops);
    ret = 0;
out:
    if (sh.img && close_image(sh.img) < 0) {
        ret = 1;
    }
    free(sh.model);
    return ret;
}

/* ------------------------------------------------------------------ */
/* dump, digest, hash                                                 */
/* ------------------------------------------------------------------ */

struct dump_ctx {
    int fd;
};

static int dump_chunk(void *ctx, const uint8_t *buf, size_t len, uint64_t off)
{
    const struct dump_ctx *dc = ctx;

    if (all_zero(buf, len)) {
        return 0; /* leave a hole; the file is sized at the end */
    }
    if (write_full(dc->fd, buf, len, (off_t)off) < 0) {
        msg("write of the output failed: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static int hash_chunk(void *ctx, const uint8_t *buf, size_t len, uint64_t off)
{
    (void)off;
    return XXH64_update(ctx, buf, len) == XXH_OK ? 0 : -1;
}

static int parse_fmt_only(int argc, char **argv, int *format)
{
    static const struct option longopts[] = {
        {"format", required_argument, NULL, 'f'},
        {NULL, 0, NULL, 0},
    };
    int c;

    while ((c = getopt_long(argc, argv, "f:", longopts, NULL)) != -1) {
        if (c == 'f') {
            *format = parse_format(optarg);
        } else {
            return -1;
        }
    }
    return 0;
}

static int cmd_dump(int argc, char **argv)
{
    struct qsnap_info info;
    struct dump_ctx dc;
    qsnap_image *img;
    int format = QSNAP_FMT_AUTO;
    int ret = 1;

    if (parse_fmt_only(argc, argv, &format) < 0 || argc - optind != 2) {
        msg("dump: expected [-f FMT] IMAGE OUT.raw");
        return 2;
    }
    if (open_image(argv[optind], QSNAP_OPEN_FORCE_SHARE, format, 0, &img) < 0) {
        return 1;
    }
    dc.fd = open(argv[optind + 1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (dc.fd < 0) {
        msg("%s: %s", argv[optind + 1], strerror(errno));
        close_image(img);
        return 1;
    }
    if (get_info(img, &info) == 0 &&
        read_all(img, info.virtual_size, dump_chunk, &dc) == 0) {
        if (ftruncate(dc.fd, (off_t)info.virtual_size) < 0 ||
            fsync(dc.fd) < 0) {
            msg("%s: %s", argv[optind + 1], strerror(errno));
        } else {
            ret = 0;
        }
    }
    if (close(dc.fd) < 0) {
        ret = 1;
    }
    if (close_image(img) < 0) {
        ret = 1;
    }
    return ret;
}

static int cmd_digest(int argc, char **argv)
{
    struct qsnap_info info;
    qsnap_image *img;
    XXH64_state_t *state;
    int format = QSNAP_FMT_AUTO;
    int ret = 1;

    if (parse_fmt_only(argc, argv, &format) < 0 || argc - optind != 1) {
        msg("digest: expected [-f FMT] IMAGE");
        return 2;
    }
    if (open_image(argv[optind], QSNAP_OPEN_FORCE_SHARE, format, 0, &img) < 0) {
        return 1;
    }
    state = XXH64_createState();
    if (!state || XXH64_reset(state, 0) != XXH_OK) {
        msg("cannot set up XXH64");
        exit(1);
    }
    if (get_info(img, &info) == 0 &&
        read_all(img, info.virtual_size, hash_chunk, state) == 0) {
        printf("%016llx\n", (unsigned long long)XXH64_digest(state));
        ret = 0;
    }
    XXH64_freeState(state);
    if (close_image(img) < 0) {
        ret = 1;
    }
    return ret;
}

static int cmd_hash(int argc, char **argv)
{
    XXH64_state_t *state;
    uint8_t *buf;
    int fd;
    int ret = 0;

    if (argc != 2) {
        msg("hash: expected FILE");
        return 2;
    }
    fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        msg("%s: %s", argv[1], strerror(errno));
        return 1;
    }
    state = XXH64_createState();
    if (!state || XXH64_reset(state, 0) != XXH_OK) {
        msg("cannot set up XXH64");
        exit(1);
    }
    buf = xmalloc(CHUNK);
    for (;;) {
        const ssize_t n = read_full(fd, buf, CHUNK);

        if (n < 0) {
            msg("%s: %s", argv[1], strerror(errno));
            ret = 1;
            break;
        }
        if (n == 0) {
            break;
        }
        XXH64_update(state, buf, (size_t)n);
    }
    if (ret == 0) {
        printf("%016llx\n", (unsigned long long)XXH64_digest(state));
    }
    free(buf);
    XXH64_freeState(state);
    close(fd);
    return ret;
}

/* ------------------------------------------------------------------ */
/* walk                                                               */
/* ------------------------------------------------------------------ */

struct walk_ctx {
    const char *path;
    unsigned long n_reports;
};

static void walk_report(void *opaque, int level, const char *text)
{
    struct walk_ctx *wc = opaque;

    wc->n_reports++;
    fprintf(stderr, PROG ": %s: check (%s): %s\n", wc->path,
            level == 0 ? "corruption" : "leak", text ? text : "(null)");
}

static int walk_nop(void *ctx, const uint8_t *buf, size_t len, uint64_t off)
{
    (void)ctx;
    (void)buf;
    (void)len;
    (void)off;
    return 0;
}

/* Block status said "zero": the range must read as zeros. */
static int check_zero(qsnap_image *img, const char *path, uint64_t off,
                      uint64_t len)
{
    uint8_t *buf = xmalloc(CHUNK);
    int ret = 0;

    while (len > 0 && ret == 0) {
        const size_t n = (size_t)min_u64(len, CHUNK);
        const int rc = qsnap_pread(img, buf, n, off);
        size_t i;

        if (rc < 0) {
            report(img, "read of a zero extent", rc);
            ret = -1;
            break;
        }
        for (i = 0; i < n; i++) {
            if (buf[i]) {
                msg("%s: block_status reports zeros at 0x%" PRIx64
                    " but the byte at 0x%" PRIx64 " reads 0x%02x",
                    path, off, off + i, buf[i]);
                ret = -1;
                break;
            }
        }
        off += n;
        len -= n;
    }
    free(buf);
    return ret;
}

static int cmd_walk(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"format", required_argument, NULL, 'f'},
        {"rw", no_argument, NULL, 'w'},
        {"check-open", no_argument, NULL, 'C'},
        {NULL, 0, NULL, 0},
    };
    struct qsnap_info info;
    struct qsnap_check_result res;
    struct walk_ctx wc;
    qsnap_image *img;
    int format = QSNAP_FMT_AUTO;
    unsigned flags = 0;
    uint64_t off;
    uint64_t extents = 0;
    int ret = 1;
    int rc;
    int c;

    while ((c = getopt_long(argc, argv, "f:wC", longopts, NULL)) != -1) {
        switch (c) {
        case 'f':
            format = parse_format(optarg);
            break;
        case 'w':
            flags |= QSNAP_OPEN_RDWR;
            break;
        case 'C':
            flags |= QSNAP_OPEN_CHECK;
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 1) {
        msg("walk: expected [-f FMT] [--rw] [--check-open] IMAGE");
        return 2;
    }
    wc.path = argv[optind];
    wc.n_reports = 0;
    if (open_image(wc.path, flags, format, 0, &img) < 0) {
        return 1;
    }
    if (get_info(img, &info) < 0) {
        goto out;
    }
    if (read_all(img, info.virtual_size, walk_nop, NULL) < 0) {
        goto out;
    }
    for (off = 0; off < info.virtual_size;) {
        uint64_t pnum = 0;
        uint64_t host_off = 0;
        unsigned bs = 0;
        int depth = -1;

        rc = qsnap_block_status(img, off, info.virtual_size - off, &pnum, &bs,
                                &host_off, &depth);
        if (rc < 0) {
            char what[96];

            snprintf(what, sizeof(what), "block_status at 0x%" PRIx64, off);
            report(img, what, rc);
            goto out;
        }
        if (pnum == 0 || pnum > info.virtual_size - off) {
            msg("%s: block_status at 0x%" PRIx64 " returned length %" PRIu64
                " (remaining %" PRIu64 ")",
                wc.path, off, pnum, info.virtual_size - off);
            goto out;
        }
        if ((bs & QSNAP_BS_OFFSET) && depth == 0 &&
            host_off >= info.file_size) {
            msg("%s: block_status at 0x%" PRIx64
                " maps to host offset 0x%" PRIx64
                ", past the end of the file (%" PRIu64 " bytes)",
                wc.path, off, host_off, info.file_size);
            goto out;
        }
        if ((bs & QSNAP_BS_ZERO) && check_zero(img, wc.path, off, pnum) < 0) {
            goto out;
        }
        off += pnum;
        extents++;
    }
    memset(&res, 0, sizeof(res));
    res.struct_size = sizeof(res);
    rc = qsnap_check(img, 0, &res, walk_report, &wc);
    if (rc < 0) {
        report(img, "check", rc);
        goto out;
    }
    if (res.corruptions || res.check_errors) {
        msg("%s: check found %" PRIu64 " corruptions and %" PRIu64 " errors",
            wc.path, res.corruptions, res.check_errors);
        goto out;
    }
    if (res.corruptions == 0 && res.leaks == 0 && res.check_errors == 0 &&
        wc.n_reports > 0) {
        msg("%s: check reported %lu problems but counted none", wc.path,
            wc.n_reports);
        goto out;
    }
    printf("ok: %s: %" PRIu64 " bytes read, %" PRIu64 " extents, %" PRIu64
           " leaks\n",
           wc.path, info.virtual_size, extents, res.leaks);
    ret = 0;
out:
    if (close_image(img) < 0) {
        ret = 1;
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* fill, discard-all, write, verify                                   */
/* ------------------------------------------------------------------ */

static int cmd_fill(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"compressed", no_argument, NULL, 'z'},
        {NULL, 0, NULL, 0},
    };
    struct qsnap_info info;
    qsnap_image *img;
    bool compressed = false;
    uint8_t pattern;
    uint8_t *buf;
    uint64_t off;
    size_t step;
    int ret = 1;
    int rc;
    int c;

    while ((c = getopt_long(argc, argv, "z", longopts, NULL)) != -1) {
        if (c == 'z') {
            compressed = true;
        } else {
            return 2;
        }
    }
    if (argc - optind != 2) {
        msg("fill: expected [--compressed] IMAGE PATTERN");
        return 2;
    }
    pattern = need_byte(argv[optind + 1]);
    if (open_image(argv[optind], QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, 0, &img) <
        0) {
        return 1;
    }
    if (get_info(img, &info) < 0) {
        close_image(img);
        return 1;
    }
    step = compressed ? info.cluster_size : CHUNK;
    if (step == 0) {
        msg("fill: --compressed needs a qcow2 image");
        close_image(img);
        return 2;
    }
    buf = xmalloc(step);
    memset(buf, pattern, step);
    for (off = 0; off < info.virtual_size; off += step) {
        const size_t len = (size_t)min_u64(step, info.virtual_size - off);

        if (compressed) {
            rc = qsnap_write_compressed(img, buf, len, off);
        } else {
            rc = qsnap_pwrite(img, buf, len, off);
        }
        if (rc < 0) {
            char what[96];

            snprintf(what, sizeof(what), "write at 0x%" PRIx64, off);
            report(img, what, rc);
            goto out;
        }
    }
    ret = 0;
out:
    free(buf);
    if (close_image(img) < 0) {
        ret = 1;
    }
    return ret;
}

static int cmd_discard_all(int argc, char **argv)
{
    struct qsnap_info info;
    qsnap_image *img;
    int ret = 1;
    int rc;

    if (argc != 2) {
        msg("discard-all: expected IMAGE");
        return 2;
    }
    if (open_image(argv[1], QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, 0, &img) < 0) {
        return 1;
    }
    if (get_info(img, &info) == 0) {
        rc = qsnap_discard(img, 0, info.virtual_size);
        if (rc < 0) {
            report(img, "discard", rc);
        } else {
            ret = 0;
        }
    }
    if (close_image(img) < 0) {
        ret = 1;
    }
    return ret;
}

static int cmd_write(int argc, char **argv, bool verify)
{
    qsnap_image *img;
    uint64_t off;
    uint64_t len;
    uint64_t done;
    uint8_t pattern;
    uint8_t *buf;
    int ret = 1;
    int rc;

    if (argc != 5) {
        msg("%s: expected IMAGE OFFSET LENGTH PATTERN",
            verify ? "verify" : "write");
        return 2;
    }
    off = need_size("offset", argv[2]);
    len = need_size("length", argv[3]);
    pattern = need_byte(argv[4]);
    if (open_image(argv[1], verify ? QSNAP_OPEN_FORCE_SHARE : QSNAP_OPEN_RDWR,
                   QSNAP_FMT_AUTO, 0, &img) < 0) {
        return 1;
    }
    buf = xmalloc(CHUNK);
    for (done = 0; done < len;) {
        const size_t n = (size_t)min_u64(CHUNK, len - done);

        if (verify) {
            size_t i;

            rc = qsnap_pread(img, buf, n, off + done);
            for (i = 0; rc >= 0 && i < n; i++) {
                if (buf[i] != pattern) {
                    msg("MISMATCH at guest offset 0x%" PRIx64
                        ": 0x%02x, expected 0x%02x",
                        off + done + i, buf[i], pattern);
                    goto out;
                }
            }
        } else {
            memset(buf, pattern, n);
            rc = qsnap_pwrite(img, buf, n, off + done);
        }
        if (rc < 0) {
            char what[96];

            snprintf(what, sizeof(what), "%s at 0x%" PRIx64,
                     verify ? "read" : "write", off + done);
            report(img, what, rc);
            goto out;
        }
        done += n;
    }
    ret = 0;
out:
    free(buf);
    if (close_image(img) < 0) {
        ret = 1;
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* ops: explicit operations from standard input                       */
/* ------------------------------------------------------------------ */

/*
 * One operation per line, sizes as elsewhere (0x.., k/M/G suffixes):
 *   write OFF LEN PAT     zero OFF LEN      zero-unmap OFF LEN
 *   discard OFF LEN       compress OFF PAT  flush
 *   reopen                read OFF LEN PAT  (verify the pattern)
 * Blank lines and lines starting with '#' are skipped.
 */
static int ops_line(qsnap_image **img, const char *path, uint64_t size,
                    uint64_t cluster, char *line, unsigned long lineno)
{
    char *argv[5];
    int n = 0;
    char *save = NULL;
    char *tok;
    uint64_t off = 0;
    uint64_t len = 0;
    uint8_t pat = 0;
    uint8_t *buf = NULL;
    int rc = 0;

    for (tok = strtok_r(line, " \t\n", &save); tok && n < 5;
         tok = strtok_r(NULL, " \t\n", &save)) {
        argv[n++] = tok;
    }
    if (n == 0 || argv[0][0] == '#') {
        return 0;
    }
    if (n >= 2) {
        off = need_size("offset", argv[1]);
    }
    if (strcmp(argv[0], "compress") == 0 && n == 3) {
        len = min_u64(cluster, size > off ? size - off : 0);
        pat = need_byte(argv[2]);
    } else if (n >= 3) {
        len = need_size("length", argv[2]);
    }
    if (n >= 4) {
        pat = need_byte(argv[3]);
    }
    if ((strcmp(argv[0], "write") == 0 || strcmp(argv[0], "read") == 0 ||
         strcmp(argv[0], "compress") == 0)) {
        buf = xmalloc((size_t)len);
        memset(buf, pat, (size_t)len);
    }
    if (strcmp(argv[0], "write") == 0 && n == 4) {
        rc = qsnap_pwrite(*img, buf, (size_t)len, off);
    } else if (strcmp(argv[0], "zero") == 0 && n == 3) {
        rc = qsnap_write_zeroes(*img, off, len, 0);
    } else if (strcmp(argv[0], "zero-unmap") == 0 && n == 3) {
        rc = qsnap_write_zeroes(*img, off, len, QSNAP_ZERO_MAY_UNMAP);
    } else if (strcmp(argv[0], "discard") == 0 && n == 3) {
        rc = qsnap_discard(*img, off, len);
    } else if (strcmp(argv[0], "compress") == 0 && n == 3) {
        rc = qsnap_write_compressed(*img, buf, (size_t)len, off);
    } else if (strcmp(argv[0], "flush") == 0 && n == 1) {
        rc = qsnap_flush(*img);
    } else if (strcmp(argv[0], "reopen") == 0 && n == 1) {
        rc = close_image(*img);
        *img = NULL;
        if (rc >= 0) {
            rc = open_image(path, QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, 0, img);
        }
        free(buf);
        return rc < 0 ? -1 : 0;
    } else if (strcmp(argv[0], "read") == 0 && n == 4) {
        uint8_t *rbuf = xmalloc((size_t)len);
        size_t i;

        rc = qsnap_pread(*img, rbuf, (size_t)len, off);
        for (i = 0; rc >= 0 && i < len; i++) {
            if (rbuf[i] != pat) {
                msg("line %lu: MISMATCH at guest offset 0x%" PRIx64
                    ": 0x%02x, expected 0x%02x",
                    lineno, off + i, rbuf[i], pat);
                free(rbuf);
                free(buf);
                return -1;
            }
        }
        free(rbuf);
    } else {
        msg("line %lu: cannot parse '%s' with %d arguments", lineno, argv[0],
            n - 1);
        free(buf);
        exit(2);
    }
    free(buf);
    if (rc < 0) {
        char what[64];

        snprintf(what, sizeof(what), "line %lu (%s)", lineno, argv[0]);
        report(*img, what, rc);
        return -1;
    }
    return 0;
}

static int cmd_ops(int argc, char **argv)
{
    struct qsnap_info info;
    qsnap_image *img;
    char line[512];
    unsigned long lineno = 0;
    int ret = 0;

    if (argc != 2) {
        msg("ops: expected IMAGE (operations on standard input)");
        return 2;
    }
    if (open_image(argv[1], QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, 0, &img) < 0) {
        return 1;
    }
    if (get_info(img, &info) < 0) {
        close_image(img);
        return 1;
    }
    while (fgets(line, sizeof(line), stdin)) {
        lineno++;
        if (ops_line(&img, argv[1], info.virtual_size,
                     info.cluster_size ? info.cluster_size : 65536, line,
                     lineno) < 0) {
            ret = 1;
            break;
        }
    }
    if (img && close_image(img) < 0) {
        ret = 1;
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* hold, create, info                                                 */
/* ------------------------------------------------------------------ */

static int cmd_hold(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"rw", no_argument, NULL, 'w'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    qsnap_image *img;
    unsigned flags = 0;
    uint64_t secs;
    struct timespec ts;
    int c;

    while ((c = getopt_long(argc, argv, "wU", longopts, NULL)) != -1) {
        switch (c) {
        case 'w':
            flags |= QSNAP_OPEN_RDWR;
            break;
        case 'U':
            flags |= QSNAP_OPEN_FORCE_SHARE;
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 2) {
        msg("hold: expected [--rw] [-U] IMAGE SECONDS");
        return 2;
    }
    secs = need_size("seconds", argv[optind + 1]);
    if (open_image(argv[optind], flags, QSNAP_FMT_AUTO, 0, &img) < 0) {
        return 1;
    }
    printf("holding %s\n", argv[optind]);
    fflush(stdout);
    ts.tv_sec = (time_t)secs;
    ts.tv_nsec = 0;
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
        continue;
    }
    return close_image(img) < 0 ? 1 : 0;
}

static int cmd_create(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"cluster-size", required_argument, NULL, 'c'},
        {"refcount-bits", required_argument, NULL, 'r'},
        {"version", required_argument, NULL, 'V'},
        {"lazy-refcounts", no_argument, NULL, 'l'},
        {"compression", required_argument, NULL, 'z'},
        {"prealloc", required_argument, NULL, 'p'},
        {"backing", required_argument, NULL, 'b'},
        {"backing-fmt", required_argument, NULL, 'F'},
        {"raw", no_argument, NULL, 'R'},
        {NULL, 0, NULL, 0},
    };
    struct qsnap_create_opts opts;
    char err[2048] = "";
    uint64_t v;
    int rc;
    int c;

    qsnap_create_opts_init(&opts);
    while ((c = getopt_long(argc, argv, "c:r:V:lz:p:b:F:R", longopts, NULL)) !=
           -1) {
        switch (c) {
        case 'c':
            v = need_size("cluster size", optarg);
            opts.cluster_size = (uint32_t)v;
            break;
        case 'r':
            opts.refcount_bits = (int)need_size("refcount bits", optarg);
            break;
        case 'V':
            opts.version = (int)need_size("version", optarg);
            break;
        case 'l':
            opts.lazy_refcounts = true;
            break;
        case 'z':
            if (strcmp(optarg, "zlib") == 0) {
                opts.compression_type = QSNAP_COMPRESSION_ZLIB;
            } else if (strcmp(optarg, "zstd") == 0) {
                opts.compression_type = QSNAP_COMPRESSION_ZSTD;
            } else {
                msg("unknown compression '%s' (zlib, zstd)", optarg);
                return 2;
            }
            break;
        case 'p':
            if (strcmp(optarg, "off") == 0) {
                opts.prealloc = QSNAP_PREALLOC_OFF;
            } else if (strcmp(optarg, "metadata") == 0) {
                opts.prealloc = QSNAP_PREALLOC_METADATA;
            } else if (strcmp(optarg, "falloc") == 0) {
                opts.prealloc = QSNAP_PREALLOC_FALLOC;
            } else if (strcmp(optarg, "full") == 0) {
                opts.prealloc = QSNAP_PREALLOC_FULL;
            } else {
                msg("unknown preallocation '%s'", optarg);
                return 2;
            }
            break;
        case 'b':
            opts.backing_file = optarg;
            break;
        case 'F':
            opts.backing_fmt = optarg;
            break;
        case 'R':
            opts.format = QSNAP_FMT_RAW;
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 2) {
        msg("create: expected [options] IMAGE SIZE");
        return 2;
    }
    opts.size = need_size("size", argv[optind + 1]);
    rc = qsnap_create(argv[optind], &opts, err, sizeof(err));
    if (rc < 0) {
        msg("create failed (%s): %s", qsnap_strerror(rc),
            err[0] ? err : "(the library gave no message)");
        return 1;
    }
    return 0;
}

static int cmd_info(int argc, char **argv)
{
    struct qsnap_info info;
    qsnap_image *img;
    int format = QSNAP_FMT_AUTO;
    int ret = 1;

    if (parse_fmt_only(argc, argv, &format) < 0 || argc - optind != 1) {
        msg("info: expected [-f FMT] IMAGE");
        return 2;
    }
    if (open_image(argv[optind], QSNAP_OPEN_FORCE_SHARE, format, 0, &img) < 0) {
        return 1;
    }
    if (get_info(img, &info) == 0) {
        printf("format=%s\n", info.format == QSNAP_FMT_RAW ? "raw" : "qcow2");
        printf("virtual_size=%" PRIu64 "\n", info.virtual_size);
        printf("file_size=%" PRIu64 "\n", info.file_size);
        printf("disk_size=%" PRIu64 "\n", info.disk_size);
        printf("cluster_size=%" PRIu32 "\n", info.cluster_size);
        printf("version=%d\n", info.version);
        printf("refcount_bits=%d\n", info.refcount_bits);
        printf("compression_type=%d\n", info.compression_type);
        printf("lazy_refcounts=%d\n", info.lazy_refcounts);
        printf("dirty=%d\n", info.dirty);
        printf("corrupt=%d\n", info.corrupt);
        printf("extended_l2=%d\n", info.extended_l2);
        printf("nb_snapshots=%" PRIu32 "\n", info.nb_snapshots);
        printf("backing_file=%s\n", info.backing_file);
        ret = 0;
    }
    if (close_image(img) < 0) {
        ret = 1;
    }
    return ret;
}

/* ------------------------------------------------------------------ */
/* main                                                               */
/* ------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fputs("Usage: " PROG " COMMAND [OPTIONS] ARGS...\n"
          "\n"
          "Test driver for libqsnap (public API only).  Sizes and offsets\n"
          "accept 0x prefixes and k/M/G/T suffixes.\n"
          "\n"
          "  random [--seed N] [--ops K] [--max-len BYTES] [--reopen]\n"
          "         [--compress] [--cache-size BYTES] [--nocache]\n"
          "         [--writethrough] [-v] MODEL.raw IMAGE\n"
          "      K random operations on IMAGE mirrored on MODEL.raw (a raw\n"
          "      file of the virtual size), each read back; then the whole\n"
          "      disk is compared.  Exit 1 at the first difference.\n"
          "  stress [--threads N] [--ops K] [--seed N] IMAGE\n"
          "      N threads write (also compressed), zero and discard\n"
          "      interleaved clusters of one handle, verifying as they go.\n"
          "  dump [-f FMT] IMAGE OUT.raw    guest content to a raw file\n"
          "  digest [-f FMT] IMAGE          XXH64 of the guest content\n"
          "  hash FILE                      XXH64 of a plain host file\n"
          "  walk [-f FMT] [--rw] [--check-open] IMAGE\n"
          "      read everything, block status over everything (zero extents\n"
          "      must read as zeros), check; --check-open opens with\n"
          "      QSNAP_OPEN_CHECK.  Exit 1 on any error or corruption.\n"
          "  fill [--compressed] IMAGE PATTERN\n"
          "  discard-all IMAGE\n"
          "  write IMAGE OFFSET LENGTH PATTERN\n"
          "  verify IMAGE OFFSET LENGTH PATTERN\n"
          "  hold [--rw] [-U] IMAGE SECONDS open, print 'holding', sleep\n"
          "  create [--cluster-size N] [--refcount-bits N] [--version 2|3]\n"
          "         [--lazy-refcounts] [--compression zlib|zstd]\n"
          "         [--prealloc off|metadata|falloc|full] [--backing FILE]\n"
          "         [--backing-fmt FMT] [--raw] IMAGE SIZE\n"
          "  info [-f FMT] IMAGE            key=value lines\n"
          "  ops IMAGE                      operations from standard input:\n"
          "      write OFF LEN PAT | zero OFF LEN | zero-unmap OFF LEN |\n"
          "      discard OFF LEN | compress OFF PAT | flush | reopen |\n"
          "      read OFF LEN PAT (verifies)\n"
          "\n"
          "FMT is auto (default), qcow2 or raw.  Exit status: 0 success,\n"
          "1 failure, 2 usage error.\n",
          f);
}

int main(int argc, char **argv)
{
    const char *cmd;

    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    cmd = argv[1];
    argc--;
    argv++;
    optind = 1;
    if (strcmp(cmd, "random") == 0) {
        return cmd_random(argc, argv);
    } else if (strcmp(cmd, "stress") == 0) {
        return cmd_stress(argc, argv);
    } else if (strcmp(cmd, "dump") == 0) {
        return cmd_dump(argc, argv);
    } else if (strcmp(cmd, "digest") == 0) {
        return cmd_digest(argc, argv);
    } else if (strcmp(cmd, "hash") == 0) {
        return cmd_hash(argc, argv);
    } else if (strcmp(cmd, "walk") == 0) {
        return cmd_walk(argc, argv);
    } else if (strcmp(cmd, "fill") == 0) {
        return cmd_fill(argc, argv);
    } else if (strcmp(cmd, "discard-all") == 0) {
        return cmd_discard_all(argc, argv);
    } else if (strcmp(cmd, "write") == 0) {
        return cmd_write(argc, argv, false);
    } else if (strcmp(cmd, "verify") == 0) {
        return cmd_write(argc, argv, true);
    } else if (strcmp(cmd, "hold") == 0) {
        return cmd_hold(argc, argv);
    } else if (strcmp(cmd, "create") == 0) {
        return cmd_create(argc, argv);
    } else if (strcmp(cmd, "info") == 0) {
        return cmd_info(argc, argv);
    } else if (strcmp(cmd, "ops") == 0) {
        return cmd_ops(argc, argv);
    } else if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 ||
               strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    msg("unknown command '%s'", cmd);
    usage(stderr);
    return 2;
}
