/*
 * chain_driver.c - a test driver for backing chains, on the public API.
 *
 * The chain_*.sh integration scripts and bench/chain_bench.sh use it to
 * call the chain operations of libqsnap directly:
 *
 *   commit [-b BASE] [-d] [-p] TOP          qsnap_commit
 *   rebase [-u] [-F FMT] [-p] IMAGE BACKING qsnap_rebase ("" = none)
 *   stream [-b BASE] [-p] IMAGE             qsnap_stream
 *   delete [--stream|--commit] [-p] [--throttle-us N] TOP LAYER
 *                                           qsnap_checkpoint_delete
 *   push [options] IMAGE OVERLAY            qsnap_overlay_push
 *   list [-f FMT] IMAGE                     qsnap_chain_list
 *   poke FILE OFFSET WIDTH VALUE            patch a big-endian integer
 *   peek FILE OFFSET WIDTH                  read one
 *
 * Every failure prints the library's message (which must name the file)
 * on standard error after the name of the call.
 *
 * Exit status: 0 success, 1 failure, 2 usage.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <qsnap.h>

#include "driver_util.h"

#define PROG "chain-driver"

const char drv_prog[] = PROG;
#define MAX_WRITES 64

/* ------------------------------------------------------------------ */
/* Small helpers                                                      */
/* ------------------------------------------------------------------ */

static const char *format_name(int format)
{
    switch (format) {
    case QSNAP_FMT_QCOW2:
        return "qcow2";
    case QSNAP_FMT_RAW:
        return "raw";
    default:
        return "auto";
    }
}

/* Opens an image and its chain, with the library's default cache. */
static int open_chain(const char *path, unsigned flags, int format,
                      qsnap_image **img)
{
    return open_image(path, flags, format, 0, img);
}

/* Progress: optional bar on stderr and an optional pause per call. */
struct progress {
    bool show;
    uint64_t throttle_us;
    uint64_t calls;
    uint64_t last_done;
    uint64_t total;
    int last_pct;
};

static void on_progress(void *opaque, uint64_t done, uint64_t total)
{
    struct progress *p = opaque;

    p->calls++;
    if (done < p->last_done && p->total == total) {
        msg("progress went backwards: %" PRIu64 " after %" PRIu64, done,
            p->last_done);
    }
    p->last_done = done;
    p->total = total;
    if (p->show && total > 0) {
        const int pct = (int)(done * 100 / total);

        if (pct != p->last_pct) {
            fprintf(stderr, "    (%d.00/100%%)\r", pct);
            p->last_pct = pct;
        }
    }
    if (p->throttle_us > 0) {
        const struct timespec ts = {
            .tv_sec = (time_t)(p->throttle_us / 1000000),
            .tv_nsec = (long)(p->throttle_us % 1000000) * 1000,
        };

        nanosleep(&ts, NULL);
    }
}

static void progress_end(const struct progress *p)
{
    if (p->show) {
        fprintf(stderr, "    (100.00/100%%)\n");
    }
}

/* ------------------------------------------------------------------ */
/* commit, rebase, stream                                             */
/* ------------------------------------------------------------------ */

static int cmd_commit(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"base", required_argument, NULL, 'b'},
        {"keep", no_argument, NULL, 'd'},
        {"progress", no_argument, NULL, 'p'},
        {NULL, 0, NULL, 0},
    };
    struct progress prog = {.last_pct = -1};
    const char *base = NULL;
    unsigned flags = 0;
    qsnap_image *img;
    int c;
    int rc;

    while ((c = getopt_long(argc, argv, "b:dp", longopts, NULL)) != -1) {
        switch (c) {
        case 'b':
            base = optarg;
            break;
        case 'd':
            flags |= QSNAP_COMMIT_KEEP;
            break;
        case 'p':
            prog.show = true;
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 1) {
        msg("commit: expected TOP");
        return 2;
    }
    if (open_chain(argv[optind], QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, &img) < 0) {
        return 1;
    }
    rc = qsnap_commit(img, base, flags, on_progress, &prog);
    if (rc < 0) {
        report(img, "commit", rc);
        close_image(img);
        return 1;
    }
    progress_end(&prog);
    return close_image(img) < 0 ? 1 : 0;
}

static int cmd_rebase(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"unsafe", no_argument, NULL, 'u'},
        {"backing-fmt", required_argument, NULL, 'F'},
        {"progress", no_argument, NULL, 'p'},
        {NULL, 0, NULL, 0},
    };
    struct progress prog = {.last_pct = -1};
    const char *fmt = NULL;
    unsigned flags = 0;
    qsnap_image *img;
    int c;
    int rc;

    while ((c = getopt_long(argc, argv, "uF:p", longopts, NULL)) != -1) {
        switch (c) {
        case 'u':
            flags |= QSNAP_REBASE_UNSAFE;
            break;
        case 'F':
            fmt = optarg;
            break;
        case 'p':
            prog.show = true;
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 2) {
        msg("rebase: expected IMAGE BACKING (\"\" for none)");
        return 2;
    }
    if (open_chain(argv[optind], QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, &img) < 0) {
        return 1;
    }
    rc = qsnap_rebase(img, argv[optind + 1], fmt, flags, on_progress, &prog);
    if (rc < 0) {
        report(img, "rebase", rc);
        close_image(img);
        return 1;
    }
    progress_end(&prog);
    return close_image(img) < 0 ? 1 : 0;
}

static int cmd_stream(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"base", required_argument, NULL, 'b'},
        {"progress", no_argument, NULL, 'p'},
        {NULL, 0, NULL, 0},
    };
    struct progress prog = {.last_pct = -1};
    const char *base = NULL;
    qsnap_image *img;
    int c;
    int rc;

    while ((c = getopt_long(argc, argv, "b:p", longopts, NULL)) != -1) {
        switch (c) {
        case 'b':
            base = optarg;
            break;
        case 'p':
            prog.show = true;
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 1) {
        msg("stream: expected IMAGE");
        return 2;
    }
    if (open_chain(argv[optind], QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, &img) < 0) {
        return 1;
    }
    rc = qsnap_stream(img, base, on_progress, &prog);
    if (rc < 0) {
        report(img, "stream", rc);
        close_image(img);
        return 1;
    }
    progress_end(&prog);
    return close_image(img) < 0 ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* delete (merge)                                                     */
/* ------------------------------------------------------------------ */

static int cmd_delete(int argc, char **argv)
{
    enum { OPT_STREAM = 256, OPT_COMMIT, OPT_THROTTLE };
    static const struct option longopts[] = {
        {"stream", no_argument, NULL, OPT_STREAM},
        {"commit", no_argument, NULL, OPT_COMMIT},
        {"throttle-us", required_argument, NULL, OPT_THROTTLE},
        {"progress", no_argument, NULL, 'p'},
        {NULL, 0, NULL, 0},
    };
    struct progress prog = {.last_pct = -1};
    unsigned flags = QSNAP_MERGE_AUTO;
    char err[2048] = "";
    struct stat before;
    struct stat after;
    const char *top;
    const char *layer;
    bool have_before;
    int c;
    int rc;

    while ((c = getopt_long(argc, argv, "p", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_STREAM:
            flags |= QSNAP_MERGE_STREAM;
            break;
        case OPT_COMMIT:
            flags |= QSNAP_MERGE_COMMIT;
            break;
        case OPT_THROTTLE:
            prog.throttle_us = need_size("pause", optarg);
            break;
        case 'p':
            prog.show = true;
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 2) {
        msg("delete: expected TOP LAYER");
        return 2;
    }
    top = argv[optind];
    layer = argv[optind + 1];
    /* The layer's inode tells afterwards which way the merge went: it
     * either disappears or takes its child's place. */
    have_before = stat(layer, &before) == 0;
    rc = qsnap_checkpoint_delete(top, layer, flags, on_progress, &prog, err,
                                 sizeof(err));
    if (rc < 0) {
        msg("delete failed (%s): %s", qsnap_strerror(rc),
            err[0] ? err : "(the library gave no message)");
        return 1;
    }
    progress_end(&prog);
    if (stat(layer, &after) == 0) {
        msg("delete: %s still exists after a successful delete", layer);
        return 1;
    }
    if (have_before) {
        /* Search the chain of the top for the layer's old inode. */
        qsnap_image *img;
        struct qsnap_layer_info *list = NULL;
        uint32_t n = 0;
        const char *how = "stream";

        if (open_chain(top, QSNAP_OPEN_FORCE_SHARE, QSNAP_FMT_AUTO, &img) < 0) {
            return 1;
        }
        rc = qsnap_chain_list(img, &list, &n);
        if (rc < 0) {
            report(img, "chain list", rc);
            close_image(img);
            return 1;
        }
        for (uint32_t i = 0; i < n; i++) {
            if (stat(list[i].filename, &after) == 0 &&
                after.st_dev == before.st_dev &&
                after.st_ino == before.st_ino) {
                how = "commit";
            }
        }
        free(list);
        if (close_image(img) < 0) {
            return 1;
        }
        printf("merged by %s\n", how);
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* push                                                               */
/* ------------------------------------------------------------------ */

struct pattern_write {
    uint64_t off;
    uint64_t len;
    uint8_t pat;
};

/* Parses OFF:LEN:PATTERN (PATTERN one byte, e.g. 0xa5). */
static void parse_write(const char *s, struct pattern_write *w)
{
    char buf[128];
    char *len;
    char *pat;
    uint64_t v;

    snprintf(buf, sizeof(buf), "%s", s);
    len = strchr(buf, ':');
    pat = len ? strchr(len + 1, ':') : NULL;
    if (!pat) {
        msg("invalid write '%s' (OFF:LEN:PATTERN)", s);
        exit(2);
    }
    *len++ = '\0';
    *pat++ = '\0';
    w->off = need_size("offset", buf);
    w->len = need_size("length", len);
    v = need_size("pattern", pat);
    if (v > 255) {
        msg("invalid pattern '%s' (one byte)", pat);
        exit(2);
    }
    w->pat = (uint8_t)v;
}

static int do_writes(qsnap_image *img, const struct pattern_write *w,
                     int n)
{
    for (int i = 0; i < n; i++) {
        uint8_t *buf = malloc(w[i].len ? w[i].len : 1);
        int rc;

        if (!buf) {
            msg("out of memory");
            return -ENOMEM;
        }
        memset(buf, w[i].pat, w[i].len);
        rc = qsnap_pwrite(img, buf, w[i].len, w[i].off);
        free(buf);
        if (rc < 0) {
            report(img, "write", rc);
            return rc;
        }
    }
    return 0;
}

static int cmd_push(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"cluster-size", required_argument, NULL, 'c'},
        {"version", required_argument, NULL, 'v'},
        {"write-before", required_argument, NULL, 'w'},
        {"write-after", required_argument, NULL, 'W'},
        {NULL, 0, NULL, 0},
    };
    struct pattern_write before[MAX_WRITES];
    struct pattern_write after[MAX_WRITES];
    struct qsnap_create_opts co;
    struct qsnap_info info;
    int n_before = 0;
    int n_after = 0;
    qsnap_image *img;
    int c;
    int rc;

    qsnap_create_opts_init(&co);
    while ((c = getopt_long(argc, argv, "c:v:w:W:", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            co.cluster_size = (uint32_t)need_size("cluster size", optarg);
            break;
        case 'v':
            co.version = (int)need_size("version", optarg);
            break;
        case 'w':
            if (n_before == MAX_WRITES) {
                msg("too many writes");
                return 2;
            }
            parse_write(optarg, &before[n_before++]);
            break;
        case 'W':
            if (n_after == MAX_WRITES) {
                msg("too many writes");
                return 2;
            }
            parse_write(optarg, &after[n_after++]);
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 2) {
        msg("push: expected IMAGE OVERLAY");
        return 2;
    }
    if (open_chain(argv[optind], QSNAP_OPEN_RDWR, QSNAP_FMT_AUTO, &img) < 0) {
        return 1;
    }
    if (do_writes(img, before, n_before) < 0) {
        close_image(img);
        return 1;
    }
    rc = qsnap_overlay_push(&img, argv[optind + 1], &co);
    if (rc < 0) {
        report(img, "overlay push", rc);
        close_image(img);
        return 1;
    }
    memset(&info, 0, sizeof(info));
    info.struct_size = sizeof(info);
    rc = qsnap_get_info(img, &info);
    if (rc < 0) {
        report(img, "info", rc);
        close_image(img);
        return 1;
    }
    if (info.read_only) {
        msg("push: the new top %s is not writable", info.filename);
        close_image(img);
        return 1;
    }
    if (do_writes(img, after, n_after) < 0) {
        close_image(img);
        return 1;
    }
    return close_image(img) < 0 ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* list                                                               */
/* ------------------------------------------------------------------ */

static int cmd_list(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"format", required_argument, NULL, 'f'},
        {NULL, 0, NULL, 0},
    };
    struct qsnap_layer_info *list = NULL;
    int format = QSNAP_FMT_AUTO;
    qsnap_image *img;
    uint32_t n = 0;
    int c;
    int rc;

    while ((c = getopt_long(argc, argv, "f:", longopts, NULL)) != -1) {
        switch (c) {
        case 'f':
            format = parse_format(optarg);
            break;
        default:
            return 2;
        }
    }
    if (argc - optind != 1) {
        msg("list: expected IMAGE");
        return 2;
    }
    if (open_chain(argv[optind], QSNAP_OPEN_FORCE_SHARE, format, &img) < 0) {
        return 1;
    }
    rc = qsnap_chain_list(img, &list, &n);
    if (rc < 0) {
        report(img, "chain list", rc);
        close_image(img);
        return 1;
    }
    /* depth format size allocated filename backing-name backing-fmt */
    for (uint32_t i = 0; i < n; i++) {
        printf("%" PRIu32 "\t%s\t%" PRIu64 "\t%" PRIu64 "\t%s\t%s\t%s\n", i,
               format_name(list[i].format), list[i].virtual_size,
               list[i].allocated_bytes, list[i].filename,
               list[i].backing_name, list[i].backing_fmt);
    }
    free(list);
    return close_image(img) < 0 ? 1 : 0;
}

/* ------------------------------------------------------------------ */
/* poke, peek: raw big-endian fields, without libqsnap                */
/* ------------------------------------------------------------------ */

static int field_args(char **argv, uint64_t *off, unsigned *width)
{
    const uint64_t w = need_size("width", argv[2]);

    *off = need_size("offset", argv[1]);
    if (w != 1 && w != 2 && w != 4 && w != 8) {
        msg("width must be 1, 2, 4 or 8");
        return -1;
    }
    *width = (unsigned)w;
    return 0;
}

static int cmd_poke(int argc, char **argv)
{
    uint8_t b[8];
    uint64_t off;
    uint64_t v;
    unsigned width;
    int fd;
    ssize_t n;

    if (argc != 5) {
        msg("poke: expected FILE OFFSET WIDTH VALUE");
        return 2;
    }
    if (field_args(argv + 1, &off, &width) < 0) {
        return 2;
    }
    v = need_size("value", argv[4]);
    for (unsigned i = 0; i < width; i++) {
        b[i] = (uint8_t)(v >> (8 * (width - 1 - i)));
    }
    fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        msg("%s: %s", argv[1], strerror(errno));
        return 1;
    }
    n = pwrite(fd, b, width, (off_t)off);
    if (n != (ssize_t)width || close(fd) < 0) {
        msg("%s: write failed", argv[1]);
        return 1;
    }
    return 0;
}

static int cmd_peek(int argc, char **argv)
{
    uint8_t b[8];
    uint64_t off;
    uint64_t v = 0;
    unsigned width;
    int fd;
    ssize_t n;

    if (argc != 4) {
        msg("peek: expected FILE OFFSET WIDTH");
        return 2;
    }
    if (field_args(argv + 1, &off, &width) < 0) {
        return 2;
    }
    fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        msg("%s: %s", argv[1], strerror(errno));
        return 1;
    }
    n = pread(fd, b, width, (off_t)off);
    close(fd);
    if (n != (ssize_t)width) {
        msg("%s: short read", argv[1]);
        return 1;
    }
    for (unsigned i = 0; i < width; i++) {
        v = (v << 8) | b[i];
    }
    printf("%" PRIu64 "\n", v);
    return 0;
}

/* ------------------------------------------------------------------ */
/* main                                                               */
/* ------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fputs("Usage: " PROG " COMMAND [OPTIONS] ARGS...\n"
          "\n"
          "Backing chain operations of libqsnap (public API only).\n"
          "\n"
          "  commit [-b BASE] [-d] [-p] TOP\n"
          "      write TOP's data into its backing file (or BASE further\n"
          "      down); -d keeps TOP's data\n"
          "  rebase [-u] [-F FMT] [-p] IMAGE BACKING\n"
          "      change IMAGE's backing file (\"\" for none); -u only\n"
          "      rewrites the name\n"
          "  stream [-b BASE] [-p] IMAGE\n"
          "      copy the layers above BASE (all) into IMAGE\n"
          "  delete [--stream|--commit] [--throttle-us N] [-p] TOP LAYER\n"
          "      remove LAYER from TOP's chain, merging it; prints\n"
          "      'merged by stream' or 'merged by commit'\n"
          "  push [-c CLUSTER] [-v 2|3] [-w OFF:LEN:PAT]...\n"
          "       [-W OFF:LEN:PAT]... IMAGE OVERLAY\n"
          "      open IMAGE read-write, write (-w), freeze it under a new\n"
          "      overlay, write the overlay through the same handle (-W)\n"
          "  list [-f FMT] IMAGE\n"
          "      one line per layer: depth, format, virtual size,\n"
          "      allocated bytes, file name, backing name, backing format\n"
          "  poke FILE OFFSET WIDTH VALUE   big-endian, WIDTH 1, 2, 4 or 8\n"
          "  peek FILE OFFSET WIDTH\n"
          "\n"
          "Exit status: 0 success, 1 failure, 2 usage error.\n",
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
    if (strcmp(cmd, "commit") == 0) {
        return cmd_commit(argc, argv);
    } else if (strcmp(cmd, "rebase") == 0) {
        return cmd_rebase(argc, argv);
    } else if (strcmp(cmd, "stream") == 0) {
        return cmd_stream(argc, argv);
    } else if (strcmp(cmd, "delete") == 0) {
        return cmd_delete(argc, argv);
    } else if (strcmp(cmd, "push") == 0) {
        return cmd_push(argc, argv);
    } else if (strcmp(cmd, "list") == 0) {
        return cmd_list(argc, argv);
    } else if (strcmp(cmd, "poke") == 0) {
        return cmd_poke(argc, argv);
    } else if (strcmp(cmd, "peek") == 0) {
        return cmd_peek(argc, argv);
    } else if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0 ||
               strcmp(cmd, "help") == 0) {
        usage(stdout);
        return 0;
    }
    msg("unknown command '%s'", cmd);
    usage(stderr);
    return 2;
}
