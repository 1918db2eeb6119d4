/*
 * cmd_convert.c - "qsnap-img convert": copy an image into a new one.
 *
 *   convert [-U] [-c] [-p] [-q] [-f fmt] [-O output_fmt] [-o options]
 *           [-S sparse_size] [-m num_threads] [-W] filename output_filename
 *
 * The guest content of the source (with its backing chain) is copied into
 * a freshly created qcow2 or raw image.  The output stays sparse: ranges
 * the source reports as zero are skipped without being read, and read data
 * is scanned for zero blocks of -S bytes (default 4 KiB; at least a
 * cluster for qcow2 output), which are skipped too.  -S 0 writes
 * everything.  With -c every non-zero cluster is written compressed with
 * the output's compression type (-o compression_type=zlib|zstd).
 *
 * With -l (qemu-img's snapshot parameter: "snapshot.id=ID",
 * "snapshot.name=NAME", both, or an ID or name) or the older -s NAME, the
 * source is that internal snapshot's disk, read through a qsnap_view.  As
 * with qemu-img, the output has the image's current virtual size: past
 * the end of a snapshot taken at a smaller size it reads as zeros.
 *
 * The copy runs in 2 MiB chunks on -m threads (default 2).  Without -W
 * and -c the chunks are written in order, so the output's layout is
 * sequential while reads (and decompression) of the next chunks proceed
 * in parallel; with -W or -c chunks are written as soon as they are ready,
 * so compression uses every thread.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qsnap_img.h"

#define CHUNK QI_IO_BUF_SIZE
#define MAX_THREADS 16
#define MAX_SPARSE (16u * 1024 * 1024)
#define DEFAULT_SPARSE 4096u

struct conv {
    qsnap_image *src;
    qsnap_view *view; /* the snapshot read instead of src, or NULL */
    uint64_t view_size;
    qsnap_image *dst;
    uint64_t size;
    uint64_t n_chunks;
    uint64_t granule; /* zero-detection unit (0: write everything) */
    uint32_t cluster; /* output cluster size, for -c */
    bool compress;
    bool in_order;

    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint64_t next_chunk; /* next chunk to claim */
    uint64_t next_write; /* chunk whose turn it is to write (in order) */
    bool failed;
};

/* Records the first failure and wakes everyone so they stop. */
static void conv_fail(struct conv *cv, const char *what, uint64_t off,
                      qsnap_image *img, int err)
{
    pthread_mutex_lock(&cv->lock);
    if (!cv->failed) {
        const char *msg = qsnap_errmsg(img);
        cv->failed = true;
        qi_error("error while %s at byte %" PRIu64 ": %s", what, off,
                 msg[0] ? msg : qsnap_strerror(err));
    }
    pthread_cond_broadcast(&cv->cond);
    pthread_mutex_unlock(&cv->lock);
}

/* Block status of the source (the snapshot, with -l). */
static int src_status(struct conv *cv, uint64_t off, uint64_t len,
                      uint64_t *pnum, unsigned *flags)
{
    if (cv->view && off >= cv->view_size) {
        /* Past the end of the snapshot's disk. */
        *pnum = len;
        *flags = QSNAP_BS_ZERO;
        return 0;
    }
    if (cv->view) {
        if (len > cv->view_size - off) {
            len = cv->view_size - off;
        }
        return qsnap_view_block_status(cv->view, off, len, pnum, flags);
    }
    return qsnap_block_status(cv->src, off, len, pnum, flags, NULL, NULL);
}

static int src_read(struct conv *cv, void *buf, size_t len, uint64_t off)
{
    if (cv->view) {
        /* Past the end of the snapshot's disk reads as zeros. */
        size_t in = 0;
        if (off < cv->view_size) {
            in =
                len < cv->view_size - off ? len : (size_t)(cv->view_size - off);
        }
        memset((uint8_t *)buf + in, 0, len - in);
        return in ? qsnap_view_pread(cv->view, buf, in, off) : 0;
    }
    return qsnap_pread(cv->src, buf, len, off);
}

/* One extent of a chunk: bytes that read as zeros need not be read. */
struct extent {
    uint64_t off;
    uint64_t len;
    bool zero;
};

/*
 * Reads chunk [off, off + len) into BUF, recording its extents.  Zero
 * extents are not read (their part of BUF is left undefined).  Returns
 * the number of extents, or -1 after a failure.
 */
static int read_chunk(struct conv *cv, uint8_t *buf, uint64_t off, uint64_t len,
                      struct extent *ext, int max_ext)
{
    int n = 0;
    uint64_t pos = off;

    while (pos < off + len) {
        uint64_t pnum = off + len - pos;
        unsigned flags = 0;
        const int ret = src_status(cv, pos, pnum, &pnum, &flags);
        if (ret < 0 || pnum == 0) {
            /* Without status information, read it. */
            pnum = off + len - pos;
            flags = 0;
        }
        const bool zero = (flags & QSNAP_BS_ZERO) != 0;
        if (n > 0 && ext[n - 1].zero == zero) {
            ext[n - 1].len += pnum;
        } else if (n < max_ext) {
            ext[n++] = (struct extent){.off = pos, .len = pnum, .zero = zero};
        } else {
            /* Out of slots: treat the rest as data. */
            ext[n - 1].len = off + len - ext[n - 1].off;
            ext[n - 1].zero = false;
            pnum = off + len - pos;
        }
        pos += pnum;
    }
    for (int i = 0; i < n; i++) {
        if (ext[i].zero) {
            continue;
        }
        const int ret =
            src_read(cv, buf + (ext[i].off - off), ext[i].len, ext[i].off);
        if (ret < 0) {
            conv_fail(cv, "reading", ext[i].off, cv->src, ret);
            return -1;
        }
    }
    return n;
}

static int write_data(struct conv *cv, const uint8_t *p, uint64_t len,
                      uint64_t off)
{
    const int ret = qsnap_pwrite(cv->dst, p, len, off);
    if (ret < 0) {
        conv_fail(cv, "writing", off, cv->dst, ret);
        return -1;
    }
    return 0;
}

/* Writes a data extent, skipping zero granules unless -S 0 was given. */
static int write_extent(struct conv *cv, const uint8_t *buf, uint64_t off,
                        uint64_t len)
{
    const uint64_t g = cv->granule;
    uint64_t run_start = off;
    uint64_t run_len = 0;

    if (g == 0) {
        return write_data(cv, buf, len, off);
    }
    uint64_t pos = off;
    while (pos < off + len) {
        /* Granules are aligned to guest offsets. */
        uint64_t piece = g - pos % g;
        if (piece > off + len - pos) {
            piece = off + len - pos;
        }
        if (qi_is_zero(buf + (pos - off), piece)) {
            if (run_len && write_data(cv, buf + (run_start - off), run_len,
                                      run_start) < 0) {
                return -1;
            }
            run_len = 0;
        } else {
            if (!run_len) {
                run_start = pos;
            }
            run_len += piece;
        }
        pos += piece;
    }
    if (run_len) {
        return write_data(cv, buf + (run_start - off), run_len, run_start);
    }
    return 0;
}

/* Writes a data extent as compressed clusters (zero clusters skipped). */
static int write_compressed(struct conv *cv, const uint8_t *buf, uint64_t off,
                            uint64_t len)
{
    const uint64_t cs = cv->cluster;
    for (uint64_t pos = off; pos < off + len;) {
        uint64_t piece = cs - pos % cs;
        if (piece > cv->size - pos) {
            piece = cv->size - pos;
        }
        const uint8_t *p = buf + (pos - off);
        if (!qi_is_zero(p, piece)) {
            const int ret = qsnap_write_compressed(cv->dst, p, piece, pos);
            if (ret < 0) {
                conv_fail(cv, "writing", pos, cv->dst, ret);
                return -1;
            }
        }
        pos += piece;
    }
    return 0;
}

static int write_chunk(struct conv *cv, uint8_t *buf, uint64_t off,
                       uint64_t len, const struct extent *ext, int n)
{
    if (cv->compress) {
        /* Compressed clusters are written whole: fill in the zeros. */
        if (n == 1 && ext[0].zero) {
            return 0;
        }
        for (int i = 0; i < n; i++) {
            if (ext[i].zero) {
                memset(buf + (ext[i].off - off), 0, ext[i].len);
            }
        }
        return write_compressed(cv, buf, off, len);
    }
    for (int i = 0; i < n; i++) {
        uint8_t *p = buf + (ext[i].off - off);
        int ret;
        if (ext[i].zero) {
            if (cv->granule != 0) {
                continue; /* the new image reads as zeros already */
            }
            /* -S 0: allocate it anyway. */
            memset(p, 0, ext[i].len);
            ret = write_data(cv, p, ext[i].len, ext[i].off);
        } else {
            ret = write_extent(cv, p, ext[i].off, ext[i].len);
        }
        if (ret < 0) {
            return -1;
        }
    }
    return 0;
}

#define MAX_EXTENTS 256

static void *worker(void *opaque)
{
    struct conv *cv = opaque;
    struct extent ext[MAX_EXTENTS];
    uint8_t *buf = qi_alloc_buf(CHUNK);

    if (!buf) {
        conv_fail(cv, "allocating a buffer", 0, cv->src, -ENOMEM);
        return NULL;
    }
    for (;;) {
        pthread_mutex_lock(&cv->lock);
        if (cv->failed || cv->next_chunk >= cv->n_chunks) {
            pthread_mutex_unlock(&cv->lock);
            break;
        }
        const uint64_t idx = cv->next_chunk++;
        pthread_mutex_unlock(&cv->lock);

        const uint64_t off = idx * CHUNK;
        const uint64_t len = cv->size - off < CHUNK ? cv->size - off : CHUNK;
        const int n = read_chunk(cv, buf, off, len, ext, MAX_EXTENTS);
        if (n < 0) {
            break;
        }
        if (cv->in_order) {
            pthread_mutex_lock(&cv->lock);
            while (!cv->failed && cv->next_write != idx) {
                pthread_cond_wait(&cv->cond, &cv->lock);
            }
            const bool stop = cv->failed;
            pthread_mutex_unlock(&cv->lock);
            if (stop) {
                break;
            }
        }
        const int ret = write_chunk(cv, buf, off, len, ext, n);
        if (cv->in_order) {
            pthread_mutex_lock(&cv->lock);
            cv->next_write++;
            pthread_cond_broadcast(&cv->cond);
            pthread_mutex_unlock(&cv->lock);
        }
        if (ret < 0) {
            break;
        }
        qi_progress_print((float)len * 100.0f / (float)cv->size, 100);
    }
    free(buf);
    return NULL;
}

/* The snapshot the source is to be read from (-l, -s). */
struct snap_sel {
    struct qi_opts param; /* -l snapshot.id=...,snapshot.name=... */
    const char *param_str;
    const char *id_or_name; /* -l ID_OR_NAME, -s NAME */
};

/* Takes a -l argument; prints qemu-img's messages for a bad one. */
static int snap_sel_add(struct snap_sel *sel, const char *arg)
{
    static const char prefix[] = "snapshot.";
    if (strncmp(arg, prefix, sizeof(prefix) - 1) != 0) {
        sel->id_or_name = arg;
        return 0;
    }
    qi_opts_free(&sel->param);
    sel->param_str = arg;
    int ret = qi_opts_parse(&sel->param, arg);
    for (size_t i = 0; ret == 0 && i < sel->param.n; i++) {
        const char *key = sel->param.v[i].key;
        if (strcmp(key, "snapshot.id") != 0 &&
            strcmp(key, "snapshot.name") != 0) {
            qi_error("Invalid parameter '%s'", key);
            ret = -EINVAL;
        }
    }
    if (ret < 0) {
        qi_error("Failed in parsing snapshot param '%s'", arg);
    }
    return ret;
}

/*
 * Opens the view of the selected snapshot of SRC (if one was selected),
 * matching as qemu-img does: both an ID and a name given with -l must
 * match the same snapshot; a bare ID_OR_NAME matches an ID first.
 */
static int snap_sel_open(const struct snap_sel *sel, qsnap_image *src,
                         const char *filename, qsnap_view **view)
{
    struct qsnap_snapshot_info *list;
    uint32_t n;
    int i;

    *view = NULL;
    if (!sel->param_str && !sel->id_or_name) {
        return 0;
    }
    if (qi_snapshot_list(src, filename, &list, &n) < 0) {
        return -1;
    }
    if (sel->param_str) {
        i = qi_snapshot_find(list, n, qi_opts_get(&sel->param, "snapshot.id"),
                             qi_opts_get(&sel->param, "snapshot.name"));
    } else {
        i = qi_snapshot_find_id_or_name(list, n, sel->id_or_name);
    }
    int ret = -1;
    if (i < 0) {
        qi_error("Failed to load snapshot: Can't find snapshot '%s'",
                 sel->param_str ? sel->param_str : sel->id_or_name);
    } else {
        ret = qsnap_view_open(src, list[i].id, view);
        if (ret < 0) {
            *view = NULL;
            qi_error("Failed to load snapshot: %s",
                     qi_strip_path(qi_errmsg(src, ret), filename));
        }
    }
    qsnap_snapshot_list_free(list, n);
    return ret < 0 ? -1 : 0;
}

static int run_copy(struct conv *cv, int n_threads)
{
    pthread_t tids[MAX_THREADS];
    int started = 0;

    pthread_mutex_init(&cv->lock, NULL);
    pthread_cond_init(&cv->cond, NULL);
    if ((uint64_t)n_threads > cv->n_chunks) {
        n_threads = cv->n_chunks ? (int)cv->n_chunks : 1;
    }
    for (int i = 0; i < n_threads; i++) {
        if (pthread_create(&tids[i], NULL, worker, cv) != 0) {
            break;
        }
        started++;
    }
    if (started == 0) {
        /* No thread could start: do the work here. */
        worker(cv);
    }
    for (int i = 0; i < started; i++) {
        pthread_join(tids[i], NULL);
    }
    pthread_cond_destroy(&cv->cond);
    pthread_mutex_destroy(&cv->lock);
    return cv->failed ? -1 : 0;
}

int qi_cmd_convert(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    const char *out_fmt = "raw";
    bool compress = false;
    bool progress = false;
    bool quiet = false;
    bool out_of_order = false;
    unsigned src_flags = 0;
    uint64_t sparse = DEFAULT_SPARSE;
    uint64_t n_threads = 2;
    struct qi_opts list = {0};
    struct qi_create_spec spec;
    struct snap_sel sel = {0};
    qsnap_image *src = NULL;
    qsnap_view *view = NULL;
    qsnap_image *dst = NULL;
    int status = 1;
    int c;

    memset(&spec, 0, sizeof(spec));
    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "hf:O:o:cpqUS:m:Wl:s:",
                            long_opts, NULL)) != -1) {
        switch (c) {
        case 'h':
            qi_help();
        case 'f':
            fmt = optarg;
            break;
        case 'O':
            out_fmt = optarg;
            break;
        case 'o':
            if (qi_opts_add_arg(&list, optarg) < 0) {
                goto out;
            }
            break;
        case 'c':
            compress = true;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case 'U':
            src_flags |= QSNAP_OPEN_FORCE_SHARE;
            break;
        case 'S':
            if (qi_parse_size(optarg, &sparse) < 0 || sparse % 512 != 0 ||
                sparse > MAX_SPARSE) {
                qi_error("Invalid buffer size for sparse output specified. "
                         "Valid sizes are multiples of 512 up to %u. Select "
                         "0 to disable sparse detection (fully allocates "
                         "output).",
                         MAX_SPARSE);
                goto out;
            }
            break;
        case 'm':
            if (qi_parse_uint(optarg, &n_threads) < 0 || n_threads < 1 ||
                n_threads > MAX_THREADS) {
                qi_error("Invalid number of threads. Allowed number of "
                         "threads is between 1 and %d",
                         MAX_THREADS);
                goto out;
            }
            break;
        case 'W':
            out_of_order = true;
            break;
        case 'l':
            if (snap_sel_add(&sel, optarg) < 0) {
                goto out;
            }
            break;
        case 's':
            sel.id_or_name = optarg;
            break;
        default:
            status = qi_getopt_error(c, argv);
            goto out;
        }
    }
    if (quiet) {
        progress = false;
    }
    if (qi_create_spec_init(&spec, out_fmt, NULL, &list) < 0) {
        goto out;
    }
    if (qi_opts_has_help(&spec.list)) {
        qi_create_spec_help(&spec);
        status = 0;
        goto out;
    }
    if (argc - optind < 2) {
        qi_error("Must specify image file name");
        goto out;
    }
    if (argc - optind > 2) {
        status = qi_usage_error("Expecting one source image and one output "
                                "image");
        goto out;
    }
    const char *src_name = argv[optind];
    const char *dst_name = argv[optind + 1];
    if (compress && spec.opts.format != QSNAP_FMT_QCOW2) {
        qi_error("Compression not supported for this file format");
        goto out;
    }

    struct qsnap_info info;
    if (qi_open(src_name, fmt, src_flags, &src) < 0 ||
        qi_get_info(src, &info) < 0 ||
        snap_sel_open(&sel, src, src_name, &view) < 0) {
        goto out;
    }
    const uint64_t size = info.virtual_size;
    if (qi_create_spec_parse(&spec, dst_name) < 0 ||
        qi_create_spec_check(&spec, dst_name) < 0) {
        goto out;
    }
    if (spec.opts.backing_file) {
        qi_error_file(dst_name,
                      "error while converting %s: converting to "
                      "an image with a backing file is not "
                      "supported",
                      out_fmt);
        goto out;
    }
    spec.opts.size = size;

    char err[1024] = "";
    int ret = qsnap_create(dst_name, &spec.opts, err, sizeof(err));
    if (ret < 0) {
        qi_error_file(dst_name, "error while converting %s: %s", out_fmt,
                      err[0] ? qi_strip_path(err, dst_name)
                             : qsnap_strerror(ret));
        goto out;
    }
    if (qi_open(dst_name, out_fmt, QSNAP_OPEN_RDWR, &dst) < 0) {
        goto out;
    }
    struct qsnap_info dinfo;
    if (qi_get_info(dst, &dinfo) < 0) {
        goto out;
    }

    struct conv cv = {
        .src = src,
        .view = view,
        .view_size = view ? qsnap_view_size(view) : 0,
        .dst = dst,
        .size = size,
        .n_chunks = (size + CHUNK - 1) / CHUNK,
        .granule = sparse,
        .cluster = dinfo.cluster_size,
        .compress = compress,
        .in_order = !out_of_order && !compress,
    };
    /* A qcow2 output allocates whole clusters: detect zeros per cluster. */
    if (sparse && dinfo.format == QSNAP_FMT_QCOW2 &&
        cv.granule < dinfo.cluster_size) {
        cv.granule = dinfo.cluster_size;
    }

    qi_progress_start(progress);
    ret = run_copy(&cv, (int)n_threads);
    qi_progress_done(ret == 0);
    if (ret < 0) {
        goto out;
    }
    ret = qsnap_close(dst);
    dst = NULL;
    if (ret < 0) {
        qi_error("error while writing %s: %s", dst_name, qsnap_strerror(ret));
        goto out;
    }
    status = 0;
out:
    if (dst) {
        qsnap_close(dst);
    }
    if (view) {
        qsnap_view_close(view);
    }
    if (src) {
        qsnap_close(src);
    }
    qi_opts_free(&sel.param);
    qi_opts_free(&list);
    qi_create_spec_free(&spec);
    return status;
}
