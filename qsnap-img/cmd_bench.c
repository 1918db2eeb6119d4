/*
 * cmd_bench.c - "qsnap-img bench": a simple I/O benchmark.
 *
 *   bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-n]
 *         [--no-drain] [-o offset] [--pattern=N] [-q] [-s buffer_size]
 *         [-S step_size] [-t cache] [-w] [-U] filename
 *
 * Sends `count` read (or, with -w, write) requests of `buffer_size` bytes,
 * `depth` of them in flight at a time: `depth` threads issue synchronous
 * qsnap_pread()/qsnap_pwrite() calls on one shared handle.  The first
 * request goes to `offset`, each next one `step_size` further, wrapping at
 * the image size as qemu-img does; a request that would cross the end of
 * the image starts over at offset 0 instead of failing.  Writes can be
 * followed by a flush every N requests; by default the queue is drained
 * first, --no-drain flushes while other requests are in flight.
 * -n (native AIO) and -i are accepted for compatibility and ignored.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qsnap_img.h"

struct bench {
    qsnap_image *img;
    uint64_t image_size;
    uint64_t count;
    uint64_t bufsize;
    uint64_t step;
    bool write;
    int pattern;
    uint64_t flush_interval;
    bool drain;

    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t issued;
    uint64_t completed;
    uint64_t next_offset;
    unsigned in_flight;
    bool flushing;
    bool failed;

    /* One buffer per worker, all filled before the clock starts, as
     * qemu-img bench does (scattered pages would split O_DIRECT I/O). */
    uint8_t *bufs;
    uint64_t next_buf;
};

static void bench_fail(struct bench *b, const char *what, int err)
{
    pthread_mutex_lock(&b->lock);
    if (!b->failed) {
        const char *msg = qsnap_errmsg(b->img);
        b->failed = true;
        qi_error("Failed %s: %s", what, msg[0] ? msg : qsnap_strerror(err));
    }
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
}

/* Claims the next request; false when all are issued or on failure. */
static bool claim(struct bench *b, uint64_t *off)
{
    bool ok = false;
    pthread_mutex_lock(&b->lock);
    while (b->flushing && !b->failed) {
        pthread_cond_wait(&b->cond, &b->lock);
    }
    if (!b->failed && b->issued < b->count) {
        uint64_t o = b->next_offset;
        if (o + b->bufsize > b->image_size) {
            o = 0;
        }
        *off = o;
        b->issued++;
        b->in_flight++;
        b->next_offset = b->image_size ? (o + b->step) % b->image_size : 0;
        ok = true;
    }
    pthread_mutex_unlock(&b->lock);
    return ok;
}

/* Marks a request done and sends the flush that may be due. */
static void complete(struct bench *b)
{
    pthread_mutex_lock(&b->lock);
    b->in_flight--;
    b->completed++;
    pthread_cond_broadcast(&b->cond);
    if (!b->flush_interval || b->completed % b->flush_interval != 0 ||
        b->flushing) {
        pthread_mutex_unlock(&b->lock);
        return;
    }
    if (b->drain) {
        /* Hold new requests back until the queue is empty and flushed. */
        b->flushing = true;
        while (b->in_flight > 0 && !b->failed) {
            pthread_cond_wait(&b->cond, &b->lock);
        }
    }
    pthread_mutex_unlock(&b->lock);
    const int ret = qsnap_flush(b->img);
    if (ret < 0) {
        bench_fail(b, "flush", ret);
    }
    pthread_mutex_lock(&b->lock);
    b->flushing = false;
    pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
}

static void *bench_worker(void *opaque)
{
    struct bench *b = opaque;
    uint64_t off;

    pthread_mutex_lock(&b->lock);
    uint8_t *buf = b->bufs + b->next_buf++ * b->bufsize;
    pthread_mutex_unlock(&b->lock);
    while (claim(b, &off)) {
        const int ret = b->write ? qsnap_pwrite(b->img, buf, b->bufsize, off)
                                 : qsnap_pread(b->img, buf, b->bufsize, off);
        if (ret < 0) {
            bench_fail(b, "request", ret);
        }
        complete(b);
    }
    return NULL;
}

/* Parses a count-like option (unsigned, base auto, at most INT_MAX). */
static int parse_int_opt(const char *arg, uint64_t max, uint64_t *out)
{
    return qi_parse_uint(arg, out) < 0 || *out > max ? -1 : 0;
}

int qi_cmd_bench(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"flush-interval", required_argument, NULL, QI_OPT_FLUSH_INTERVAL},
        {"no-drain", no_argument, NULL, QI_OPT_NO_DRAIN},
        {"pattern", required_argument, NULL, QI_OPT_PATTERN},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    uint64_t count = 75000;
    uint64_t depth = 64;
    uint64_t offset = 0;
    uint64_t bufsize = 4096;
    uint64_t step = 0;
    uint64_t pattern = 0;
    uint64_t flush_interval = 0;
    bool drain = true;
    bool is_write = false;
    unsigned flags = 0;
    int c;

    while (
        (c = getopt_long(argc, argv, QI_GETOPT_PREFIX "hc:d:f:ni:o:qs:S:t:wU",
                         long_opts, NULL)) != -1) {
        switch (c) {
        case 'h':
            qi_help();
        case 'c':
            if (parse_int_opt(optarg, INT_MAX, &count) < 0) {
                qi_error("Invalid request count specified");
                return 1;
            }
            break;
        case 'd':
            if (parse_int_opt(optarg, INT_MAX, &depth) < 0 || depth == 0) {
                qi_error("Invalid queue depth specified");
                return 1;
            }
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'n':
        case 'i':
            break;
        case 'o':
            if (qi_cvtnum("offset", optarg, &offset) < 0) {
                return 1;
            }
            break;
        case 'q':
            break;
        case 's':
            if (qi_cvtnum_max("buffer size", optarg, INT_MAX, &bufsize) < 0) {
                return 1;
            }
            break;
        case 'S':
            if (qi_cvtnum_max("step_size", optarg, INT_MAX, &step) < 0) {
                return 1;
            }
            break;
        case 't':
            if (qi_parse_cache(optarg, &flags) < 0) {
                qi_error("Invalid cache mode");
                return 1;
            }
            break;
        case 'w':
            flags |= QSNAP_OPEN_RDWR;
            is_write = true;
            break;
        case 'U':
            flags |= QSNAP_OPEN_FORCE_SHARE;
            break;
        case QI_OPT_PATTERN:
            if (parse_int_opt(optarg, 0xff, &pattern) < 0) {
                qi_error("Invalid pattern byte specified");
                return 1;
            }
            break;
        case QI_OPT_FLUSH_INTERVAL:
            if (parse_int_opt(optarg, INT_MAX, &flush_interval) < 0) {
                qi_error("Invalid flush interval specified");
                return 1;
            }
            break;
        case QI_OPT_NO_DRAIN:
            drain = false;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (optind != argc - 1) {
        return qi_usage_error("Expecting one image file name");
    }
    const char *filename = argv[argc - 1];
    if (!is_write && flush_interval) {
        qi_error("--flush-interval is only available in write tests");
        return 1;
    }
    if (flush_interval && flush_interval < depth) {
        qi_error("Flush interval can't be smaller than depth");
        return 1;
    }

    qsnap_image *img;
    struct qsnap_info info;
    if (qi_open(filename, fmt, flags, &img) < 0) {
        return 1;
    }
    if (qi_get_info(img, &info) < 0) {
        qsnap_close(img);
        return 1;
    }

    struct bench b = {
        .img = img,
        .image_size = info.virtual_size,
        .count = count,
        .bufsize = bufsize,
        .step = step ? step : bufsize,
        .write = is_write,
        .pattern = (int)pattern,
        .flush_interval = flush_interval,
        .drain = drain,
        .next_offset = offset,
    };
    printf("Sending %" PRIu64 " %s requests, %" PRIu64 " bytes each, %" PRIu64
           " in parallel (starting at offset %" PRIu64 ", step size %" PRIu64
           ")\n",
           count, is_write ? "write" : "read", bufsize, depth, offset, b.step);
    if (flush_interval) {
        printf("Sending flush every %" PRIu64 " requests\n", flush_interval);
    }
    fflush(stdout);
    if (count && bufsize > info.virtual_size) {
        qi_error("Failed request: %s: requests of %" PRIu64 " bytes do not "
                 "fit in the image's %" PRIu64 " bytes",
                 filename, bufsize, info.virtual_size);
        qsnap_close(img);
        return 1;
    }

    const uint64_t n_threads = depth < count ? depth : (count ? count : 1);
    pthread_t *tids = calloc(n_threads, sizeof(*tids));
    if (!tids) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
        qsnap_close(img);
        return 1;
    }
    b.bufs = qi_alloc_buf(n_threads * bufsize);
    if (!b.bufs) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
        free(tids);
        qsnap_close(img);
        return 1;
    }
    memset(b.bufs, b.pattern, n_threads * bufsize);
    pthread_mutex_init(&b.lock, NULL);
    pthread_cond_init(&b.cond, NULL);

    const double t0 = qi_now();
    uint64_t started = 0;
    for (; started < n_threads; started++) {
        if (pthread_create(&tids[started], NULL, bench_worker, &b) != 0) {
            break;
        }
    }
    if (started == 0) {
        bench_worker(&b);
    }
    for (uint64_t i = 0; i < started; i++) {
        pthread_join(tids[i], NULL);
    }
    const double t1 = qi_now();

    pthread_cond_destroy(&b.cond);
    pthread_mutex_destroy(&b.lock);
    free(tids);
    free(b.bufs);
    if (qi_close(img, filename) < 0 || b.failed) {
        return 1;
    }
    printf("Run completed in %3.3f seconds.\n", t1 - t0);
    return 0;
}
