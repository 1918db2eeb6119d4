/*
 * image.c - the public API: open, create, close, guest I/O, information.
 *
 * Invariants:
 *   1. Every public entry point checks its arguments and the handle's
 *      state (read-only, corrupt) before touching the image.
 *   2. Guest reads run under img->lock shared; writes drop it while their
 *      data goes to disk (cluster.c); everything else runs under it
 *      exclusively (see qs_int.h).
 *   3. qsnap_close() leaves the image clean: metadata synced, freed
 *      clusters' refcounts written, the dirty bit cleared.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qs_int.h"

#define QS_MAX_CHAIN_DEPTH 64
#define QS_DEFAULT_CACHE (32u << 20)

/* ------------------------------------------------------------ helpers */

/*
 * I/O buffers are page-aligned, which O_DIRECT needs.  From 1 MiB up they
 * are rounded up to whole 2 MiB pieces, aligned to 2 MiB and offered to
 * transparent huge pages: a request's memory is then physically
 * contiguous and reaches the disk as a few segments instead of one per
 * 4 KiB page, which on a device with a small segment limit (virtio-blk:
 * 254) is the difference between one request and two for every 1 MiB
 * transfer.  At most half of such a buffer is slack.
 */
#define QS_HUGE_ALIGN (2u << 20)
#define QS_HUGE_MIN (1u << 20)

void *qs_alloc_buf(size_t len)
{
    const bool huge = len >= QS_HUGE_MIN && len <= SIZE_MAX - QS_HUGE_ALIGN;
    const size_t size =
        huge ? (len + QS_HUGE_ALIGN - 1) & ~(size_t)(QS_HUGE_ALIGN - 1)
             : (len ? len : 1);
    void *p = NULL;
    if (posix_memalign(&p, huge ? QS_HUGE_ALIGN : 4096, size) != 0) {
        return NULL;
    }
#ifdef MADV_HUGEPAGE
    if (huge) {
        /* Advice only: without huge pages the buffer works the same. */
        madvise(p, size, MADV_HUGEPAGE);
    }
#endif
    return p;
}

QSNAP_API void *qsnap_alloc_buf(size_t len)
{
    return qs_alloc_buf(len);
}

QSNAP_API void qsnap_free_buf(void *buf)
{
    free(buf);
}

int qs_host_read(struct qsnap_image *img, void *buf, size_t len,
                 uint64_t host_off)
{
    return qs_io_pread(img->io, buf, len, host_off);
}

int qs_host_writev(struct qsnap_image *img, const struct iovec *iov, int n,
                   uint64_t host_off, unsigned wflags)
{
    uint64_t len = 0;
    for (int i = 0; i < n; i++) {
        len += iov[i].iov_len;
    }
    int ret = (wflags & QS_WRITE_BULK)
                  ? qs_io_pwritev_bulk(img->io, iov, n, host_off)
                  : qs_io_pwritev(img->io, iov, n, host_off);
    if (ret == 0 && host_off + len > img->file_size) {
        img->file_size = host_off + len;
    }
    /* Written space past the allocator's cursor (a new refcount table)
     * leaves the zero window; under the exclusive lock, as any write
     * there is. */
    if (host_off + len > img->zero_lo && host_off < img->zero_hi) {
        img->zero_lo = host_off + len;
    }
    return ret;
}

int qs_host_write(struct qsnap_image *img, const void *buf, size_t len,
                  uint64_t host_off)
{
    struct iovec v = {(void *)buf, len};
    return qs_host_writev(img, &v, 1, host_off, 0);
}

int qs_header_write(struct qsnap_image *img)
{
    uint8_t *buf = qs_alloc_buf(img->cluster_size);
    if (!buf) {
        return -ENOMEM;
    }
    int ret = qs_header_encode(&img->hdr, buf, img->cluster_size);
    if (ret < 0) {
        free(buf);
        return qs_error(img, ret,
                        "%s: the header, its extensions and the backing "
                        "file name do not fit in one cluster (%" PRIu64
                        " bytes)",
                        img->filename, img->cluster_size);
    }
    /* Write the used part only: one small write, the rest stays as is. */
    const size_t used = ((size_t)ret + 511) & ~(size_t)511;
    ret = qs_host_write(img, buf, QS_MIN(used, img->cluster_size), 0);
    free(buf);
    if (ret < 0) {
        return qs_error(img, ret, "%s: writing the header: %s", img->filename,
                        qsnap_strerror(ret));
    }
    return 0;
}

int qs_header_write_field(struct qsnap_image *img, uint32_t off,
                          const void *data, size_t len)
{
    int ret = qs_host_write(img, data, len, off);
    if (ret < 0) {
        return qs_error(img, ret, "%s: writing header bytes %u..%zu: %s",
                        img->filename, off, off + len - 1, qsnap_strerror(ret));
    }
    return 0;
}

int qs_header_switch(struct qsnap_image *img, uint32_t off, const void *data,
                     size_t len)
{
    int ret = qs_header_write_field(img, off, data, len);
    if (ret == 0) {
        ret = qs_io_flush(img->io);
        if (ret < 0) {
            ret = qs_switch_failed(img, ret, off, len);
        }
    }
    return ret;
}

int qs_switch_failed(struct qsnap_image *img, int err, uint32_t off, size_t len)
{
    img->corrupt = true;
    img->switch_failed = true;
    return qs_error(img, err,
                    "%s: flushing header bytes %u..%zu after writing them "
                    "failed (%s); no further writes until the image is "
                    "reopened",
                    img->filename, off, off + len - 1, qsnap_strerror(err));
}

const char *qs_stop_reason(const struct qsnap_image *img)
{
    return img->switch_failed ? "a header update could not be flushed"
                              : "metadata corruption was detected";
}

static int check_range(struct qsnap_image *img, uint64_t off, uint64_t len)
{
    if (off > img->virtual_size || len > img->virtual_size - off) {
        return qs_error(img, -EINVAL,
                        "%s: request at offset %" PRIu64 " length %" PRIu64
                        " is beyond the virtual size %" PRIu64,
                        img->filename, off, len, img->virtual_size);
    }
    return 0;
}

static int check_writable(struct qsnap_image *img)
{
    if (!img->rw) {
        return qs_error(img, -EROFS, "%s: image is open read-only",
                        img->filename);
    }
    if (img->corrupt) {
        return qs_error(img, -EROFS, "%s: %s; no further writes (%s)",
                        img->filename, qs_stop_reason(img),
                        img->switch_failed ? "reopen the image"
                                           : "run check -r all");
    }
    return 0;
}

/* ------------------------------------------------------------ open */

QSNAP_API void qsnap_open_opts_init(struct qsnap_open_opts *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->struct_size = sizeof(*opts);
    opts->format = QSNAP_FMT_AUTO;
}

static void image_free(struct qsnap_image *img)
{
    if (!img) {
        return;
    }
    if (img->backing) {
        qsnap_close(img->backing);
    }
    qs_cache_free(img->l2_cache);
    qs_cache_free(img->rb_cache);
    qs_snapshot_table_free(img);
    qs_header_free(&img->hdr);
    qs_io_close(img->io);
    free(img->l1);
    free(img->rt);
    free(img->pending);
    free(img->filename);
    pthread_rwlock_destroy(&img->lock);
    pthread_mutex_destroy(&img->job_mtx);
    pthread_cond_destroy(&img->job_cond);
    pthread_mutex_destroy(&img->meta_mtx);
    pthread_mutex_destroy(&img->err_mtx);
    free(img);
}

static int load_l1(struct qsnap_image *img)
{
    const uint32_t n = img->hdr.l1_size;
    img->l1_size = n;
    img->l1 = calloc(n ? n : 1, sizeof(*img->l1));
    if (!img->l1) {
        return -ENOMEM;
    }
    if (!n) {
        return 0;
    }
    int ret =
        qs_host_read(img, img->l1, (size_t)n * 8, img->hdr.l1_table_offset);
    if (ret < 0) {
        return qs_error(img, ret, "%s: reading the L1 table: %s", img->filename,
                        qsnap_strerror(ret));
    }
    for (uint32_t i = 0; i < n; i++) {
        img->l1[i] = qs_be64_load(&img->l1[i]);
    }
    return 0;
}

static int make_caches(struct qsnap_image *img, uint64_t cache_size)
{
    const uint64_t cs = img->cluster_size;
    const uint64_t span = cs << img->l2_bits;
    uint64_t n_l2, n_rb;

    if (cache_size) {
        n_l2 = cache_size / 4 * 3 / cs;
        n_rb = cache_size / 4 / cs;
    } else {
        /* Enough L2 tables to map the whole disk, within 32 MiB. */
        n_l2 = QS_DIV_ROUND_UP(img->virtual_size, span) + 4;
        n_l2 = QS_MIN(n_l2, QS_MAX(QS_DEFAULT_CACHE / cs, 16));
        n_rb = QS_MAX(n_l2 / 4, 16);
    }
    n_l2 = QS_MAX(n_l2, 8);
    n_rb = QS_MAX(n_rb, 8);
    img->l2_cache = qs_cache_new(img, (size_t)n_l2, "L2 table");
    img->rb_cache = qs_cache_new(img, (size_t)n_rb, "refcount block");
    if (!img->l2_cache || !img->rb_cache) {
        return -ENOMEM;
    }
    qs_cache_set_dependency(img->l2_cache, img->rb_cache);
    return 0;
}

static void derive_geometry(struct qsnap_image *img)
{
    const struct qs_header *h = &img->hdr;
    img->cluster_bits = h->cluster_bits;
    img->cluster_size = 1ull << h->cluster_bits;
    img->ext_l2 = h->incompat & QS_INCOMPAT_EXTL2;
    img->l2_bits = h->cluster_bits - (img->ext_l2 ? 4 : 3);
    img->l2_entries = 1ull << img->l2_bits;
    img->sc_bits = h->cluster_bits - 5;
    img->refcount_order = h->refcount_order;
    img->rb_bits = h->cluster_bits + 3 - h->refcount_order;
    img->refcount_max = h->refcount_order == 6
                            ? UINT64_MAX
                            : (1ull << (1u << h->refcount_order)) - 1;
    img->csize_shift = 62 - (h->cluster_bits - 8);
    img->csize_mask = (1ull << (h->cluster_bits - 8)) - 1;
    img->coffset_mask = (1ull << img->csize_shift) - 1;
    img->virtual_size = h->size;
}

/* Chain bookkeeping so a backing loop is found by device and inode. */
struct chain_seen {
    dev_t dev[QS_MAX_CHAIN_DEPTH + 1];
    ino_t ino[QS_MAX_CHAIN_DEPTH + 1];
    int n;
};

static int open_internal(const char *path, const struct qsnap_open_opts *o,
                         struct chain_seen *seen, qs_io *io, bool *consumed,
                         qsnap_image **out, char *err, size_t errlen);

static int open_backing(struct qsnap_image *img,
                        const struct qsnap_open_opts *o,
                        struct chain_seen *seen, char *err, size_t errlen)
{
    const char *name = img->hdr.backing_file;
    char path[PATH_MAX];

    /* Relative names are relative to the overlay's directory, as QEMU. */
    if (qs_backing_path(img, name, path, sizeof(path)) < 0) {
        qs_fmt_err(err, errlen, "%s: backing file name '%s' is too long",
                   img->filename, name);
        return -ENAMETOOLONG;
    }
    if (seen->n >= QS_MAX_CHAIN_DEPTH) {
        qs_fmt_err(err, errlen,
                   "%s: backing chain deeper than %d images (next: %s)",
                   img->filename, QS_MAX_CHAIN_DEPTH, path);
        return -ELOOP;
    }
    struct qsnap_open_opts bo = *o;
    bo.flags = (o->flags & ~(unsigned)QSNAP_OPEN_RDWR) | QSNAP_OPEN_FORCE_SHARE;
    bo.flags &= ~(unsigned)QSNAP_OPEN_CHECK;
    bo.flags |= QS_OPEN_BACKING;
    bo.format = QSNAP_FMT_AUTO;
    if (strcmp(img->hdr.backing_fmt, "raw") == 0) {
        bo.format = QSNAP_FMT_RAW;
    } else if (strcmp(img->hdr.backing_fmt, "qcow2") == 0) {
        bo.format = QSNAP_FMT_QCOW2;
    } else if (img->hdr.backing_fmt[0]) {
        qs_fmt_err(err, errlen, "%s: unsupported backing format '%s'",
                   img->filename, img->hdr.backing_fmt);
        return -ENOTSUP;
    }
    char sub[1024];
    int ret = open_internal(path, &bo, seen, NULL, NULL, &img->backing, sub,
                            sizeof(sub));
    if (ret < 0) {
        qs_fmt_err(err, errlen, "%s: backing file: %s", img->filename, sub);
    }
    return ret;
}

int qs_backing_path(const struct qsnap_image *img, const char *name,
                    char *path, size_t len)
{
    int n;
    if (name[0] == '/') {
        n = snprintf(path, len, "%s", name);
    } else {
        const char *slash = strrchr(img->filename, '/');
        n = slash ? snprintf(path, len, "%.*s/%s",
                             (int)(slash - img->filename), img->filename, name)
                  : snprintf(path, len, "%s", name);
    }
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

int qs_reopen_backing(struct qsnap_image *img)
{
    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    o.cache_size = img->cache_size;
    o.flags = img->open_flags & QSNAP_OPEN_NOCACHE;
    if (img->backing) {
        qsnap_close(img->backing);
        img->backing = NULL;
    }
    if (!img->hdr.backing_file[0]) {
        return 0;
    }
    struct chain_seen seen = {.n = 0};
    struct stat st;
    if (stat(img->filename, &st) == 0) {
        seen.dev[0] = st.st_dev;
        seen.ino[0] = st.st_ino;
        seen.n = 1;
    }
    char err[1024];
    int ret = open_backing(img, &o, &seen, err, sizeof(err));
    if (ret < 0) {
        qs_error(img, ret, "%s", err);
    }
    return ret;
}

static int open_qcow2(struct qsnap_image *img, const struct qsnap_open_opts *o,
                      struct chain_seen *seen, char *err, size_t errlen)
{
    uint8_t probe[QS_V3_HEADER_LEN];
    const size_t plen = (size_t)QS_MIN(img->file_size, sizeof(probe));
    int ret = qs_host_read(img, probe, plen, 0);
    if (ret < 0) {
        qs_fmt_err(err, errlen, "%s: reading the header: %s", img->filename,
                   qsnap_strerror(ret));
        return ret;
    }
    uint32_t bits = plen >= 24 ? qs_be32_load(probe + 20) : 0;
    if (bits < QS_MIN_CLUSTER_BITS || bits > QS_MAX_CLUSTER_BITS) {
        bits = QS_MIN_CLUSTER_BITS; /* decode reports the bad field */
    }
    const size_t hlen = (size_t)QS_MIN(img->file_size, 1ull << bits);
    uint8_t *hbuf = qs_alloc_buf(hlen);
    if (!hbuf) {
        return -ENOMEM;
    }
    ret = qs_host_read(img, hbuf, hlen, 0);
    if (ret == 0) {
        ret = qs_header_decode(hbuf, hlen, img->file_size, img->filename,
                               &img->hdr, err, errlen);
    }
    free(hbuf);
    if (ret < 0) {
        return ret;
    }
    derive_geometry(img);

    const bool check_mode = o->flags & QSNAP_OPEN_CHECK;
    if (img->rw && img->ext_l2) {
        qs_fmt_err(err, errlen,
                   "%s: images with extended L2 entries can only be opened "
                   "read-only",
                   img->filename);
        return -ENOTSUP;
    }
    if (img->rw && (img->hdr.incompat & QS_INCOMPAT_CORRUPT) && !check_mode) {
        qs_fmt_err(err, errlen,
                   "%s: image is marked corrupt (incompatible_features bit "
                   "1); open it read-only, or repair it with check -r all",
                   img->filename);
        return -EROFS;
    }
    if ((ret = load_l1(img)) < 0 ||
        (ret = make_caches(img, o->cache_size)) < 0 ||
        (ret = qs_refcount_init(img)) < 0 ||
        (ret = qs_snapshot_table_load(img)) < 0) {
        qs_fmt_err(err, errlen, "%s",
                   img->errmsg[0] ? img->errmsg : qsnap_strerror(ret));
        return ret;
    }

    if (img->rw) {
        if ((img->hdr.incompat & QS_INCOMPAT_DIRTY) && !check_mode) {
            /* Refcounts may lag the L2 tables: recompute them first,
             * then the COPIED flags that follow from them. */
            ret = qs_rebuild_refcounts(img);
            if (ret == 0) {
                ret = qs_refresh_copied(img);
            }
            if (ret == 0) {
                ret = qs_meta_sync(img);
            }
            if (ret == 0) {
                ret = qs_dirty_bit_write(img, false);
            }
            if (ret < 0) {
                qs_fmt_err(err, errlen, "%s", img->errmsg);
                return ret;
            }
        }
        if (!check_mode) {
            /* A checkpoint interrupted before its commit left state in
             * the live disk's VM state area: nothing refers to it. */
            ret = qs_vmstate_drop(img);
            if (ret < 0) {
                qs_fmt_err(err, errlen, "%s", img->errmsg);
                return ret;
            }
        }
        if (img->hdr.autoclear) {
            /* We maintain none of the autoclear features (spec). */
            uint8_t f[8] = {0};
            img->hdr.autoclear = 0;
            ret = qs_header_switch(img, QS_HDR_OFF_AUTOCLEAR, f, 8);
            if (ret < 0) {
                qs_fmt_err(err, errlen, "%s", img->errmsg);
                return ret;
            }
        }
    }
    if (img->hdr.backing_file[0] && !(o->flags & QSNAP_OPEN_NO_BACKING)) {
        ret = open_backing(img, o, seen, err, errlen);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

static int open_internal(const char *path, const struct qsnap_open_opts *o,
                         struct chain_seen *seen, qs_io *io, bool *consumed,
                         qsnap_image **out, char *err, size_t errlen)
{
    const bool rw = o->flags & QSNAP_OPEN_RDWR;
    struct stat st;

    if (rw && (o->flags & QSNAP_OPEN_FORCE_SHARE)) {
        qs_fmt_err(err, errlen,
                   "%s: force-share can only be used with read-only opens",
                   path);
        return -EINVAL;
    }
    if (!io && stat(path, &st) == 0) {
        for (int i = 0; i < seen->n; i++) {
            if (seen->dev[i] == st.st_dev && seen->ino[i] == st.st_ino) {
                qs_fmt_err(err, errlen,
                           "%s: backing chain loop: this file is already "
                           "in the chain",
                           path);
                return -ELOOP;
            }
        }
        seen->dev[seen->n] = st.st_dev;
        seen->ino[seen->n] = st.st_ino;
        seen->n++;
    }

    struct qsnap_image *img = calloc(1, sizeof(*img));
    if (!img) {
        return -ENOMEM;
    }
    if (consumed) {
        *consumed = true; /* from here the image owns io */
    }
    pthread_rwlock_init(&img->lock, NULL);
    pthread_mutex_init(&img->job_mtx, NULL);
    pthread_cond_init(&img->job_cond, NULL);
    pthread_mutex_init(&img->meta_mtx, NULL);
    pthread_mutex_init(&img->err_mtx, NULL);
    img->open_flags = o->flags;
    img->cache_size = o->cache_size;
    img->rw = rw;
    img->io = io;
    img->filename = strdup(path);
    if (!img->filename) {
        image_free(img);
        return -ENOMEM;
    }

    unsigned ioflags = 0;
    if (rw) {
        ioflags |= QS_IO_RDWR;
    }
    if (o->flags & QSNAP_OPEN_FORCE_SHARE) {
        ioflags |= QS_IO_NOLOCK;
    }
    if (o->flags & QSNAP_OPEN_NOCACHE) {
        ioflags |= QS_IO_DIRECT;
    }
    if (o->flags & QS_OPEN_BACKING) {
        ioflags |= QS_IO_REGULAR; /* never a FIFO or a device */
    }
    int ret = 0;
    if (!img->io) {
        ret = qs_io_open_posix(path, ioflags, &img->io, err, errlen);
    }
    if (ret == 0) {
        ret = qs_io_size(img->io, &img->file_size);
    }
    if (ret < 0) {
        image_free(img);
        return ret;
    }

    int fmt = o->format;
    if (fmt == QSNAP_FMT_AUTO) {
        uint8_t magic[4] = {0};
        if (img->file_size >= 4) {
            ret = qs_host_read(img, magic, 4, 0);
        }
        fmt = ret == 0 && qs_be32_load(magic) == QS_MAGIC ? QSNAP_FMT_QCOW2
                                                          : QSNAP_FMT_RAW;
    }
    img->format = fmt;
    if (fmt == QSNAP_FMT_RAW) {
        img->virtual_size = img->file_size;
    } else {
        ret = open_qcow2(img, o, seen, err, errlen);
    }
    if (ret < 0) {
        image_free(img);
        return ret;
    }
    *out = img;
    return 0;
}

static int open_public(const char *path, const struct qsnap_open_opts *opts,
                       qs_io *io, bool *consumed, qsnap_image **out, char *err,
                       size_t errlen)
{
    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    if (!path || !out) {
        qs_fmt_err(err, errlen, "qsnap_open: path and out are required");
        return -EINVAL;
    }
    if (opts) {
        if (opts->struct_size < offsetof(struct qsnap_open_opts, format)) {
            qs_fmt_err(err, errlen, "%s: bad qsnap_open_opts struct_size %zu",
                       path, opts->struct_size);
            return -EINVAL;
        }
        memcpy(&o, opts, QS_MIN(opts->struct_size, sizeof(o)));
        o.struct_size = sizeof(o);
    }
    if (o.format < QSNAP_FMT_AUTO || o.format > QSNAP_FMT_RAW) {
        qs_fmt_err(err, errlen, "%s: unknown format %d", path, o.format);
        return -EINVAL;
    }
    struct chain_seen seen = {.n = 0};
    return open_internal(path, &o, &seen, io, consumed, out, err, errlen);
}

QSNAP_API int qsnap_open(const char *path, const struct qsnap_open_opts *opts,
                         qsnap_image **out, char *err, size_t errlen)
{
    return open_public(path, opts, NULL, NULL, out, err, errlen);
}

int qs_open_io(const char *name, qs_io *io, const struct qsnap_open_opts *o,
               qsnap_image **out, char *err, size_t errlen)
{
    bool consumed = false;
    int ret = open_public(name, o, io, &consumed, out, err, errlen);
    if (ret < 0 && !consumed) {
        qs_io_close(io); /* refused before an image took it over */
    }
    return ret;
}

QSNAP_API int qsnap_close(qsnap_image *img)
{
    int ret = 0;
    if (!img) {
        return 0;
    }
    /* An open checkpoint's threads may still be writing into the image. */
    const int aborted = img->ckpt ? qsnap_checkpoint_abort(img->ckpt) : 0;
    if (img->format == QSNAP_FMT_QCOW2 && img->rw && !img->corrupt) {
        /* Sync, release freed clusters and the reserved tail, write the
         * refcounts too. */
        ret = qs_meta_sync(img);
        if (ret == 0) {
            ret = qs_refcount_drain(img);
        }
        if (ret == 0) {
            ret = qs_reserve_release(img);
        }
        if (ret == 0) {
            ret = qs_meta_sync(img);
        }
        if (ret == 0 && img->dirty_marked) {
            ret = qs_dirty_bit_write(img, false);
        }
    } else if (img->rw) {
        ret = qs_io_flush(img->io);
    }
    image_free(img);
    return ret < 0 ? ret : aborted;
}

/* ------------------------------------------------------------ create */

QSNAP_API void qsnap_create_opts_init(struct qsnap_create_opts *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->struct_size = sizeof(*opts);
    opts->format = QSNAP_FMT_QCOW2;
    opts->cluster_size = 65536;
    opts->version = 3;
    opts->refcount_bits = 16;
    opts->compression_type = QSNAP_COMPRESSION_ZLIB;
    opts->prealloc = QSNAP_PREALLOC_OFF;
}

static int validate_create(const char *path, const struct qsnap_create_opts *o,
                           char *err, size_t errlen)
{
    const uint32_t cs = o->cluster_size;
    if (o->format != QSNAP_FMT_QCOW2 && o->format != QSNAP_FMT_RAW) {
        qs_fmt_err(err, errlen, "%s: unknown format %d", path, o->format);
        return -EINVAL;
    }
    if (o->prealloc < QSNAP_PREALLOC_OFF || o->prealloc > QSNAP_PREALLOC_FULL) {
        qs_fmt_err(err, errlen, "%s: unknown preallocation mode %d", path,
                   o->prealloc);
        return -EINVAL;
    }
    if (o->size > (uint64_t)INT64_MAX) {
        qs_fmt_err(err, errlen, "%s: size %" PRIu64 " is too large", path,
                   o->size);
        return -EINVAL;
    }
    if (o->format == QSNAP_FMT_RAW) {
        if (o->backing_file) {
            qs_fmt_err(err, errlen, "%s: raw images have no backing file",
                       path);
            return -EINVAL;
        }
        return 0;
    }
    if (cs < 512 || cs > (2u << 20) || (cs & (cs - 1))) {
        qs_fmt_err(err, errlen,
                   "%s: cluster_size %u must be a power of two between 512 "
                   "and 2097152",
                   path, cs);
        return -EINVAL;
    }
    if (o->version != 2 && o->version != 3) {
        qs_fmt_err(err, errlen, "%s: version %d (compat) must be 2 or 3", path,
                   o->version);
        return -EINVAL;
    }
    const int rb = o->refcount_bits;
    if (rb < 1 || rb > 64 || (rb & (rb - 1))) {
        qs_fmt_err(err, errlen,
                   "%s: refcount_bits %d must be a power of two up to 64", path,
                   rb);
        return -EINVAL;
    }
    if (o->version == 2 && rb != 16) {
        qs_fmt_err(err, errlen,
                   "%s: refcount_bits %d needs compat 1.1 (v2 has 16)", path,
                   rb);
        return -EINVAL;
    }
    if (o->version == 2 && o->lazy_refcounts) {
        qs_fmt_err(err, errlen, "%s: lazy_refcounts needs compat 1.1", path);
        return -EINVAL;
    }
    if (o->compression_type != QSNAP_COMPRESSION_ZLIB &&
        o->compression_type != QSNAP_COMPRESSION_ZSTD) {
        qs_fmt_err(err, errlen, "%s: unknown compression_type %d", path,
                   o->compression_type);
        return -EINVAL;
    }
    if (o->version == 2 && o->compression_type != QSNAP_COMPRESSION_ZLIB) {
        qs_fmt_err(err, errlen, "%s: compression_type zstd needs compat 1.1",
                   path);
        return -EINVAL;
    }
    if (o->backing_file && strlen(o->backing_file) > QS_MAX_BACKING_NAME) {
        qs_fmt_err(err, errlen,
                   "%s: backing file name is %zu bytes (at most %u)", path,
                   strlen(o->backing_file), QS_MAX_BACKING_NAME);
        return -EINVAL;
    }
    if (o->backing_fmt && strlen(o->backing_fmt) > QS_MAX_BACKING_FMT) {
        qs_fmt_err(err, errlen, "%s: backing format '%s' is too long", path,
                   o->backing_fmt);
        return -EINVAL;
    }
    return 0;
}

static int create_raw(const char *path, const struct qsnap_create_opts *o,
                      char *err, size_t errlen)
{
    qs_io *io;
    int ret =
        qs_io_open_posix(path, QS_IO_RDWR | QS_IO_CREATE, &io, err, errlen);
    if (ret < 0) {
        return ret;
    }
    ret = qs_io_truncate(io, o->size);
    if (ret == 0 && o->prealloc == QSNAP_PREALLOC_FALLOC && o->size) {
        ret = qs_io_falloc(io, 0, o->size);
    }
    if (ret == 0 && o->prealloc == QSNAP_PREALLOC_FULL) {
        static const uint8_t zeros[65536];
        for (uint64_t off = 0; off < o->size && ret == 0;
             off += sizeof(zeros)) {
            ret = qs_io_pwrite(
                io, zeros, (size_t)QS_MIN(sizeof(zeros), o->size - off), off);
        }
    }
    if (ret == 0) {
        ret = qs_io_flush(io);
    }
    qs_io_close(io);
    if (ret < 0) {
        qs_fmt_err(err, errlen, "%s: %s", path, qsnap_strerror(ret));
        unlink(path); /* ours since the open truncated it */
    }
    return ret;
}

/*
 * Writes an empty image of virtual size 0: header (cluster 0), refcount
 * table (cluster 1), one refcount block (cluster 2) counting those three.
 * The L1 table comes from the resize that follows, as in QEMU's layout.
 */
static int write_skeleton(const char *path, const struct qsnap_create_opts *o,
                          char *err, size_t errlen)
{
    const uint64_t cs = o->cluster_size;
    struct qs_header h;
    memset(&h, 0, sizeof(h));
    h.version = (uint32_t)o->version;
    h.cluster_bits = (uint32_t)__builtin_ctz(o->cluster_size);
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = 1;
    h.refcount_order = (uint32_t)__builtin_ctz((unsigned)o->refcount_bits);
    if (o->lazy_refcounts) {
        h.compat |= QS_COMPAT_LAZY_REFCOUNTS;
    }
    if (o->compression_type == QSNAP_COMPRESSION_ZSTD) {
        h.compression_type = 1;
        h.incompat |= QS_INCOMPAT_COMPRESSION;
    }
    if (o->backing_file) {
        snprintf(h.backing_file, sizeof(h.backing_file), "%s", o->backing_file);
    }
    if (o->backing_fmt) {
        snprintf(h.backing_fmt, sizeof(h.backing_fmt), "%s", o->backing_fmt);
    }

    uint8_t *buf = qs_alloc_buf(3 * cs);
    if (!buf) {
        return -ENOMEM;
    }
    memset(buf, 0, 3 * cs);
    int ret = qs_header_encode(&h, buf, cs);
    if (ret < 0) {
        free(buf);
        qs_fmt_err(err, errlen,
                   "%s: header and backing file name do not fit in a "
                   "cluster of %" PRIu64 " bytes",
                   path, cs);
        return -EINVAL;
    }
    qs_be64_store(buf + cs, 2 * cs); /* refcount table entry 0 */
    /* Encode refcount 1 for clusters 0..2 at the block's width. */
    uint8_t *blk = buf + 2 * cs;
    const uint32_t bits = 1u << h.refcount_order;
    for (uint32_t c = 0; c < 3; c++) {
        if (bits < 8) {
            blk[(c * bits) / 8] |= (uint8_t)(1u << ((c * bits) % 8));
        } else {
            blk[(c + 1) * (bits / 8) - 1] = 1; /* big-endian 1 */
        }
    }

    qs_io *io;
    ret = qs_io_open_posix(path, QS_IO_RDWR | QS_IO_CREATE, &io, err, errlen);
    if (ret < 0) {
        free(buf);
        return ret;
    }
    ret = qs_io_pwrite(io, buf, 3 * cs, 0);
    if (ret == 0) {
        ret = qs_io_flush(io);
    }
    qs_io_close(io);
    free(buf);
    if (ret < 0) {
        qs_fmt_err(err, errlen, "%s: writing the new image: %s", path,
                   qsnap_strerror(ret));
        unlink(path); /* ours since the open truncated it */
    }
    return ret;
}

static int finish_qcow2(const char *path, const struct qsnap_create_opts *o,
                        char *err, size_t errlen);

QSNAP_API int qsnap_create(const char *path,
                           const struct qsnap_create_opts *opts, char *err,
                           size_t errlen)
{
    struct qsnap_create_opts o;
    qsnap_create_opts_init(&o);
    if (!path || !opts) {
        qs_fmt_err(err, errlen, "qsnap_create: path and opts are required");
        return -EINVAL;
    }
    if (opts->struct_size < offsetof(struct qsnap_create_opts, cluster_size)) {
        qs_fmt_err(err, errlen, "%s: bad qsnap_create_opts struct_size %zu",
                   path, opts->struct_size);
        return -EINVAL;
    }
    memcpy(&o, opts, QS_MIN(opts->struct_size, sizeof(o)));
    o.struct_size = sizeof(o);
    int ret = validate_create(path, &o, err, errlen);
    if (ret < 0) {
        return ret;
    }
    /* Sizes are whole 512-byte sectors, as qemu-img makes them. */
    o.size = (o.size + 511) & ~(uint64_t)511;
    if (o.format == QSNAP_FMT_RAW) {
        return create_raw(path, &o, err, errlen);
    }
    if (o.backing_file && o.size == 0) {
        /* Size defaults to the backing file's, as qemu-img does. */
        struct qsnap_open_opts bo;
        qsnap_open_opts_init(&bo);
        bo.flags = QSNAP_OPEN_FORCE_SHARE | QSNAP_OPEN_NO_BACKING;
        if (o.backing_fmt && strcmp(o.backing_fmt, "raw") == 0) {
            bo.format = QSNAP_FMT_RAW;
        }
        char bpath[PATH_MAX];
        const char *slash = strrchr(path, '/');
        if (o.backing_file[0] != '/' && slash) {
            snprintf(bpath, sizeof(bpath), "%.*s/%s", (int)(slash - path), path,
                     o.backing_file);
        } else {
            snprintf(bpath, sizeof(bpath), "%s", o.backing_file);
        }
        qsnap_image *b;
        char sub[1024];
        ret = qsnap_open(bpath, &bo, &b, sub, sizeof(sub));
        if (ret < 0) {
            qs_fmt_err(err, errlen, "%s: backing file: %s", path, sub);
            return ret;
        }
        o.size = b->virtual_size;
        qsnap_close(b);
    }

    ret = write_skeleton(path, &o, err, errlen);
    if (ret < 0) {
        return ret;
    }
    /* The file is ours from here: a failure removes it rather than leave
     * a half-made image (say, tables preallocated, data not). */
    ret = finish_qcow2(path, &o, err, errlen);
    if (ret < 0) {
        unlink(path);
    }
    return ret;
}

static int finish_qcow2(const char *path, const struct qsnap_create_opts *o,
                        char *err, size_t errlen)
{
    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    oo.flags = QSNAP_OPEN_RDWR | QSNAP_OPEN_NO_BACKING;
    oo.format = QSNAP_FMT_QCOW2;
    qsnap_image *img;
    int ret = qsnap_open(path, &oo, &img, err, errlen);
    if (ret < 0) {
        return ret;
    }
    ret = qsnap_resize(img, o->size, 0);
    if (ret == 0 && o->prealloc != QSNAP_PREALLOC_OFF) {
        qs_lock_exclusive(img);
        ret = qs_preallocate(img, o->prealloc);
        pthread_rwlock_unlock(&img->lock);
    }
    if (ret < 0) {
        qs_fmt_err(err, errlen, "%s", img->errmsg);
        qsnap_close(img);
        return ret;
    }
    ret = qsnap_close(img);
    if (ret < 0) {
        qs_fmt_err(err, errlen, "%s: closing the new image: %s", path,
                   qsnap_strerror(ret));
    }
    return ret;
}

/* ------------------------------------------------------------ info */

QSNAP_API int qsnap_get_info(qsnap_image *img, struct qsnap_info *info)
{
    if (!img || !info || info->struct_size < sizeof(size_t)) {
        return -EINVAL;
    }
    struct qsnap_info i;
    memset(&i, 0, sizeof(i));
    i.struct_size = sizeof(i);

    pthread_rwlock_rdlock(&img->lock);
    i.format = img->format;
    i.virtual_size = img->virtual_size;
    uint64_t fs = 0, du = 0;
    qs_io_size(img->io, &fs);
    qs_io_disk_usage(img->io, &du);
    i.file_size = fs;
    i.disk_size = du;
    i.read_only = !img->rw;
    if (img->format == QSNAP_FMT_QCOW2) {
        const struct qs_header *h = &img->hdr;
        i.cluster_size = (uint32_t)img->cluster_size;
        i.version = (int)h->version;
        i.refcount_bits = 1 << h->refcount_order;
        i.compression_type = h->compression_type;
        i.lazy_refcounts = h->compat & QS_COMPAT_LAZY_REFCOUNTS;
        i.dirty = h->incompat & QS_INCOMPAT_DIRTY;
        i.corrupt = (h->incompat & QS_INCOMPAT_CORRUPT) ||
                    (img->corrupt && !img->switch_failed);
        i.extended_l2 = img->ext_l2;
        i.nb_snapshots = img->n_snapshots;
        snprintf(i.backing_file, sizeof(i.backing_file), "%s", h->backing_file);
        snprintf(i.backing_fmt, sizeof(i.backing_fmt), "%s", h->backing_fmt);
    }
    snprintf(i.filename, sizeof(i.filename), "%s", img->filename);
    pthread_rwlock_unlock(&img->lock);

    const size_t n = QS_MIN(info->struct_size, sizeof(i));
    memcpy(info, &i, n);
    info->struct_size = n;
    return 0;
}

/* ------------------------------------------------------------ I/O */

QSNAP_API int qsnap_preadv(qsnap_image *img, const struct iovec *iov,
                           int iovcnt, uint64_t offset)
{
    if (!img || iovcnt < 0 || (iovcnt && !iov)) {
        return -EINVAL;
    }
    uint64_t len = 0;
    for (int i = 0; i < iovcnt; i++) {
        len += iov[i].iov_len;
    }
    int ret = check_range(img, offset, len);
    if (ret < 0 || len == 0) {
        return ret;
    }
    pthread_rwlock_rdlock(&img->lock);
    if (img->format == QSNAP_FMT_RAW) {
        ret = qs_raw_read(img, iov, iovcnt, offset, len);
    } else {
        ret = qs_read(img, iov, iovcnt, offset, len);
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

QSNAP_API int qsnap_pread(qsnap_image *img, void *buf, size_t len,
                          uint64_t offset)
{
    struct iovec v = {buf, len};
    return qsnap_preadv(img, &v, 1, offset);
}

static int flush_locked(struct qsnap_image *img)
{
    if (img->format == QSNAP_FMT_RAW) {
        return qs_io_flush(img->io);
    }
    int ret = qs_meta_sync(img);
    if (ret == 0) {
        ret = qs_refcount_drain(img);
    }
    return ret;
}

/*
 * A write that needs new clusters.  Small requests become jobs whose data
 * goes to disk without the exclusive lock, so allocating writes from many
 * threads overlap their I/O; the rest is written under the lock.
 */
static int write_allocating(struct qsnap_image *img, const struct iovec *iov,
                            int iovcnt, uint64_t offset, uint64_t len)
{
    struct qs_write_job job;
    int ret;

    pthread_rwlock_wrlock(&img->lock);
    do {
        ret = check_writable(img);
    } while (ret == 0 && qs_jobs_wait_range(img, offset, len));
    if (ret == 0) {
        ret = qs_write_begin(img, iov, iovcnt, offset, len, &job);
    }
    if (ret == 0) {
        ret = qs_write(img, iov, iovcnt, offset, len, 0);
    } else if (ret > 0) {
        pthread_rwlock_unlock(&img->lock);
        ret = qs_write_job_data(img, &job);
        pthread_rwlock_wrlock(&img->lock);
        ret = qs_write_end(img, &job, ret);
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

QSNAP_API int qsnap_pwritev(qsnap_image *img, const struct iovec *iov,
                            int iovcnt, uint64_t offset)
{
    if (!img || iovcnt < 0 || (iovcnt && !iov)) {
        return -EINVAL;
    }
    uint64_t len = 0;
    for (int i = 0; i < iovcnt; i++) {
        len += iov[i].iov_len;
    }
    int ret = check_range(img, offset, len);
    if (ret == 0) {
        ret = check_writable(img);
    }
    if (ret < 0 || len == 0) {
        return ret;
    }
    if (img->format == QSNAP_FMT_RAW) {
        ret = qs_io_pwritev(img->io, iov, iovcnt, offset);
        if (ret < 0) {
            return qs_error(img, ret, "%s: writing at %" PRIu64 ": %s",
                            img->filename, offset, qsnap_strerror(ret));
        }
    } else {
        struct qs_inplace_plan plan;
        pthread_rwlock_rdlock(&img->lock);
        ret = qs_inplace_begin(img, offset, len, &plan);
        pthread_rwlock_unlock(&img->lock);
        if (ret > 0) {
            ret = qs_inplace_data(img, &plan, iov, iovcnt);
            qs_inplace_end(img, &plan);
        } else if (ret == 0) {
            ret = write_allocating(img, iov, iovcnt, offset, len);
        }
        if (ret > 0) {
            ret = 0;
        }
    }
    if (ret == 0 && (img->open_flags & QSNAP_OPEN_WRITETHROUGH)) {
        ret = qsnap_flush(img);
    }
    return ret;
}

QSNAP_API int qsnap_pwrite(qsnap_image *img, const void *buf, size_t len,
                           uint64_t offset)
{
    struct iovec v = {(void *)buf, len};
    return qsnap_pwritev(img, &v, 1, offset);
}

QSNAP_API int qsnap_start_writeback(qsnap_image *img)
{
    if (!img) {
        return -EINVAL;
    }
    /* img->io lives as long as the handle; the call is only a hint. */
    if (!(img->open_flags & QSNAP_OPEN_NOCACHE)) {
        qs_io_start_writeback(img->io);
    }
    return 0;
}

static int zero_common(qsnap_image *img, uint64_t offset, uint64_t len,
                       bool discard, bool may_unmap)
{
    if (!img) {
        return -EINVAL;
    }
    int ret = check_range(img, offset, len);
    if (ret == 0) {
        ret = check_writable(img);
    }
    if (ret < 0 || len == 0) {
        return ret;
    }
    if (img->format == QSNAP_FMT_RAW) {
        ret = qs_io_punch(img->io, offset, len);
        if (ret < 0) {
            uint8_t *z = calloc(1, 65536);
            ret = z ? 0 : -ENOMEM;
            for (uint64_t p = 0; p < len && ret == 0; p += 65536) {
                ret = qs_io_pwrite(img->io, z, (size_t)QS_MIN(65536, len - p),
                                   offset + p);
            }
            free(z);
        }
        return ret;
    }
    pthread_rwlock_wrlock(&img->lock);
    while (qs_jobs_wait_range(img, offset, len)) {
        /* an allocating write owned part of the range: look again */
    }
    ret = qs_zero(img, offset, len,
                  discard ? QS_ZERO_DISCARD : QS_ZERO_WRITE, may_unmap);
    if (ret == 0 && (img->open_flags & QSNAP_OPEN_WRITETHROUGH)) {
        ret = flush_locked(img);
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

QSNAP_API int qsnap_write_zeroes(qsnap_image *img, uint64_t offset,
                                 uint64_t len, unsigned flags)
{
    return zero_common(img, offset, len, false, flags & QSNAP_ZERO_MAY_UNMAP);
}

QSNAP_API int qsnap_discard(qsnap_image *img, uint64_t offset, uint64_t len)
{
    return zero_common(img, offset, len, true, true);
}

QSNAP_API int qsnap_write_compressed(qsnap_image *img, const void *buf,
                                     size_t len, uint64_t offset)
{
    if (!img || !buf) {
        return -EINVAL;
    }
    int ret = check_range(img, offset, len);
    if (ret == 0) {
        ret = check_writable(img);
    }
    if (ret < 0) {
        return ret;
    }
    if (img->format != QSNAP_FMT_QCOW2) {
        return qs_error(img, -ENOTSUP,
                        "%s: only qcow2 images store "
                        "compressed clusters",
                        img->filename);
    }
    const uint64_t cs = img->cluster_size;
    if (offset % cs || len > cs ||
        (len < cs && offset + len != img->virtual_size)) {
        return qs_error(img, -EINVAL,
                        "%s: compressed writes take one whole cluster "
                        "(offset %" PRIu64 ", length %zu, cluster %" PRIu64 ")",
                        img->filename, offset, len, cs);
    }
    uint8_t *raw = (uint8_t *)buf;
    uint8_t *padded = NULL;
    if (len < cs) {
        padded = calloc(1, cs);
        if (!padded) {
            return -ENOMEM;
        }
        memcpy(padded, buf, len);
        raw = padded;
    }
    /* Compress outside the lock: threads compress in parallel. */
    uint8_t *cbuf = malloc(cs);
    ssize_t clen =
        cbuf ? qs_compress(img->hdr.compression_type, cbuf, cs - 1, raw, cs)
             : -ENOMEM;
    if (clen == -ENOMEM) {
        free(padded);
        free(cbuf);
        return -ENOMEM;
    }
    if (clen < 0 && clen != -ENOSPC) {
        free(padded);
        free(cbuf);
        return qs_error(img, (int)clen, "%s: compression failed",
                        img->filename);
    }
    qs_lock_exclusive(img);
    if (clen == -ENOSPC && len < cs) {
        struct iovec v = {(void *)buf, len};
        ret = qs_write(img, &v, 1, offset, len, 0);
    } else {
        ret = qs_write_compressed(img, clen > 0 ? cbuf : NULL,
                                  clen > 0 ? (size_t)clen : 0, raw, offset);
    }
    pthread_rwlock_unlock(&img->lock);
    free(padded);
    free(cbuf);
    return ret;
}

QSNAP_API int qsnap_flush(qsnap_image *img)
{
    if (!img) {
        return -EINVAL;
    }
    if (!img->rw) {
        return 0;
    }
    /* Nothing cached or pending: a data flush needs no exclusive lock. */
    pthread_rwlock_rdlock(&img->lock);
    const bool clean =
        img->format == QSNAP_FMT_RAW || (!img->l1_dirty && !img->n_pending &&
                                         !qs_cache_has_dirty(img->l2_cache) &&
                                         !qs_cache_has_dirty(img->rb_cache));
    int ret = clean ? qs_io_flush(img->io) : 0;
    pthread_rwlock_unlock(&img->lock);
    if (clean) {
        return ret;
    }
    pthread_rwlock_wrlock(&img->lock);
    ret = flush_locked(img);
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

/* ------------------------------------------------------------ resize */

static int resize_locked(struct qsnap_image *img, uint64_t new_size,
                         unsigned flags)
{
    const uint64_t old = img->virtual_size;
    if (img->hdr.version < 3 && img->n_snapshots) {
        /* v2 snapshot entries record no disk size: QEMU could not apply
         * them after a resize, so it refuses, and so do we. */
        return qs_error(img, -ENOTSUP,
                        "%s: can't resize a v2 image which has snapshots",
                        img->filename);
    }
    if (img->ckpt) {
        return qs_error(img, -EBUSY,
                        "%s: cannot resize while a checkpoint is open",
                        img->filename);
    }
    if (new_size < old) {
        if (!(flags & QSNAP_RESIZE_SHRINK)) {
            return qs_error(img, -EINVAL,
                            "%s: shrinking from %" PRIu64 " to %" PRIu64
                            " bytes needs the shrink flag",
                            img->filename, old, new_size);
        }
        for (uint64_t p = new_size; p < old;) {
            struct qs_mapping m;
            int ret = qs_map(img, p, old - p, &m);
            if (ret < 0) {
                return ret;
            }
            if (m.type != QS_C_UNALLOC) {
                return qs_error(img, -EINVAL,
                                "%s: cannot shrink to %" PRIu64
                                " bytes: data is allocated at offset "
                                "%" PRIu64,
                                img->filename, new_size, p);
            }
            p += m.len;
        }
    }
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    const uint64_t need = (new_size + (1ull << span_bits) - 1) >> span_bits;
    if (need > QS_MAX_L1_BYTES / 8) {
        return qs_error(img, -EFBIG,
                        "%s: size %" PRIu64 " needs %" PRIu64
                        " L1 entries, over the limit of %u",
                        img->filename, new_size, need, QS_MAX_L1_BYTES / 8);
    }
    int ret = qs_l1_grow(img, (uint32_t)need);
    if (ret < 0) {
        return ret;
    }
    if (new_size > old && img->backing && img->backing->virtual_size > old) {
        /* The new area must read as zeros, not as the longer backing
         * file's data (nor what a partial last cluster copied of it). */
        const uint64_t end = QS_MIN(new_size, img->backing->virtual_size);
        ret = qs_zero(img, old, end - old, QS_ZERO_WRITE, true);
        if (ret == 0) {
            ret = qs_meta_sync(img);
        }
        if (ret < 0) {
            return ret;
        }
    }
    uint8_t f[8];
    qs_be64_store(f, new_size);
    ret = qs_header_switch(img, QS_HDR_OFF_SIZE, f, 8);
    if (ret == 0) {
        img->hdr.size = new_size;
        img->virtual_size = new_size;
    }
    return ret;
}

QSNAP_API int qsnap_resize(qsnap_image *img, uint64_t new_size, unsigned flags)
{
    if (!img) {
        return -EINVAL;
    }
    int ret = check_writable(img);
    if (ret < 0) {
        return ret;
    }
    if (new_size > (uint64_t)INT64_MAX) {
        return qs_error(img, -EINVAL, "%s: size %" PRIu64 " is too large",
                        img->filename, new_size);
    }
    if (img->format == QSNAP_FMT_QCOW2) {
        new_size = (new_size + 511) & ~(uint64_t)511; /* whole sectors */
    }
    qs_lock_exclusive(img);
    if (img->format == QSNAP_FMT_RAW) {
        if (new_size < img->virtual_size && !(flags & QSNAP_RESIZE_SHRINK)) {
            ret = qs_error(img, -EINVAL, "%s: shrinking needs the shrink flag",
                           img->filename);
        } else {
            ret = qs_io_truncate(img->io, new_size);
            if (ret == 0) {
                img->virtual_size = new_size;
                img->file_size = new_size;
            }
        }
    } else {
        ret = resize_locked(img, new_size, flags);
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

/* ------------------------------------------------------------ status */

QSNAP_API int qsnap_block_status(qsnap_image *img, uint64_t offset,
                                 uint64_t len, uint64_t *pnum, unsigned *flags,
                                 uint64_t *host_off, int *depth)
{
    if (!img || !pnum || !flags) {
        return -EINVAL;
    }
    int ret = check_range(img, offset, len);
    if (ret < 0) {
        return ret;
    }
    *pnum = 0;
    *flags = 0;
    if (host_off) {
        *host_off = 0;
    }
    if (depth) {
        *depth = 0;
    }
    if (len == 0) {
        return 0;
    }
    if (img->format == QSNAP_FMT_RAW) {
        if (host_off) {
            *host_off = offset;
        }
        return qs_raw_block_status(img, offset, len, pnum, flags);
    }

    pthread_rwlock_rdlock(&img->lock);
    struct qs_mapping m;
    ret = qs_map(img, offset, len, &m);
    pthread_rwlock_unlock(&img->lock);
    if (ret < 0) {
        return ret;
    }
    *pnum = m.len;
    switch (m.type) {
    case QS_C_UNALLOC:
        if (img->backing) {
            struct qsnap_image *b = img->backing;
            if (offset >= b->virtual_size) {
                /* Past its end the backing layer decides: zeros. */
                *flags = QSNAP_BS_ZERO | QSNAP_BS_ALLOCATED;
                if (depth) {
                    *depth = 1;
                }
                return 0;
            }
            uint64_t n = QS_MIN(m.len, b->virtual_size - offset);
            int d = 0;
            ret = qsnap_block_status(b, offset, n, pnum, flags, host_off, &d);
            if (ret == 0 && depth) {
                *depth = d + 1;
            }
            return ret;
        }
        *flags = QSNAP_BS_ZERO;
        break;
    case QS_C_ZERO_PLAIN:
        *flags = QSNAP_BS_ZERO | QSNAP_BS_ALLOCATED;
        break;
    case QS_C_ZERO_ALLOC:
        *flags = QSNAP_BS_ZERO | QSNAP_BS_ALLOCATED | QSNAP_BS_OFFSET;
        if (host_off) {
            *host_off = m.host_off;
        }
        break;
    case QS_C_NORMAL:
        *flags = QSNAP_BS_DATA | QSNAP_BS_ALLOCATED | QSNAP_BS_OFFSET;
        if (host_off) {
            *host_off = m.host_off;
        }
        break;
    case QS_C_COMPRESSED:
        *flags = QSNAP_BS_DATA | QSNAP_BS_ALLOCATED | QSNAP_BS_COMPRESSED;
        break;
    }
    return 0;
}

/* ------------------------------------------------------------ check */

QSNAP_API int qsnap_check(qsnap_image *img, unsigned flags,
                          struct qsnap_check_result *res,
                          qsnap_check_report_fn report, void *opaque)
{
    if (!img || !res || res->struct_size < sizeof(size_t)) {
        return -EINVAL;
    }
    if ((flags & (QSNAP_CHECK_REPAIR_LEAKS | QSNAP_CHECK_REPAIR_ALL)) &&
        !img->rw) {
        return qs_error(img, -EROFS, "%s: repair needs a read-write open",
                        img->filename);
    }
    struct qsnap_check_result r;
    memset(&r, 0, sizeof(r));
    r.struct_size = sizeof(r);
    int ret = 0;
    if (img->format == QSNAP_FMT_QCOW2) {
        qs_lock_exclusive(img);
        if (img->rw && !img->corrupt) {
            ret = flush_locked(img);
        }
        if (ret == 0) {
            ret = qs_check(img, flags, &r, report, opaque);
        }
        pthread_rwlock_unlock(&img->lock);
    }
    const size_t n = QS_MIN(res->struct_size, sizeof(r));
    memcpy(res, &r, n);
    res->struct_size = n;
    return ret;
}
