/*
 * util.c - helpers shared by the qsnap-img commands.
 *
 * Error printing and getopt error messages, size parsing and printing,
 * "-o key=value" lists and their interpretation as image-creation options,
 * opening images from -f/-U/-t style flags, backing chains (layer by layer
 * for map and compare; finding a layer by name), the "-p" progress
 * indicator and a small JSON writer that orders object keys as QEMU's
 * QDict does, so that --output=json matches qemu-img byte for byte.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "qsnap_img.h"

/* ------------------------------------------------------------ errors */

/* "qsnap-img: [FILE: ]PREFIXmessage" on stderr, after pending output. */
static void vreport(const char *file, const char *prefix, const char *fmt,
                    va_list ap)
{
    fflush(stdout);
    fprintf(stderr, "%s: ", QI_PROG);
    if (file) {
        fprintf(stderr, "%s: ", file);
    }
    fputs(prefix, stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void qi_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(NULL, "", fmt, ap);
    va_end(ap);
}

void qi_error_file(const char *file, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(file, "", fmt, ap);
    va_end(ap);
}

void qi_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(NULL, "warning: ", fmt, ap);
    va_end(ap);
}

int qi_usage_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vreport(NULL, "", fmt, ap);
    va_end(ap);
    fprintf(stderr, "Try '%s --help' for more information\n", QI_PROG);
    return 1;
}

int qi_getopt_error(int c, char **argv)
{
    const char *arg = optind > 0 ? argv[optind - 1] : "";
    if (c == ':') {
        return qi_usage_error("missing argument for option '%s'", arg);
    }
    return qi_usage_error("unrecognized option '%s'", arg);
}

int qi_parse_output(const char *arg, enum qi_output *out)
{
    if (strcmp(arg, "json") == 0) {
        *out = QI_OUTPUT_JSON;
    } else if (strcmp(arg, "human") == 0) {
        *out = QI_OUTPUT_HUMAN;
    } else {
        qi_error("--output must be used with human or json as argument.");
        return -EINVAL;
    }
    return 0;
}

int qi_parse_cache(const char *mode, unsigned *flags)
{
    if (strcmp(mode, "none") == 0) {
        *flags |= QSNAP_OPEN_NOCACHE;
    } else if (strcmp(mode, "directsync") == 0) {
        *flags |= QSNAP_OPEN_NOCACHE | QSNAP_OPEN_WRITETHROUGH;
    } else if (strcmp(mode, "writethrough") == 0) {
        *flags |= QSNAP_OPEN_WRITETHROUGH;
    } else if (strcmp(mode, "writeback") != 0 && strcmp(mode, "unsafe") != 0) {
        return -EINVAL;
    }
    return 0;
}

/* ------------------------------------------------------------ numbers */

/* Bytes per unit for a size suffix, 0 if C is not one. */
static uint64_t suffix_mul(char c)
{
    switch (c) {
    case 'b':
    case 'B':
        return 1;
    case 'k':
    case 'K':
        return 1ull << 10;
    case 'm':
    case 'M':
        return 1ull << 20;
    case 'g':
    case 'G':
        return 1ull << 30;
    case 't':
    case 'T':
        return 1ull << 40;
    case 'p':
    case 'P':
        return 1ull << 50;
    case 'e':
    case 'E':
        return 1ull << 60;
    default:
        return 0;
    }
}

int qi_parse_size(const char *str, uint64_t *out)
{
    const char *p = str;
    char *end;
    uint64_t val;
    double frac = 0.0;

    if (!str) {
        return -EINVAL;
    }
    while (*p == ' ' || *p == '\t' || *p == '\n') {
        p++;
    }
    if (*p < '0' || *p > '9') {
        return -EINVAL;
    }
    errno = 0;
    val = strtoull(p, &end, 10);
    if (errno == ERANGE) {
        return -ERANGE;
    }
    if (val == 0 && (*end == 'x' || *end == 'X')) {
        /* Hexadecimal: no fraction and no suffix. */
        errno = 0;
        val = strtoull(p, &end, 16);
        if (errno == ERANGE) {
            return -ERANGE;
        }
        if (*end != '\0') {
            return -EINVAL;
        }
        *out = val;
        return 0;
    }
    if (*end == '.') {
        const char *f = end;
        end++;
        if (*end < '0' || *end > '9') {
            return -EINVAL;
        }
        while (*end >= '0' && *end <= '9') {
            end++;
        }
        frac = strtod(f, NULL);
    }
    uint64_t mul = suffix_mul(*end);
    if (mul) {
        end++;
    } else {
        mul = 1;
    }
    if (*end != '\0') {
        return -EINVAL;
    }
    if (mul == 1) {
        if (frac != 0.0) {
            return -EINVAL;
        }
        *out = val;
        return 0;
    }
    if (val > UINT64_MAX / mul) {
        return -ERANGE;
    }
    const uint64_t whole = val * mul;
    /* The fraction rounds to the nearest byte, halves upward. */
    const double part = frac * (double)mul + 0.5;
    if (part >= 18446744073709551616.0) {
        return -ERANGE;
    }
    const uint64_t add = (uint64_t)part;
    if (whole > UINT64_MAX - add) {
        return -ERANGE;
    }
    *out = whole + add;
    return 0;
}

void qi_size_error(const char *what)
{
    qi_error("Invalid %s specified. You may use k, M, G, T, P or E suffixes "
             "for",
             what);
    qi_error("kilobytes, megabytes, gigabytes, terabytes, petabytes and "
             "exabytes.");
}

int qi_cvtnum(const char *what, const char *str, uint64_t *out)
{
    return qi_cvtnum_max(what, str, (uint64_t)INT64_MAX, out);
}

int qi_cvtnum_max(const char *what, const char *str, uint64_t max,
                  uint64_t *out)
{
    const int ret = qi_parse_size(str, out);
    if (ret == -ERANGE || (ret == 0 && *out > max)) {
        qi_error("Invalid %s specified. Must be between 0 and %" PRIu64 ".",
                 what, max);
        return -ERANGE;
    }
    if (ret < 0) {
        qi_size_error(what);
    }
    return ret;
}

int qi_parse_uint(const char *str, uint64_t *out)
{
    char *end;

    if (!str || *str == '\0' || *str == '-') {
        return -EINVAL;
    }
    errno = 0;
    const unsigned long long v = strtoull(str, &end, 0);
    if (errno == ERANGE) {
        return -ERANGE;
    }
    if (*end != '\0' || end == str) {
        return -EINVAL;
    }
    *out = v;
    return 0;
}

void qi_human_size(uint64_t bytes, char *buf, size_t len)
{
    static const char *const units[] = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};
    /*
     * The unit is picked from log2(bytes * 1024 / 1000), so that the
     * number printed stays below 1000: the binary exponent e of that
     * value (as frexp() gives it) minus one, divided by ten.
     */
    double x = (double)bytes / (1000.0 / 1024.0);
    int e = 0;
    while (x >= 1.0) {
        x /= 2.0;
        e++;
    }
    int i = (e - 1) / 10;
    if (i < 0) {
        i = 0;
    }
    if (i > 6) {
        i = 6;
    }
    const double div = (double)(1ull << (i * 10));
    snprintf(buf, len, "%0.3g %sB", (double)bytes / div, units[i]);
}

/* ------------------------------------------------------------ -o lists */

static int opts_push(struct qi_opts *opts, char *key, char *value)
{
    if (opts->n == opts->cap) {
        const size_t cap = opts->cap ? opts->cap * 2 : 8;
        struct qi_opt *v = realloc(opts->v, cap * sizeof(*v));
        if (!v) {
            return -ENOMEM;
        }
        opts->v = v;
        opts->cap = cap;
    }
    opts->v[opts->n].key = key;
    opts->v[opts->n].value = value;
    opts->n++;
    return 0;
}

/*
 * Copies the item starting at *P up to an unescaped ',' or STOP (or the
 * end), turning ",," into ','.  Advances *P past what it consumed (not
 * past the terminator).  Returns NULL on allocation failure.
 */
static char *opts_take(const char **p, char stop)
{
    const char *s = *p;
    char *out = malloc(strlen(s) + 1);
    size_t n = 0;

    if (!out) {
        return NULL;
    }
    while (*s) {
        if (*s == ',') {
            if (s[1] == ',') {
                out[n++] = ',';
                s += 2;
                continue;
            }
            break;
        }
        if (stop && *s == stop) {
            break;
        }
        out[n++] = *s++;
    }
    out[n] = '\0';
    *p = s;
    return out;
}

int qi_opts_parse(struct qi_opts *opts, const char *str)
{
    const char *p = str;

    if (*p == '\0') {
        return -EINVAL;
    }
    for (;;) {
        /*
         * An empty item (a leading, doubled or trailing comma) is invalid;
         * ",," inside an item stands for a comma.
         */
        if (*p == ',' && (p == str || p[1] != ',')) {
            return -EINVAL;
        }
        char *key = opts_take(&p, '=');
        if (!key) {
            return -ENOMEM;
        }
        char *value;
        if (*p == '=') {
            p++;
            value = opts_take(&p, 0);
        } else {
            value = strdup("on");
        }
        if (!value || key[0] == '\0') {
            free(key);
            free(value);
            return value ? -EINVAL : -ENOMEM;
        }
        if (opts_push(opts, key, value) < 0) {
            free(key);
            free(value);
            return -ENOMEM;
        }
        if (*p == '\0') {
            return 0;
        }
        p++; /* the separating comma */
        if (*p == '\0') {
            return -EINVAL;
        }
    }
}

const char *qi_opts_get(const struct qi_opts *opts, const char *key)
{
    const char *v = NULL;
    for (size_t i = 0; i < opts->n; i++) {
        if (strcmp(opts->v[i].key, key) == 0) {
            v = opts->v[i].value;
        }
    }
    return v;
}

bool qi_opts_has_help(const struct qi_opts *opts)
{
    for (size_t i = 0; i < opts->n; i++) {
        if (strcmp(opts->v[i].key, "help") == 0 ||
            strcmp(opts->v[i].key, "?") == 0) {
            return true;
        }
    }
    return false;
}

void qi_opts_free(struct qi_opts *opts)
{
    for (size_t i = 0; i < opts->n; i++) {
        free(opts->v[i].key);
        free(opts->v[i].value);
    }
    free(opts->v);
    opts->v = NULL;
    opts->n = 0;
    opts->cap = 0;
}

/* ------------------------------------------------------------ creation */

int qi_format_from_name(const char *name)
{
    if (!name) {
        return QSNAP_FMT_AUTO;
    }
    if (strcmp(name, "qcow2") == 0) {
        return QSNAP_FMT_QCOW2;
    }
    if (strcmp(name, "raw") == 0) {
        return QSNAP_FMT_RAW;
    }
    return -1;
}

int qi_create_spec_init(struct qi_create_spec *spec, const char *fmt_name,
                        const char *filename, struct qi_opts *list)
{
    memset(spec, 0, sizeof(*spec));
    qsnap_create_opts_init(&spec->opts);
    if (list) {
        spec->list = *list;
        memset(list, 0, sizeof(*list));
    }
    const int fmt = qi_format_from_name(fmt_name);
    if (fmt <= QSNAP_FMT_AUTO) {
        if (filename) {
            qi_error_file(filename, "Unknown file format '%s'", fmt_name);
        } else {
            qi_error("Unknown file format '%s'", fmt_name);
        }
        return -EINVAL;
    }
    spec->opts.format = fmt;
    spec->fmt_name = fmt_name;
    return 0;
}

int qi_opts_add_arg(struct qi_opts *opts, const char *arg)
{
    const int ret = qi_opts_parse(opts, arg);
    if (ret == -EINVAL) {
        qi_error("Invalid option list: %s", arg);
    } else if (ret < 0) {
        qi_error("%s", strerror(-ret));
    }
    return ret;
}

/* The keys each format accepts, in the order -o help lists them. */
struct spec_key {
    const char *key;
    const char *type;
    const char *help;
    bool qcow2;
    bool raw;
};

static const struct spec_key spec_keys[] = {
    {"backing_file", "str", "File name of a base image", true, false},
    {"backing_fmt", "str", "Image format of the base image", true, false},
    {"cluster_size", "size", "qcow2 cluster size", true, false},
    {"compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])", true,
     false},
    {"compression_type", "str",
     "Compression method used for image cluster compression", true, false},
    {"extended_l2", "bool (on/off)", "Extended L2 tables", true, false},
    {"lazy_refcounts", "bool (on/off)", "Postpone refcount updates", true,
     false},
    {"preallocation", "str",
     "Preallocation mode (allowed values: off, metadata, falloc, full)", true,
     true},
    {"refcount_bits", "num", "Width of a reference count entry in bits", true,
     false},
    {"size", "size", "Virtual disk size", true, true},
};

static const struct spec_key *spec_key_find(const struct qi_create_spec *s,
                                            const char *key)
{
    for (size_t i = 0; i < sizeof(spec_keys) / sizeof(spec_keys[0]); i++) {
        const struct spec_key *k = &spec_keys[i];
        if (strcmp(k->key, key) == 0) {
            const bool ok =
                s->opts.format == QSNAP_FMT_QCOW2 ? k->qcow2 : k->raw;
            return ok ? k : NULL;
        }
    }
    return NULL;
}

void qi_create_spec_help(const struct qi_create_spec *spec)
{
    printf("Supported %s options:\n", spec->fmt_name);
    for (size_t i = 0; i < sizeof(spec_keys) / sizeof(spec_keys[0]); i++) {
        const struct spec_key *k = &spec_keys[i];
        if (!(spec->opts.format == QSNAP_FMT_QCOW2 ? k->qcow2 : k->raw)) {
            continue;
        }
        char left[64];
        snprintf(left, sizeof(left), "%s=<%s>", k->key, k->type);
        printf("  %-22s - %s\n", left, k->help);
    }
}

/* Parses an on/off value as QEMU's boolean options do. */
static int parse_bool(const char *v, bool *out)
{
    static const char *const yes[] = {"on", "yes", "true", "y"};
    static const char *const no[] = {"off", "no", "false", "n"};
    for (size_t i = 0; i < 4; i++) {
        if (strcmp(v, yes[i]) == 0) {
            *out = true;
            return 0;
        }
        if (strcmp(v, no[i]) == 0) {
            *out = false;
            return 0;
        }
    }
    return -EINVAL;
}

void qi_size_param_error(const char *file, const char *key)
{
    static const char msg[] =
        "Parameter '%s' expects a non-negative number below 2^64";
    if (file) {
        qi_error_file(file, msg, key);
    } else {
        qi_error(msg, key);
    }
    fprintf(stderr, "Optional suffix k, M, G, T, P or E means kilo-, mega-, "
                    "giga-, tera-, peta-\nand exabytes, respectively.\n");
}

int qi_create_spec_parse(struct qi_create_spec *spec, const char *filename)
{
    struct qsnap_create_opts *o = &spec->opts;
    uint64_t v;
    const char *s;

    for (size_t i = 0; i < spec->list.n; i++) {
        if (!spec_key_find(spec, spec->list.v[i].key)) {
            qi_error_file(filename, "Invalid parameter '%s'",
                          spec->list.v[i].key);
            return -EINVAL;
        }
    }
    if ((s = qi_opts_get(&spec->list, "size"))) {
        if (qi_parse_size(s, &v) < 0) {
            qi_size_param_error(filename, "size");
            return -EINVAL;
        }
        o->size = v;
        spec->size_str = s;
    }
    if ((s = qi_opts_get(&spec->list, "cluster_size"))) {
        if (qi_parse_size(s, &v) < 0) {
            qi_size_param_error(filename, "cluster_size");
            return -EINVAL;
        }
        /* Out-of-range values are left for the library to refuse. */
        o->cluster_size = v > UINT32_MAX ? UINT32_MAX : (uint32_t)v;
    }
    if ((s = qi_opts_get(&spec->list, "refcount_bits"))) {
        if (qi_parse_uint(s, &v) < 0) {
            qi_error_file(filename, "Parameter 'refcount_bits' expects a "
                                    "number");
            return -EINVAL;
        }
        o->refcount_bits = v > INT_MAX ? INT_MAX : (int)v;
    }
    if ((s = qi_opts_get(&spec->list, "lazy_refcounts"))) {
        if (parse_bool(s, &o->lazy_refcounts) < 0) {
            qi_error_file(filename,
                          "Parameter 'lazy_refcounts' expects 'on' or 'off'");
            return -EINVAL;
        }
    }
    if ((s = qi_opts_get(&spec->list, "extended_l2"))) {
        if (parse_bool(s, &spec->extended_l2) < 0) {
            qi_error_file(filename,
                          "Parameter 'extended_l2' expects 'on' or 'off'");
            return -EINVAL;
        }
    }
    if ((s = qi_opts_get(&spec->list, "backing_file"))) {
        o->backing_file = s;
    }
    if ((s = qi_opts_get(&spec->list, "backing_fmt"))) {
        o->backing_fmt = s;
    }
    spec->compat = qi_opts_get(&spec->list, "compat");
    spec->prealloc = qi_opts_get(&spec->list, "preallocation");
    spec->compression = qi_opts_get(&spec->list, "compression_type");
    return 0;
}

int qi_create_spec_check(struct qi_create_spec *spec, const char *filename)
{
    struct qsnap_create_opts *o = &spec->opts;
    const char *s;

    if ((s = spec->compat)) {
        if (strcmp(s, "0.10") == 0 || strcmp(s, "v2") == 0) {
            o->version = 2;
        } else if (strcmp(s, "1.1") == 0 || strcmp(s, "v3") == 0) {
            o->version = 3;
        } else {
            qi_error_file(filename,
                          "Parameter 'version' does not accept value '%s'", s);
            return -EINVAL;
        }
    }
    if ((s = spec->prealloc)) {
        static const char *const modes[] = {"off", "metadata", "falloc",
                                            "full"};
        int mode = -1;
        for (int i = 0; i < 4; i++) {
            if (strcmp(s, modes[i]) == 0) {
                mode = i;
            }
        }
        if (mode < 0) {
            qi_error_file(filename,
                          "Parameter 'preallocation' does not accept value "
                          "'%s'",
                          s);
            return -EINVAL;
        }
        o->prealloc = mode == 0   ? QSNAP_PREALLOC_OFF
                      : mode == 1 ? QSNAP_PREALLOC_METADATA
                      : mode == 2 ? QSNAP_PREALLOC_FALLOC
                                  : QSNAP_PREALLOC_FULL;
    }
    if ((s = spec->compression)) {
        if (strcmp(s, "zlib") == 0) {
            o->compression_type = QSNAP_COMPRESSION_ZLIB;
        } else if (strcmp(s, "zstd") == 0) {
            o->compression_type = QSNAP_COMPRESSION_ZSTD;
        } else {
            qi_error_file(filename,
                          "Parameter 'compression-type' does not accept "
                          "value '%s'",
                          s);
            return -EINVAL;
        }
    }
    if (spec->extended_l2) {
        qi_error_file(filename, "Extended L2 tables are not supported");
        return -EINVAL;
    }
    if (o->version == 2 && o->compression_type != QSNAP_COMPRESSION_ZLIB) {
        qi_error_file(filename,
                      "Non-zlib compression type is only supported with "
                      "compatibility level 1.1 and above (use version=v3 or "
                      "greater)");
        return -EINVAL;
    }
    if (o->version == 2 && o->lazy_refcounts) {
        qi_error_file(filename,
                      "Lazy refcounts only supported with compatibility "
                      "level 1.1 and above (use version=v3 or greater)");
        return -EINVAL;
    }
    if (o->version == 2 && o->refcount_bits != 16) {
        qi_error_file(filename,
                      "Different refcount widths than 16 bits require "
                      "compatibility level 1.1 or above (use version=v3 or "
                      "greater)");
        return -EINVAL;
    }
    if (o->backing_fmt && qi_format_from_name(o->backing_fmt) <= 0) {
        qi_error_file(filename, "Unknown backing file format '%s'",
                      o->backing_fmt);
        return -EINVAL;
    }
    return 0;
}

void qi_create_spec_free(struct qi_create_spec *spec)
{
    qi_opts_free(&spec->list);
}

/* ------------------------------------------------------------ images */

int qi_open(const char *filename, const char *fmt_name, unsigned flags,
            qsnap_image **img)
{
    struct qsnap_open_opts o;
    char err[1024] = "";

    qsnap_open_opts_init(&o);
    o.flags = flags;
    o.format = qi_format_from_name(fmt_name);
    if (o.format < 0) {
        qi_error("Could not open '%s': Unknown driver '%s'", filename,
                 fmt_name);
        return -EINVAL;
    }
    const int ret = qsnap_open(filename, &o, img, err, sizeof(err));
    if (ret < 0) {
        qi_error("Could not open '%s': %s", filename,
                 err[0] ? err : qsnap_strerror(ret));
        return ret;
    }
    if (!fmt_name && (flags & QSNAP_OPEN_RDWR)) {
        struct qsnap_info info;
        memset(&info, 0, sizeof(info));
        info.struct_size = sizeof(info);
        if (qsnap_get_info(*img, &info) == 0 && info.format == QSNAP_FMT_RAW) {
            fflush(stdout);
            fprintf(stderr,
                    "WARNING: Image format was not specified for '%s' and "
                    "probing guessed raw.\n"
                    "         Automatically detecting the format is "
                    "dangerous for raw images: a guest could write a qcow2 "
                    "header to block 0.\n"
                    "         Specify the 'raw' format explicitly to remove "
                    "this warning.\n",
                    filename);
        }
    }
    return 0;
}

int qi_close(qsnap_image *img, const char *filename)
{
    const int ret = qsnap_close(img);
    if (ret < 0) {
        qi_error_file(filename, "closing the image failed: %s",
                      qsnap_strerror(ret));
    }
    return ret;
}

int qi_get_info(qsnap_image *img, struct qsnap_info *info)
{
    memset(info, 0, sizeof(*info));
    info->struct_size = sizeof(*info);
    const int ret = qsnap_get_info(img, info);
    if (ret < 0) {
        qi_error("%s", qsnap_errmsg(img)[0] ? qsnap_errmsg(img)
                                            : qsnap_strerror(ret));
    }
    return ret;
}

const char *qi_strip_path(const char *msg, const char *path)
{
    const size_t n = strlen(path);
    if (strncmp(msg, path, n) == 0 && msg[n] == ':' && msg[n + 1] == ' ') {
        return msg + n + 2;
    }
    return msg;
}

void *qi_alloc_buf(size_t len)
{
    return qsnap_alloc_buf(len);
}

bool qi_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    /* Check a short head byte by byte, then the rest against itself. */
    const size_t head = len < 16 ? len : 16;
    for (size_t i = 0; i < head; i++) {
        if (p[i]) {
            return false;
        }
    }
    return len <= 16 || memcmp(p, p + 16, len - 16) == 0;
}

double qi_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------ chains */

struct chain_layer {
    char path[PATH_MAX];
    qsnap_image *img;
    struct qsnap_info info;
    bool recurse;      /* consult the host file for holes */
    bool file_opened;  /* tried to open `file` */
    qsnap_image *file; /* the image file opened as raw, or NULL */
};

struct qi_chain {
    struct chain_layer *layers;
    int n;
};

/*
 * QEMU's test for a qcow2 image with preallocated metadata: at least
 * max(real * 10 / 9, real + 2) clusters in use, where `real` is the
 * number of clusters the file occupies on disk.  Clusters in use are
 * counted here as the clusters the file spans (the public interface does
 * not expose reference counts), which is exact unless clusters inside
 * the file have been freed.
 */
static bool looks_preallocated(const struct qsnap_info *info)
{
    if (info->format != QSNAP_FMT_QCOW2 || info->cluster_size == 0) {
        return false;
    }
    const uint64_t cs = info->cluster_size;
    const uint64_t real = info->disk_size / cs;
    const uint64_t threshold =
        real * 10 / 9 > real + 2 ? real * 10 / 9 : real + 2;
    const uint64_t used = (info->file_size + cs - 1) / cs;
    return used >= threshold;
}

void qi_chain_close(struct qi_chain *ch)
{
    if (!ch) {
        return;
    }
    for (int i = 0; i < ch->n; i++) {
        qsnap_close(ch->layers[i].img);
        if (ch->layers[i].file) {
            qsnap_close(ch->layers[i].file);
        }
    }
    free(ch->layers);
    free(ch);
}

int qi_chain_open(const char *filename, const char *fmt, unsigned flags,
                  struct qi_chain **out)
{
    struct qi_chain *ch = calloc(1, sizeof(*ch));
    if (ch) {
        ch->layers = calloc(QI_MAX_CHAIN, sizeof(*ch->layers));
    }
    if (!ch || !ch->layers) {
        free(ch);
        qi_error("%s", qsnap_strerror(-ENOMEM));
        return -ENOMEM;
    }
    snprintf(ch->layers[0].path, PATH_MAX, "%s", filename);
    for (;;) {
        struct chain_layer *l = &ch->layers[ch->n];
        int ret = qi_open(l->path, fmt, flags | QSNAP_OPEN_NO_BACKING, &l->img);
        if (ret == 0) {
            ch->n++;
            ret = qi_get_info(l->img, &l->info);
        }
        if (ret < 0) {
            qi_chain_close(ch);
            return ret;
        }
        l->recurse = looks_preallocated(&l->info);
        if (!l->info.backing_file[0]) {
            *out = ch;
            return 0;
        }
        if (ch->n == QI_MAX_CHAIN) {
            qi_error("Could not open '%s': backing chain is longer than %d "
                     "images",
                     filename, QI_MAX_CHAIN);
            qi_chain_close(ch);
            return -ELOOP;
        }
        qi_backing_path(l->path, l->info.backing_file, ch->layers[ch->n].path,
                        PATH_MAX);
        for (int i = 0; i < ch->n; i++) {
            if (qi_same_file(ch->layers[i].path, ch->layers[ch->n].path)) {
                qi_error("Backing file '%s' creates an infinite loop.",
                         l->info.backing_file);
                qi_chain_close(ch);
                return -ELOOP;
            }
        }
        fmt = l->info.backing_fmt[0] ? l->info.backing_fmt : NULL;
    }
}

bool qi_same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

uint64_t qi_chain_size(const struct qi_chain *ch)
{
    return ch->layers[0].info.virtual_size;
}

/*
 * The host file's view of [host_off, host_off + *len) for a preallocated
 * qcow2 layer: may shorten *len and add QI_ST_ZERO, as QEMU's file layer
 * does.
 */
static void host_status(struct chain_layer *l, uint64_t host_off, uint64_t *len,
                        unsigned *st_flags)
{
    if (!l->file_opened) {
        struct qsnap_open_opts o;
        qsnap_open_opts_init(&o);
        o.format = QSNAP_FMT_RAW;
        o.flags = QSNAP_OPEN_FORCE_SHARE;
        l->file_opened = true;
        if (qsnap_open(l->path, &o, &l->file, NULL, 0) < 0) {
            l->file = NULL;
        }
    }
    if (!l->file) {
        return;
    }
    struct qsnap_info fi;
    memset(&fi, 0, sizeof(fi));
    fi.struct_size = sizeof(fi);
    if (qsnap_get_info(l->file, &fi) < 0) {
        return;
    }
    if (host_off >= fi.virtual_size) {
        /* Past the end of the file reads as zeros. */
        *st_flags |= QI_ST_ZERO;
        return;
    }
    uint64_t n = *len;
    if (n > fi.virtual_size - host_off) {
        n = fi.virtual_size - host_off;
    }
    uint64_t pnum;
    unsigned flags;
    if (qsnap_block_status(l->file, host_off, n, &pnum, &flags, NULL, NULL) <
            0 ||
        pnum == 0) {
        return;
    }
    if (host_off + pnum == fi.virtual_size && (flags & QSNAP_BS_ZERO)) {
        /* A hole up to the end of the file: the whole range is zero. */
        *st_flags |= QI_ST_ZERO;
        return;
    }
    *len = pnum;
    if (flags & QSNAP_BS_ZERO) {
        *st_flags |= QI_ST_ZERO;
    }
}

int qi_chain_status(struct qi_chain *ch, uint64_t offset, uint64_t bytes,
                    struct qi_status *st)
{
    int depth = 0;
    unsigned flags = 0;
    uint64_t host = 0;
    bool past_backing = false;

    for (;;) {
        struct chain_layer *l = &ch->layers[depth];
        uint64_t pnum;
        const int ret = qsnap_block_status(l->img, offset, bytes, &pnum, &flags,
                                           &host, NULL);
        if (ret < 0) {
            return ret;
        }
        if (pnum == 0) {
            return -EIO;
        }
        bytes = pnum;
        if (flags & QSNAP_BS_ALLOCATED) {
            break;
        }
        /*
         * Unallocated here: the backing file decides, if there is one.
         * (A host offset, as an allocated cluster's unallocated subcluster
         * has, is kept only when no backing file takes over.)
         */
        if (depth + 1 >= ch->n) {
            flags |= QSNAP_BS_ZERO;
            break;
        }
        const uint64_t bsize = ch->layers[depth + 1].info.virtual_size;
        if (offset >= bsize) {
            /* Past the end of the backing file reads as zeros. */
            flags |= QSNAP_BS_ZERO;
            past_backing = true;
            break;
        }
        if (bytes > bsize - offset) {
            bytes = bsize - offset;
        }
        depth++;
    }

    struct chain_layer *l = &ch->layers[depth];
    unsigned out = 0;
    if (flags & QSNAP_BS_DATA) {
        out |= QI_ST_DATA;
    }
    if (flags & QSNAP_BS_ZERO) {
        out |= QI_ST_ZERO;
    }
    if (flags & QSNAP_BS_OFFSET) {
        out |= QI_ST_OFFSET;
    }
    if (flags & QSNAP_BS_ALLOCATED) {
        out |= QI_ST_ALLOCATED;
    }
    if (l->recurse && (out & QI_ST_DATA) && (out & QI_ST_OFFSET)) {
        out |= QI_ST_RECURSE;
        if (!(out & QI_ST_ZERO)) {
            host_status(l, host, &bytes, &out);
        }
    }
    if (offset + bytes == qi_chain_size(ch)) {
        out |= QI_ST_EOF;
    }
    *st = (struct qi_status){
        .len = bytes,
        .offset = (out & QI_ST_OFFSET) ? host : 0,
        .depth = depth,
        .flags = out,
        .past_backing = past_backing,
        .filename = (out & QI_ST_OFFSET) ? l->path : NULL,
    };
    return 0;
}

int qi_chain_length(const struct qi_chain *ch)
{
    return ch->n;
}

void qi_chain_layer(const struct qi_chain *ch, int depth, struct qi_layer *out)
{
    const struct chain_layer *l = &ch->layers[depth];
    out->path = l->path;
    out->img = l->img;
    out->info = &l->info;
}

int qi_chain_list(qsnap_image *img, const char *filename,
                  struct qsnap_layer_info **list, uint32_t *n)
{
    const int ret = qsnap_chain_list(img, list, n);
    if (ret < 0) {
        *list = NULL;
        *n = 0;
        qi_error("Could not read the backing chain of '%s': %s", filename,
                 qi_strip_path(qi_errmsg(img, ret), filename));
    }
    return ret;
}

/* True if PATH is the file of layer L (same device and inode). */
static bool same_file(const char *path, const struct qsnap_layer_info *l)
{
    struct stat a;
    struct stat b;
    return stat(path, &a) == 0 && stat(l->filename, &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino;
}

int qi_chain_find(const struct qsnap_layer_info *list, uint32_t n,
                  const char *name, enum qi_find how)
{
    char path[PATH_MAX];

    for (uint32_t d = 0; d < n && d <= INT_MAX; d++) {
        if (how == QI_FIND_PATH) {
            if (same_file(name, &list[d]) ||
                (d > 0 && strcmp(list[d - 1].backing_name, name) == 0)) {
                return (int)d;
            }
        } else if (d > 0) {
            /* Relative to the layer that names its backing file. */
            qi_backing_path(list[d - 1].filename, name, path, sizeof(path));
            if (same_file(path, &list[d])) {
                return (int)d;
            }
        }
    }
    return -1;
}

int qi_find_base(qsnap_image *img, const char *filename, const char *base,
                 char *path, size_t len)
{
    struct qsnap_layer_info *list;
    uint32_t n;

    path[0] = '\0';
    if (qi_chain_list(img, filename, &list, &n) < 0) {
        return -1;
    }
    int ret = 0;
    if (base) {
        const int depth = qi_chain_find(list, n, base, QI_FIND_BACKING);
        if (depth < 1) {
            qi_error("Did not find '%s' in the backing chain of '%s'", base,
                     filename);
            ret = -1;
        } else {
            snprintf(path, len, "%s", list[depth].filename);
        }
    } else if (n < 2) {
        qi_error("Image does not have a backing file");
        ret = -1;
    }
    free(list);
    return ret;
}

/* ------------------------------------------------------------ snapshots */

const char *qi_errmsg(const qsnap_image *img, int err)
{
    const char *msg = img ? qsnap_errmsg(img) : "";
    return msg[0] ? msg : qsnap_strerror(err);
}

void qi_snapshot_opts_init(struct qsnap_snapshot_opts *opts)
{
    qsnap_snapshot_opts_init(opts);
    /* qemu-img records no VM clock and an instruction count of zero. */
    opts->vm_clock_ns = 0;
    opts->icount = 0;
}

int qi_snapshot_list(qsnap_image *img, const char *filename,
                     struct qsnap_snapshot_info **list, uint32_t *n)
{
    const int ret = qsnap_snapshot_list(img, list, n);
    if (ret < 0) {
        *list = NULL;
        *n = 0;
        qi_error("Could not list the snapshots of '%s': %s", filename,
                 qi_errmsg(img, ret));
    }
    return ret;
}

int qi_snapshot_find(const struct qsnap_snapshot_info *list, uint32_t n,
                     const char *id, const char *name)
{
    for (uint32_t i = 0; i < n && i <= INT_MAX; i++) {
        if ((!id || strcmp(list[i].id, id) == 0) &&
            (!name || strcmp(list[i].name, name) == 0)) {
            return (int)i;
        }
    }
    return -1;
}

int qi_snapshot_find_id_or_name(const struct qsnap_snapshot_info *list,
                                uint32_t n, const char *id_or_name)
{
    const int i = qi_snapshot_find(list, n, id_or_name, NULL);
    return i >= 0 ? i : qi_snapshot_find(list, n, NULL, id_or_name);
}

void qi_snapshot_date(const struct qsnap_snapshot_info *sn, char *buf,
                      size_t len)
{
    struct tm tm;
    const time_t t = (time_t)sn->date_sec;

    buf[0] = '\0';
    if (localtime_r(&t, &tm)) {
        strftime(buf, len, "%Y-%m-%d %H:%M:%S", &tm);
    }
}

void qi_snapshot_clock(const struct qsnap_snapshot_info *sn, char *buf,
                       size_t len)
{
    const uint64_t secs = sn->vm_clock_ns / 1000000000u;
    snprintf(buf, len, "%02d:%02d:%02d.%03d", (int)(secs / 3600),
             (int)((secs / 60) % 60), (int)(secs % 60),
             (int)((sn->vm_clock_ns / 1000000u) % 1000));
}

void qi_snapshot_print_header(void)
{
    printf("%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
           "VM CLOCK", "ICOUNT");
}

void qi_snapshot_print(const struct qsnap_snapshot_info *sn)
{
    char date[64];
    char clock[64];
    char icount[32] = "";
    char size[64];

    qi_snapshot_date(sn, date, sizeof(date));
    qi_snapshot_clock(sn, clock, sizeof(clock));
    if (sn->icount != -1) {
        snprintf(icount, sizeof(icount), "%" PRId64, sn->icount);
    }
    qi_human_size(sn->vm_state_size, size, sizeof(size));
    printf("%-9s %-16s %8s%20s%13s%11s\n", sn->id, sn->name, size, date, clock,
           icount);
}

/* ------------------------------------------------------------ progress */

static struct {
    pthread_mutex_t lock;
    bool enabled;
    float current;
    float last_print;
    float min_skip;
} progress = {.lock = PTHREAD_MUTEX_INITIALIZER};

void qi_progress_init(bool enabled, float min_skip)
{
    pthread_mutex_lock(&progress.lock);
    progress.enabled = enabled;
    progress.current = 0;
    progress.last_print = 0;
    progress.min_skip = min_skip;
    pthread_mutex_unlock(&progress.lock);
}

void qi_progress_print(float delta, int max)
{
    pthread_mutex_lock(&progress.lock);
    float current =
        max == 0 ? delta : progress.current + delta / 100 * (float)max;
    if (current > 100) {
        current = 100;
    }
    progress.current = current;
    if (progress.enabled &&
        (current > progress.last_print + progress.min_skip ||
         current < progress.last_print - progress.min_skip || current == 0 ||
         current == 100)) {
        progress.last_print = current;
        fprintf(stderr, "    (%3.2f/100%%)\r", (double)current);
        fflush(stderr);
    }
    pthread_mutex_unlock(&progress.lock);
}

void qi_progress_end(void)
{
    pthread_mutex_lock(&progress.lock);
    if (progress.enabled) {
        fputc('\n', stderr);
        fflush(stderr);
    }
    progress.enabled = false;
    pthread_mutex_unlock(&progress.lock);
}

void qi_progress_cb(void *opaque, uint64_t done, uint64_t total)
{
    (void)opaque;
    qi_progress_print(
        total ? (float)((double)done * 100.0 / (double)total) : 100.0f, 0);
}

void qi_progress_start(bool enabled)
{
    qi_progress_init(enabled, 1.0f);
    qi_progress_print(0, 100);
}

void qi_progress_done(bool ok)
{
    if (ok) {
        qi_progress_print(100, 0);
    }
    qi_progress_end();
}
