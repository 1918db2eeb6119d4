/*
 * driver_util.c - helpers shared by the test drivers (driver_util.h).
 */
#include "config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driver_util.h"

void msg(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fprintf(stderr, "%s: ", drv_prog);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

void *xmalloc(size_t len)
{
    void *p = malloc(len ? len : 1);

    if (!p) {
        msg("out of memory (%zu bytes)", len);
        exit(1);
    }
    return p;
}

bool parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;
    unsigned shift = 0;

    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno || end == s || s[0] == '-') {
        return false;
    }
    switch (*end) {
    case '\0':
        break;
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
    case 't':
    case 'T':
        shift = 40;
        end++;
        break;
    default:
        return false;
    }
    if (*end != '\0' || (shift && v > (UINT64_MAX >> shift))) {
        return false;
    }
    *out = (uint64_t)v << shift;
    return true;
}

uint64_t need_size(const char *what, const char *s)
{
    uint64_t v;

    if (!parse_size(s, &v)) {
        msg("invalid %s '%s'", what, s);
        exit(2);
    }
    return v;
}

int parse_format(const char *s)
{
    if (strcmp(s, "auto") == 0) {
        return QSNAP_FMT_AUTO;
    } else if (strcmp(s, "qcow2") == 0) {
        return QSNAP_FMT_QCOW2;
    } else if (strcmp(s, "raw") == 0) {
        return QSNAP_FMT_RAW;
    }
    msg("unknown format '%s' (auto, qcow2, raw)", s);
    exit(2);
}

int open_image(const char *path, unsigned flags, int format,
               uint64_t cache_size, qsnap_image **img)
{
    struct qsnap_open_opts opts;
    char err[2048] = "";
    int rc;

    qsnap_open_opts_init(&opts);
    opts.flags = flags;
    opts.format = format;
    opts.cache_size = cache_size;
    rc = qsnap_open(path, &opts, img, err, sizeof(err));
    if (rc < 0) {
        msg("open failed (%s): %s", qsnap_strerror(rc),
            err[0] ? err : "(the library gave no message)");
        *img = NULL;
    }
    return rc;
}

void report(const qsnap_image *img, const char *what, int rc)
{
    const char *m = qsnap_errmsg(img);

    msg("%s failed (%s): %s", what, qsnap_strerror(rc),
        (m && m[0]) ? m : "(the library gave no message)");
}

int close_image(qsnap_image *img)
{
    int rc = qsnap_close(img);

    if (rc < 0) {
        msg("close failed (%s)", qsnap_strerror(rc));
    }
    return rc;
}
