/*
 * chain.c - backing chains: listing, external checkpoints (overlays),
 * commit, rebase, stream and merge-on-delete.
 *
 * Spec: docs/interop/qcow2.txt, "Header" (backing file name and format).
 *
 * Invariants:
 *   1. Data moves before pointers: every copy between layers is flushed
 *      before a backing pointer changes, and a file is removed (or
 *      replaced) only after nothing refers to it any more.  A crash
 *      therefore leaves every remaining layer reading its own content.
 *   2. Layers other than the one written are read through handles whose
 *      caches cannot be stale: after another handle wrote a layer, the
 *      readers of that layer are reopened.
 *   3. Copies go through the public I/O calls of the handles involved,
 *      so every write keeps the engine's own ordering rules.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qs_int.h"

#define COPY_CHUNK (2u << 20)

static const char *fmt_name(int format)
{
    return format == QSNAP_FMT_RAW ? "raw" : "qcow2";
}

static struct qsnap_image *layer_at(struct qsnap_image *img, int depth)
{
    while (img && depth-- > 0) {
        img = img->backing;
    }
    return img;
}

/* Depth of the layer that is the file `path` (by device and inode). */
static int find_layer(struct qsnap_image *top, const char *path)
{
    struct stat want;
    if (stat(path, &want) < 0) {
        return -ENOENT;
    }
    int depth = 0;
    for (struct qsnap_image *l = top; l; l = l->backing, depth++) {
        struct stat st;
        if (stat(l->filename, &st) == 0 && st.st_dev == want.st_dev &&
            st.st_ino == want.st_ino) {
            return depth;
        }
    }
    return -ENOENT;
}

/* The name to record in `img`'s header for the file at `target`. */
static int backing_name_for(const struct qsnap_image *img,
                            const char *target, char *name, size_t len)
{
    const char *slash = strrchr(img->filename, '/');
    const size_t dir_len = slash ? (size_t)(slash - img->filename) : 0;
    const char *tslash = strrchr(target, '/');
    const size_t tdir_len = tslash ? (size_t)(tslash - target) : 0;
    int n;
    if (target[0] != '/' && dir_len == 0 && tdir_len == 0) {
        n = snprintf(name, len, "%s", target);
    } else if (dir_len == tdir_len &&
               strncmp(img->filename, target, dir_len) == 0) {
        n = snprintf(name, len, "%s", tslash + 1); /* same directory */
    } else {
        char abs[PATH_MAX];
        if (!realpath(target, abs)) {
            return -errno;
        }
        n = snprintf(name, len, "%s", abs);
    }
    return n < 0 || (size_t)n >= len ? -ENAMETOOLONG : 0;
}

/*
 * Records `name` (NULL: none) and `fmt` as img's backing file and opens
 * the new chain.  With `may_be_missing` an unopenable backing file is
 * accepted (an unsafe rebase may name a file that comes later).
 */
static int set_backing_name(struct qsnap_image *img, const char *name,
                            const char *fmt, bool may_be_missing)
{
    if (name && strlen(name) > QS_MAX_BACKING_NAME) {
        return qs_error(img, -ENAMETOOLONG,
                        "%s: backing file name is %zu bytes (at most %u)",
                        img->filename, strlen(name), QS_MAX_BACKING_NAME);
    }
    qs_lock_exclusive(img);
    struct qs_header old = img->hdr;
    snprintf(img->hdr.backing_file, sizeof(img->hdr.backing_file), "%s",
             name ? name : "");
    snprintf(img->hdr.backing_fmt, sizeof(img->hdr.backing_fmt), "%s",
             name && fmt ? fmt : "");
    /* The data this switch relies on is on disk first (invariant 1). */
    int ret = qs_meta_sync(img);
    if (ret == 0) {
        ret = qs_header_write(img);
        if (ret == 0) {
            ret = qs_io_flush(img->io);
            if (ret < 0) {
                /* The backing file name lies in the first cluster. */
                ret = qs_switch_failed(img, ret, 0, img->cluster_size);
            }
        }
    }
    if (ret < 0) {
        memcpy(img->hdr.backing_file, old.backing_file,
               sizeof(old.backing_file));
        memcpy(img->hdr.backing_fmt, old.backing_fmt,
               sizeof(old.backing_fmt));
    } else {
        ret = qs_reopen_backing(img);
        if (ret < 0 && may_be_missing) {
            img->backing = NULL;
            ret = 0;
        }
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

/* Points img's header at the file `target` (NULL: no backing file). */
static int set_backing(struct qsnap_image *img, const char *target,
                       const char *fmt)
{
    char name[QS_MAX_BACKING_NAME + 1] = "";
    if (target) {
        int ret = backing_name_for(img, target, name, sizeof(name));
        if (ret < 0) {
            return qs_error(img, ret,
                            "%s: cannot name backing file %s (at most %u "
                            "bytes)",
                            img->filename, target, QS_MAX_BACKING_NAME);
        }
    }
    return set_backing_name(img, target ? name : NULL, fmt, false);
}

static int open_rw(const char *path, int format, qsnap_image **out,
                   char *err, size_t errlen)
{
    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    o.flags = QSNAP_OPEN_RDWR;
    o.format = format;
    return qsnap_open(path, &o, out, err, errlen);
}

/* One chunk of a copy: zeros or data from `src` into `dst`. */
static int copy_range(qsnap_image *src, qsnap_image *dst, uint64_t off,
                      uint64_t len, bool zero, uint8_t *buf)
{
    if (zero) {
        int ret = qsnap_write_zeroes(dst, off, len, 0);
        return ret;
    }
    int ret = qsnap_pread(src, buf, len, off);
    if (ret < 0) {
        return qs_error(dst, ret, "reading %s at %" PRIu64 ": %s",
                        src->filename, off, qsnap_errmsg(src));
    }
    return qsnap_pwrite(dst, buf, len, off);
}

static void progress_to(qsnap_progress_fn fn, void *opaque, uint64_t done,
                        uint64_t total)
{
    if (fn) {
        fn(opaque, done, total);
    }
}

/*
 * Copies into `dst` the ranges of src's view that a layer at depth
 * [min_depth, max_depth) of src's chain holds.
 */
static int copy_layers(qsnap_image *src, qsnap_image *dst, int min_depth,
                       int max_depth, qsnap_progress_fn progress,
                       void *opaque)
{
    const uint64_t size = src->virtual_size;
    uint8_t *buf = malloc(COPY_CHUNK);
    int ret = buf ? 0 : -ENOMEM;
    for (uint64_t off = 0; off < size && ret == 0;) {
        uint64_t pnum;
        unsigned st;
        int d;
        ret = qsnap_block_status(src, off, QS_MIN(size - off, COPY_CHUNK),
                                 &pnum, &st, NULL, &d);
        if (ret < 0 || pnum == 0) {
            break;
        }
        if ((st & QSNAP_BS_ALLOCATED) && d >= min_depth && d < max_depth) {
            ret = copy_range(src, dst, off, pnum,
                             (st & QSNAP_BS_ZERO) && !(st & QSNAP_BS_DATA),
                             buf);
        }
        off += pnum;
        progress_to(progress, opaque, off, size);
    }
    free(buf);
    return ret;
}

/* ------------------------------------------------------------ list */

static uint64_t allocated_bytes(struct qsnap_image *l)
{
    uint64_t total = 0;
    for (uint64_t off = 0; off < l->virtual_size;) {
        uint64_t pnum;
        unsigned flags;
        int depth;
        if (qsnap_block_status(l, off, l->virtual_size - off, &pnum, &flags,
                               NULL, &depth) < 0 ||
            pnum == 0) {
            break;
        }
        if (depth == 0 && (flags & QSNAP_BS_ALLOCATED)) {
            total += pnum;
        }
        off += pnum;
    }
    return total;
}

QSNAP_API int qsnap_chain_list(qsnap_image *img,
                               struct qsnap_layer_info **list,
                               uint32_t *count)
{
    if (!img || !list || !count) {
        return -EINVAL;
    }
    uint32_t n = 0;
    for (struct qsnap_image *l = img; l; l = l->backing) {
        n++;
    }
    struct qsnap_layer_info *v = calloc(n, sizeof(*v));
    if (!v) {
        return -ENOMEM;
    }
    uint32_t i = 0;
    for (struct qsnap_image *l = img; l; l = l->backing, i++) {
        v[i].struct_size = sizeof(v[i]);
        snprintf(v[i].filename, sizeof(v[i].filename), "%s", l->filename);
        if (l->format == QSNAP_FMT_QCOW2) {
            snprintf(v[i].backing_name, sizeof(v[i].backing_name), "%s",
                     l->hdr.backing_file);
            snprintf(v[i].backing_fmt, sizeof(v[i].backing_fmt), "%s",
                     l->hdr.backing_fmt);
            v[i].nb_snapshots = l->n_snapshots;
        }
        v[i].format = l->format;
        v[i].virtual_size = l->virtual_size;
        v[i].allocated_bytes = allocated_bytes(l);
    }
    *list = v;
    *count = n;
    return 0;
}

/* ------------------------------------------------------------ overlay */

QSNAP_API int qsnap_overlay_push(qsnap_image **imgp, const char *path,
                                 const struct qsnap_create_opts *opts)
{
    if (!imgp || !*imgp || !path) {
        return -EINVAL;
    }
    struct qsnap_image *img = *imgp;
    if (!img->rw) {
        return qs_error(img, -EROFS, "%s: image is open read-only",
                        img->filename);
    }
    struct qsnap_create_opts co;
    qsnap_create_opts_init(&co);
    if (opts) {
        memcpy(&co, opts, QS_MIN(opts->struct_size, sizeof(co)));
    }
    co.struct_size = sizeof(co);
    co.format = QSNAP_FMT_QCOW2;
    co.size = img->virtual_size;
    char name[QS_MAX_BACKING_NAME + 1];
    /* Name the frozen image relative to the overlay's directory. */
    struct qsnap_image probe = {.filename = (char *)path};
    int ret = backing_name_for(&probe, img->filename, name, sizeof(name));
    if (ret < 0) {
        return qs_error(img, ret, "%s: cannot name %s as backing file",
                        path, img->filename);
    }
    co.backing_file = name;
    co.backing_fmt = fmt_name(img->format);
    struct stat st;
    if (stat(path, &st) == 0) {
        return qs_error(img, -EEXIST, "%s: file exists", path);
    }
    /* Freeze: everything written so far is on disk. */
    ret = qsnap_flush(img);
    if (ret < 0) {
        return ret;
    }
    char err[1024];
    ret = qsnap_create(path, &co, err, sizeof(err));
    if (ret < 0) {
        return qs_error(img, ret, "%s", err);
    }
    const char *old_path = img->filename;
    char *keep = strdup(old_path);
    const int old_fmt = img->format;
    if (!keep) {
        unlink(path);
        return -ENOMEM;
    }
    ret = qsnap_close(img);
    struct qsnap_image *top = NULL;
    if (ret == 0) {
        ret = open_rw(path, QSNAP_FMT_QCOW2, &top, err, sizeof(err));
    }
    if (ret < 0) {
        /* Give the caller its image back, unchanged: the old handle is
         * gone, so a failed reopen leaves *imgp NULL, never dangling. */
        unlink(path);
        *imgp = NULL;
        int r2 = open_rw(keep, old_fmt, imgp, err, sizeof(err));
        free(keep);
        return r2 < 0 ? r2 : ret;
    }
    free(keep);
    *imgp = top;
    return 0;
}

/* ------------------------------------------------------------ commit */

QSNAP_API int qsnap_commit(qsnap_image *top, const char *base_path,
                           unsigned flags, qsnap_progress_fn progress,
                           void *opaque)
{
    if (!top) {
        return -EINVAL;
    }
    if (!top->rw || top->format != QSNAP_FMT_QCOW2) {
        return qs_error(top, -EROFS,
                        "%s: commit needs the top image open read-write",
                        top->filename);
    }
    if (!top->backing) {
        return qs_error(top, -EINVAL, "%s: image has no backing file",
                        top->filename);
    }
    const int depth = base_path ? find_layer(top, base_path) : 1;
    if (depth < 1) {
        return qs_error(top, -ENOENT,
                        "%s: '%s' is not a backing file of this image",
                        top->filename, base_path ? base_path : "");
    }
    struct qsnap_image *b = layer_at(top, depth);
    qsnap_image *base = NULL;
    char err[1024];
    int ret = open_rw(b->filename, b->format, &base, err, sizeof(err));
    if (ret < 0) {
        return qs_error(top, ret, "%s", err);
    }
    const uint64_t size = top->virtual_size;
    if (base->virtual_size < size) {
        ret = qsnap_resize(base, size, 0);
    }
    if (ret == 0) {
        ret = copy_layers(top, base, 0, depth, progress, opaque);
    }
    if (ret == 0) {
        ret = qsnap_flush(base);
    }
    if (ret < 0 && !top->errmsg[0]) {
        qs_error(top, ret, "%s", qsnap_errmsg(base));
    }
    int r2 = qsnap_close(base);
    ret = ret < 0 ? ret : r2;
    if (ret < 0) {
        return ret;
    }
    /* Readers of the base must not serve stale tables (invariant 2). */
    qs_lock_exclusive(top);
    ret = qs_reopen_backing(top);
    if (ret == 0 && depth == 1 && !(flags & QSNAP_COMMIT_KEEP)) {
        /* Empty the top: it now reads everything through the base. */
        ret = qs_zero(top, 0, top->virtual_size, QS_ZERO_UNALLOCATE, true);
        if (ret == 0) {
            ret = qs_meta_sync(top);
        }
        if (ret == 0) {
            ret = qs_refcount_drain(top);
        }
    }
    pthread_rwlock_unlock(&top->lock);
    return ret;
}

/* ------------------------------------------------------------ rebase */

static int open_ro_backing(struct qsnap_image *img, const char *name,
                           const char *fmt, qsnap_image **out)
{
    char path[PATH_MAX];
    int ret = qs_backing_path(img, name, path, sizeof(path));
    if (ret < 0) {
        return qs_error(img, ret, "%s: backing name too long", img->filename);
    }
    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    o.flags = QSNAP_OPEN_FORCE_SHARE | QS_OPEN_BACKING;
    o.format = !fmt || !fmt[0]        ? QSNAP_FMT_AUTO
               : strcmp(fmt, "raw") == 0 ? QSNAP_FMT_RAW
               : strcmp(fmt, "qcow2") == 0
                   ? QSNAP_FMT_QCOW2
                   : -1;
    if (o.format < 0) {
        return qs_error(img, -ENOTSUP, "%s: unsupported backing format '%s'",
                        img->filename, fmt);
    }
    char err[1024];
    ret = qsnap_open(path, &o, out, err, sizeof(err));
    if (ret < 0) {
        return qs_error(img, ret, "%s", err);
    }
    return 0;
}

/* Reads the guest view of `layer` (or zeros past it / without one). */
static int read_view(qsnap_image *layer, uint8_t *buf, uint64_t len,
                     uint64_t off)
{
    uint64_t have = 0;
    if (layer && off < layer->virtual_size) {
        have = QS_MIN(len, layer->virtual_size - off);
        int ret = qsnap_pread(layer, buf, have, off);
        if (ret < 0) {
            return ret;
        }
    }
    memset(buf + have, 0, len - have);
    return 0;
}

QSNAP_API int qsnap_rebase(qsnap_image *img, const char *backing,
                           const char *backing_fmt, unsigned flags,
                           qsnap_progress_fn progress, void *opaque)
{
    if (!img) {
        return -EINVAL;
    }
    if (!img->rw || img->format != QSNAP_FMT_QCOW2) {
        return qs_error(img, -EROFS,
                        "%s: rebase needs a qcow2 image open read-write",
                        img->filename);
    }
    const bool none = !backing || !backing[0];
    qsnap_image *nb = NULL;
    int ret = 0;
    if (!none && !(flags & QSNAP_REBASE_UNSAFE)) {
        ret = open_ro_backing(img, backing, backing_fmt, &nb);
        if (ret < 0) {
            return ret;
        }
    }
    const uint64_t cs = img->cluster_size;
    const uint64_t size = img->virtual_size;
    uint8_t *a = malloc(COPY_CHUNK), *b = malloc(COPY_CHUNK);
    if (!a || !b) {
        ret = -ENOMEM;
    }
    for (uint64_t off = 0;
         !(flags & QSNAP_REBASE_UNSAFE) && off < size && ret == 0;) {
        uint64_t pnum;
        unsigned st;
        int d;
        ret = qsnap_block_status(img, off, QS_MIN(size - off, COPY_CHUNK),
                                 &pnum, &st, NULL, &d);
        if (ret < 0 || pnum == 0) {
            break;
        }
        if (!(d == 0 && (st & QSNAP_BS_ALLOCATED))) {
            /* img does not decide here: old and new views must agree. */
            ret = read_view(img, a, pnum, off);
            if (ret == 0) {
                ret = read_view(nb, b, pnum, off);
            }
            for (uint64_t p = 0; ret == 0 && p < pnum;) {
                const uint64_t n = QS_MIN(pnum - p, cs - ((off + p) % cs));
                if (memcmp(a + p, b + p, n) != 0) {
                    ret = qsnap_pwrite(img, a + p, n, off + p);
                }
                p += n;
            }
        }
        off += pnum;
        progress_to(progress, opaque, off, size);
    }
    free(a);
    free(b);
    const char *fmt = NULL;
    if (ret == 0 && nb) {
        fmt = fmt_name(nb->format);
    }
    if (nb) {
        qsnap_close(nb);
    }
    if (ret == 0) {
        ret = qsnap_flush(img);
    }
    if (ret == 0) {
        /* The name is recorded as given, as qemu-img does. */
        const char *rfmt = fmt ? fmt : backing_fmt;
        ret = set_backing_name(img, none ? NULL : backing, rfmt,
                               flags & QSNAP_REBASE_UNSAFE);
    }
    return ret;
}

/* ------------------------------------------------------------ stream */

QSNAP_API int qsnap_stream(qsnap_image *img, const char *base,
                           qsnap_progress_fn progress, void *opaque)
{
    if (!img) {
        return -EINVAL;
    }
    if (!img->rw || img->format != QSNAP_FMT_QCOW2) {
        return qs_error(img, -EROFS,
                        "%s: stream needs a qcow2 image open read-write",
                        img->filename);
    }
    int depth = INT_MAX;
    if (base) {
        depth = find_layer(img, base);
        if (depth < 1) {
            return qs_error(img, -ENOENT,
                            "%s: '%s' is not a backing file of this image",
                            img->filename, base);
        }
    }
    int ret = copy_layers(img, img, 1, depth, progress, opaque);
    if (ret == 0) {
        ret = qsnap_flush(img);
    }
    if (ret == 0) {
        struct qsnap_image *b = base ? layer_at(img, depth) : NULL;
        char target[PATH_MAX] = "";
        if (b) {
            snprintf(target, sizeof(target), "%s", b->filename);
        }
        ret = set_backing(img, b ? target : NULL,
                          b ? fmt_name(b->format) : NULL);
    }
    return ret;
}

/* ------------------------------------------------------------ delete */

/* Bytes of [0, size) that `l` holds itself (depth 0). */
static int held_by(struct qsnap_image *l, uint64_t off, uint64_t len,
                   uint64_t *pnum, bool *held, bool *zero)
{
    unsigned st;
    int d;
    if (off >= l->virtual_size) {
        /* Past its end a layer decides: it reads zeros there. */
        *pnum = len;
        *held = true;
        *zero = true;
        return 0;
    }
    int ret = qsnap_block_status(l, off, QS_MIN(len, l->virtual_size - off),
                                 pnum, &st, NULL, &d);
    *held = ret == 0 && d == 0 && (st & QSNAP_BS_ALLOCATED);
    *zero = (st & QSNAP_BS_ZERO) && !(st & QSNAP_BS_DATA);
    return ret;
}

/* Bytes the two merge directions would move. */
static int merge_costs(struct qsnap_image *child, struct qsnap_image *layer,
                       uint64_t *stream_cost, uint64_t *commit_cost)
{
    const uint64_t size = child->virtual_size;
    *stream_cost = 0;
    *commit_cost = 0;
    for (uint64_t off = 0; off < size;) {
        uint64_t n1, n2;
        bool c_held, l_held, z;
        int ret = held_by(child, off, QS_MIN(size - off, COPY_CHUNK), &n1,
                          &c_held, &z);
        if (ret == 0) {
            ret = held_by(layer, off, n1, &n2, &l_held, &z);
        }
        if (ret < 0) {
            return ret;
        }
        const uint64_t n = QS_MIN(n1, n2);
        if (n == 0) {
            break;
        }
        if (c_held) {
            *commit_cost += n;
        } else if (l_held) {
            *stream_cost += n;
        }
        off += n;
    }
    return 0;
}

/* Copies what `from` holds (and `skip` does not) into `to`. */
static int merge_copy(struct qsnap_image *from, struct qsnap_image *skip,
                      qsnap_image *to, uint64_t size,
                      qsnap_progress_fn progress, void *opaque)
{
    uint8_t *buf = malloc(COPY_CHUNK);
    int ret = buf ? 0 : -ENOMEM;
    for (uint64_t off = 0; off < size && ret == 0;) {
        uint64_t n1, n2 = UINT64_MAX;
        bool f_held, s_held = false, zero, z2;
        ret = held_by(from, off, QS_MIN(size - off, COPY_CHUNK), &n1,
                      &f_held, &zero);
        if (ret == 0 && skip) {
            ret = held_by(skip, off, n1, &n2, &s_held, &z2);
        }
        const uint64_t n = QS_MIN(n1, n2);
        if (ret < 0 || n == 0) {
            break;
        }
        if (f_held && !s_held) {
            ret = copy_range(from, to, off, n, zero, buf);
        }
        off += n;
        progress_to(progress, opaque, off, size);
    }
    free(buf);
    return ret;
}

/* True if the two files lie in one directory (by its device and inode). */
static bool same_directory(const char *a, const char *b)
{
    char da[PATH_MAX], db[PATH_MAX];
    const char *sa = strrchr(a, '/'), *sb = strrchr(b, '/');
    snprintf(da, sizeof(da), "%.*s", sa ? (int)(sa - a) + 1 : 1,
             sa ? a : ".");
    snprintf(db, sizeof(db), "%.*s", sb ? (int)(sb - b) + 1 : 1,
             sb ? b : ".");
    struct stat x, y;
    return stat(da, &x) == 0 && stat(db, &y) == 0 && x.st_dev == y.st_dev &&
           x.st_ino == y.st_ino;
}

QSNAP_API int qsnap_checkpoint_delete(const char *top_path,
                                      const char *layer_path, unsigned flags,
                                      qsnap_progress_fn progress,
                                      void *opaque, char *err, size_t errlen)
{
    if (!top_path || !layer_path ||
        (flags & QSNAP_MERGE_STREAM && flags & QSNAP_MERGE_COMMIT)) {
        qs_fmt_err(err, errlen, "qsnap_checkpoint_delete: bad arguments");
        return -EINVAL;
    }
    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    o.flags = QSNAP_OPEN_FORCE_SHARE;
    qsnap_image *top;
    int ret = qsnap_open(top_path, &o, &top, err, errlen);
    if (ret < 0) {
        return ret;
    }
    const int depth = find_layer(top, layer_path);
    if (depth < 0) {
        qs_fmt_err(err, errlen, "%s: '%s' is not in this image's chain",
                   top_path, layer_path);
        qsnap_close(top);
        return -ENOENT;
    }
    if (depth == 0) {
        qs_fmt_err(err, errlen,
                   "%s: this is the active top of the chain; deleting it "
                   "would be a revert, not a delete (discard the overlay "
                   "or rebase instead)",
                   top_path);
        qsnap_close(top);
        return -EINVAL;
    }
    struct qsnap_image *child = layer_at(top, depth - 1);
    struct qsnap_image *layer = layer_at(top, depth);
    if (child->n_snapshots) {
        /* The child's snapshots read through the layer too; merging only
         * into its live disk would change what they show. */
        qs_fmt_err(err, errlen,
                   "%s: cannot delete %s: %s has internal snapshots that "
                   "read through it (delete them first)",
                   top_path, layer->filename, child->filename);
        qsnap_close(top);
        return -EBUSY;
    }
    struct qsnap_image *below = layer->backing;
    char child_path[PATH_MAX], lpath[PATH_MAX], below_path[PATH_MAX] = "";
    snprintf(child_path, sizeof(child_path), "%s", child->filename);
    snprintf(lpath, sizeof(lpath), "%s", layer->filename);
    if (below) {
        snprintf(below_path, sizeof(below_path), "%s", below->filename);
    }
    const int child_fmt = child->format, layer_fmt = layer->format;
    const int below_fmt = below ? below->format : QSNAP_FMT_AUTO;
    const bool child_snaps = child->n_snapshots > 0;

    /* Committing down moves the layer to the child's path: only when the
     * layer's own backing name stays valid there and nothing is lost. */
    const bool same_dir = same_directory(child_path, lpath);
    /* A larger layer in the child's place would grow what it shows. */
    const bool can_commit = child_fmt == QSNAP_FMT_QCOW2 &&
                            layer_fmt == QSNAP_FMT_QCOW2 && !child_snaps &&
                            layer->virtual_size <= child->virtual_size &&
                            (same_dir || !below ||
                             layer->hdr.backing_file[0] == '/');
    uint64_t stream_cost = 0, commit_cost = 0;
    ret = merge_costs(child, layer, &stream_cost, &commit_cost);
    const uint64_t size = child->virtual_size;
    qsnap_close(top); /* copies below use their own handles */
    if (ret < 0) {
        qs_fmt_err(err, errlen, "%s: reading the chain failed", top_path);
        return ret;
    }
    bool commit = can_commit && commit_cost < stream_cost;
    if (flags & QSNAP_MERGE_COMMIT) {
        if (!can_commit) {
            qs_fmt_err(err, errlen,
                       "%s: cannot commit %s into %s (both must be qcow2, "
                       "the child without internal snapshots and no "
                       "smaller than the layer, in one directory)",
                       top_path, child_path, lpath);
            return -EINVAL;
        }
        commit = true;
    } else if (flags & QSNAP_MERGE_STREAM) {
        commit = false;
    }

    qsnap_image *dst = NULL, *src = NULL;
    if (commit) {
        /* The child's data goes down into the layer ... */
        ret = open_rw(lpath, layer_fmt, &dst, err, errlen);
        if (ret == 0) {
            o.flags = QSNAP_OPEN_FORCE_SHARE;
            o.format = child_fmt;
            ret = qsnap_open(child_path, &o, &src, err, errlen);
        }
        if (ret == 0 && dst->virtual_size < size) {
            ret = qsnap_resize(dst, size, 0);
        }
        if (ret == 0) {
            ret = merge_copy(src, NULL, dst, size, progress, opaque);
        }
        if (ret == 0) {
            ret = qsnap_flush(dst);
        }
    } else {
        /* ... or the layer's data goes up into the child. */
        ret = open_rw(child_path, child_fmt, &dst, err, errlen);
        if (ret == 0) {
            o.flags = QSNAP_OPEN_FORCE_SHARE;
            o.format = layer_fmt;
            ret = qsnap_open(lpath, &o, &src, err, errlen);
        }
        if (ret == 0) {
            /* dst reads its own clusters at depth 0: they hide src. */
            ret = merge_copy(src, dst, dst, size, progress, opaque);
        }
        if (ret == 0) {
            ret = set_backing(dst, below ? below_path : NULL,
                              below ? fmt_name(below_fmt) : NULL);
        }
    }
    if (ret < 0 && dst && qsnap_errmsg(dst)[0]) {
        qs_fmt_err(err, errlen, "%s", qsnap_errmsg(dst));
    } else if (ret < 0 && src && qsnap_errmsg(src)[0]) {
        qs_fmt_err(err, errlen, "%s", qsnap_errmsg(src));
    }
    if (src) {
        qsnap_close(src);
    }
    int r2 = dst ? qsnap_close(dst) : 0;
    ret = ret < 0 ? ret : r2;
    if (ret < 0) {
        return ret;
    }
    /* Last step: the file nobody refers to goes (invariant 1). */
    if (commit) {
        ret = rename(lpath, child_path) < 0 ? -errno : 0;
    } else {
        ret = unlink(lpath) < 0 ? -errno : 0;
    }
    if (ret < 0) {
        qs_fmt_err(err, errlen, "%s: %s", commit ? child_path : lpath,
                   strerror(-ret));
    }
    return ret;
}
