/*
 * cmd_compare.c - "qsnap-img compare": do two images hold the same data?
 *
 *   compare [-f fmt] [-F fmt] [-p] [-q] [-s] [-U] filename1 filename2
 *
 * Exit status as qemu-img: 0 identical, 1 different, 2 an image could not
 * be opened, 3 block status failed, 4 a read failed.  Images of different
 * sizes compare equal when the extra part of the larger one reads as
 * zeros, unless -s (strict) is given, which also fails on any difference
 * in allocation.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qsnap_img.h"

#define SECTOR 512u

struct side {
    const char *name;
    qsnap_image *img;       /* the image with its backing chain, to read */
    struct qi_chain *chain; /* its images one by one, for block status */
    uint64_t size;
};

/*
 * The status qemu-img compares: that of the image deciding the range
 * (QI_ST_ALLOCATED when any image of the chain allocates it).  Zeros past
 * the end of a shorter backing file count as allocated there, as QEMU
 * counts them.
 */
static int status_of(const struct side *s, uint64_t off, uint64_t len,
                     uint64_t *pnum, unsigned *flags)
{
    struct qi_status st;
    const int ret = qi_chain_status(s->chain, off, len, &st);
    if (ret < 0 || st.len == 0) {
        qi_error("Sector allocation test failed for %s", s->name);
        return -1;
    }
    *pnum = st.len;
    *flags = st.flags;
    if (st.past_backing) {
        *flags = QI_ST_ZERO | QI_ST_ALLOCATED | (st.flags & QI_ST_EOF);
    }
    return 0;
}

static int read_at(const struct side *s, void *buf, uint64_t len, uint64_t off)
{
    const int ret = qsnap_pread(s->img, buf, len, off);
    if (ret < 0) {
        qi_error("Error while reading offset %" PRIu64 " of %s: %s", off,
                 s->name, qsnap_strerror(ret));
        return -1;
    }
    return 0;
}

/* Offset of the first sector (from BUF) holding a non-zero byte, or -1. */
static int64_t find_nonzero(const uint8_t *buf, uint64_t n)
{
    uint64_t i = 0;
    for (; i + SECTOR <= n; i += SECTOR) {
        if (!qi_is_zero(buf + i, SECTOR)) {
            return (int64_t)i;
        }
    }
    if (i < n && !qi_is_zero(buf + i, n - i)) {
        return (int64_t)i;
    }
    return -1;
}

/*
 * Sector-wise comparison: returns whether the first sectors differ and in
 * *pnum how far that result holds.
 */
static bool compare_buffers(const uint8_t *a, const uint8_t *b, uint64_t n,
                            uint64_t *pnum)
{
    uint64_t i = n < SECTOR ? n : SECTOR;
    const bool differ = memcmp(a, b, i) != 0;
    while (i < n) {
        const uint64_t len = n - i < SECTOR ? n - i : SECTOR;
        if ((memcmp(a + i, b + i, len) != 0) != differ) {
            break;
        }
        i += len;
    }
    *pnum = i;
    return differ;
}

/*
 * Checks that [off, off + len) of S reads as zeros.  Returns 0 if so, 1
 * (after printing the mismatch) if not, 4 on a read error.
 */
static int check_empty(const struct side *s, uint8_t *buf, uint64_t off,
                       uint64_t len, bool quiet)
{
    if (read_at(s, buf, len, off) < 0) {
        return 4;
    }
    const int64_t idx = find_nonzero(buf, len);
    if (idx >= 0) {
        if (!quiet) {
            printf("Content mismatch at offset %" PRIu64 "!\n",
                   off + (uint64_t)idx);
        }
        return 1;
    }
    return 0;
}

static int compare_images(struct side *a, struct side *b, bool strict,
                          bool quiet, uint8_t *buf1, uint8_t *buf2)
{
    const uint64_t total = a->size < b->size ? a->size : b->size;
    const uint64_t base = a->size > b->size ? a->size : b->size;
    uint64_t off = 0;
    int ret;

    qi_progress_print(0, 100);
    if (strict && a->size != b->size) {
        if (!quiet) {
            printf("Strict mode: Image size mismatch!\n");
        }
        return 1;
    }
    while (off < total) {
        uint64_t p1;
        uint64_t p2;
        unsigned f1;
        unsigned f2;
        if (status_of(a, off, total - off, &p1, &f1) < 0 ||
            status_of(b, off, total - off, &p2, &f2) < 0) {
            return 3;
        }
        uint64_t chunk = p1 < p2 ? p1 : p2;
        if (strict && f1 != f2) {
            if (!quiet) {
                printf("Strict mode: Offset %" PRIu64
                       " block status mismatch!\n",
                       off);
            }
            return 1;
        }
        const bool alloc1 = f1 & QI_ST_ALLOCATED;
        const bool alloc2 = f2 & QI_ST_ALLOCATED;
        if ((f1 & QI_ST_ZERO) && (f2 & QI_ST_ZERO)) {
            /* Both read as zeros. */
        } else if (alloc1 == alloc2) {
            if (alloc1) {
                uint64_t pnum;
                if (chunk > QI_IO_BUF_SIZE) {
                    chunk = QI_IO_BUF_SIZE;
                }
                if (read_at(a, buf1, chunk, off) < 0 ||
                    read_at(b, buf2, chunk, off) < 0) {
                    return 4;
                }
                const bool differ = compare_buffers(buf1, buf2, chunk, &pnum);
                if (differ || pnum != chunk) {
                    if (!quiet) {
                        printf("Content mismatch at offset %" PRIu64 "!\n",
                               off + (differ ? 0 : pnum));
                    }
                    return 1;
                }
            }
        } else {
            if (chunk > QI_IO_BUF_SIZE) {
                chunk = QI_IO_BUF_SIZE;
            }
            ret = check_empty(alloc1 ? a : b, buf1, off, chunk, quiet);
            if (ret) {
                return ret;
            }
        }
        off += chunk;
        qi_progress_print((float)chunk / (float)base * 100, 100);
    }

    if (a->size != b->size) {
        struct side *over = a->size > b->size ? a : b;
        if (!quiet) {
            printf("Warning: Image size mismatch!\n");
        }
        while (off < base) {
            uint64_t chunk;
            unsigned f;
            if (status_of(over, off, base - off, &chunk, &f) < 0) {
                return 3;
            }
            if (f & QI_ST_ALLOCATED) {
                if (chunk > QI_IO_BUF_SIZE) {
                    chunk = QI_IO_BUF_SIZE;
                }
                ret = check_empty(over, buf1, off, chunk, quiet);
                if (ret) {
                    return ret;
                }
            }
            off += chunk;
            qi_progress_print((float)chunk / (float)base * 100, 100);
        }
    }
    if (!quiet) {
        printf("Images are identical.\n");
    }
    return 0;
}

static int open_side(struct side *s, const char *fmt, unsigned flags)
{
    struct qsnap_info info;
    if (qi_open(s->name, fmt, flags, &s->img) < 0 ||
        qi_get_info(s->img, &info) < 0 ||
        qi_chain_open(s->name, fmt, flags, &s->chain) < 0) {
        return -1;
    }
    s->size = info.virtual_size;
    return 0;
}

static void close_side(struct side *s)
{
    if (s->img) {
        qsnap_close(s->img);
    }
    qi_chain_close(s->chain);
}

int qi_cmd_compare(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt1 = NULL;
    const char *fmt2 = NULL;
    bool progress = false;
    bool quiet = false;
    bool strict = false;
    unsigned flags = 0;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "hf:F:pqsU", long_opts,
                            NULL)) != -1) {
        switch (c) {
        case 'h':
            qi_help();
        case 'f':
            fmt1 = optarg;
            break;
        case 'F':
            fmt2 = optarg;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 's':
            strict = true;
            break;
        case 'U':
            flags |= QSNAP_OPEN_FORCE_SHARE;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    /* No progress indicator in quiet mode. */
    if (quiet) {
        progress = false;
    }
    if (optind != argc - 2) {
        return qi_usage_error("Expecting two image file names");
    }

    struct side a = {.name = argv[optind]};
    struct side b = {.name = argv[optind + 1]};
    uint8_t *buf1 = NULL;
    uint8_t *buf2 = NULL;
    int status = 2;

    qi_progress_init(progress, 2.0f);
    if (open_side(&a, fmt1, flags) < 0 || open_side(&b, fmt2, flags) < 0) {
        goto out;
    }
    buf1 = qi_alloc_buf(QI_IO_BUF_SIZE);
    buf2 = qi_alloc_buf(QI_IO_BUF_SIZE);
    if (!buf1 || !buf2) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
        goto out;
    }
    status = compare_images(&a, &b, strict, quiet, buf1, buf2);
out:
    free(buf1);
    free(buf2);
    close_side(&a);
    close_side(&b);
    fflush(stdout);
    qi_progress_end();
    return status;
}
