/*
 * fuse_fs.c - the requests of qsnap-fuse: lookups, attributes, directory
 * listings, file I/O and the snapshot operations behind mkdir, rmdir and
 * rename in snapshots/.
 *
 * Every handler resolves its inode number to a node (qsnap_fuse.h,
 * invariant 2), does its work through <qsnap.h> and replies once.  Guest
 * I/O runs on many worker threads at a time: the image handle is
 * thread-safe, and the file handle of an open file keeps whatever it reads
 * through (a snapshot view, a VM state reader, a backing layer) open until
 * it is released.
 *
 * Page cache
 *   Snapshot and backing files never change while mounted, so the kernel
 *   keeps their pages across opens (keep_cache).  The live disk keeps them
 *   too: with -o rw every change reaches the image through this mount, and
 *   the kernel updates (writes) or drops (fallocate) the cached pages
 *   itself; read-only, another program (a running VM) may write the
 *   image, so the disk's mtime is the image file's and the kernel drops
 *   the cache when it sees the mtime change (FUSE_CAP_AUTO_INVAL_DATA).
 *   The JSON files are rebuilt at every open and read with direct I/O.
 *
 * Invariants
 *   1. One reply per request (see qsnap_fuse.h).
 *   2. The live disk's size changes only by growing it through truncate
 *      (qsnap_resize); reads and writes are clamped to the size read once
 *      at their start.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <syslog.h>
#include <unistd.h>

#include "qsnap_fuse.h"

#ifndef FALLOC_FL_KEEP_SIZE
#define FALLOC_FL_KEEP_SIZE 0x01
#endif
#ifndef FALLOC_FL_PUNCH_HOLE
#define FALLOC_FL_PUNCH_HOLE 0x02
#endif
#ifndef FALLOC_FL_ZERO_RANGE
#define FALLOC_FL_ZERO_RANGE 0x10
#endif
#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0)
#endif

/* How long the kernel may cache names and attributes (seconds). */
#define QF_TIMEOUT 1.0

/* A resolved inode number. */
struct qf_node {
    enum qf_type type;
    struct qf_snap *snap;   /* referenced, for the QF_T_SN_* types */
    struct qf_layer *layer; /* QF_T_LAYER */
    uint32_t idx;           /* QF_T_SN_SECTION: the section */
};

/* What an open file reads. */
enum qf_kind {
    QF_K_DISK,
    QF_K_TEXT,
    QF_K_VIEW,
    QF_K_RAW,
    QF_K_SECTION,
    QF_K_LAYER,
};

struct qf_handle {
    enum qf_kind kind;
    uint64_t size;
    struct qf_snap *snap;   /* VIEW, RAW, SECTION: referenced */
    struct qf_layer *layer; /* LAYER */
    const char *section;    /* SECTION: owned by snap */
    char *text;             /* TEXT */
    struct qf_handle *prev, *next; /* fs->handles, under fs->lock */
};

/* A directory listing, built at opendir. */
struct qf_dirbuf {
    char *p;
    size_t size;
    int err; /* first error while building */
};

static struct qf_fs *fs_of(fuse_req_t req)
{
    return fuse_req_userdata(req);
}

void qf_log(const struct qf_fs *fs, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (fs->o.foreground) {
        fprintf(stderr, "%s: ", QF_PROG);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
    } else {
        vsyslog(LOG_ERR, fmt, ap);
    }
    va_end(ap);
}

/* Logs a failed library call: always for I/O errors, all with -d. */
static void log_failure(const struct qf_fs *fs, const char *what, int ret,
                        const char *msg)
{
    if (fs->o.debug || ret == -EIO || ret == -EUCLEAN) {
        qf_log(fs, "%s: %s%s%s", what, qsnap_strerror(ret),
               msg && msg[0] ? ": " : "", msg ? msg : "");
    }
}

/* Replies a negative errno from the library (invariant 1). */
static void reply_ret(fuse_req_t req, int ret)
{
    fuse_reply_err(req, ret < 0 ? -ret : 0);
}

static fuse_ino_t snap_ino(const struct qf_snap *sn, unsigned off)
{
    return ((fuse_ino_t)sn->num << QF_SNAP_SHIFT) + off;
}

static void node_done(struct qf_fs *fs, struct qf_node *n)
{
    qf_snap_put(fs, n->snap);
    n->snap = NULL;
}

/* Resolves an inode number; the node holds a reference on its snapshot. */
static int resolve(struct qf_fs *fs, fuse_ino_t ino, struct qf_node *n)
{
    memset(n, 0, sizeof(*n));
    switch (ino) {
    case QF_INO_ROOT:
        n->type = QF_T_ROOT;
        return 0;
    case QF_INO_DISK:
        n->type = QF_T_DISK;
        return 0;
    case QF_INO_INFO:
        n->type = QF_T_INFO;
        return 0;
    case QF_INO_SNAPSHOTS:
        n->type = QF_T_SNAPSHOTS;
        return 0;
    case QF_INO_BACKING:
        n->type = fs->n_layers ? QF_T_BACKING : QF_T_ROOT;
        return fs->n_layers ? 0 : -ENOENT;
    default:
        break;
    }
    if (ino > QF_INO_LAYER && ino <= QF_INO_LAYER + fs->n_layers) {
        n->type = QF_T_LAYER;
        n->layer = &fs->layers[ino - QF_INO_LAYER - 1];
        return 0;
    }
    const uint64_t num = ino >> QF_SNAP_SHIFT;
    const uint64_t off = ino & ((UINT64_C(1) << QF_SNAP_SHIFT) - 1);
    struct qf_snap *sn = num ? qf_snap_get_num(fs, num) : NULL;
    if (!sn) {
        return -ENOENT;
    }
    n->snap = sn;
    int ret = 0;
    pthread_mutex_lock(&fs->lock);
    if (off == QF_SN_DIR) {
        n->type = QF_T_SN_DIR;
    } else if (off == QF_SN_DISK) {
        n->type = QF_T_SN_DISK;
    } else if (off == QF_SN_INFO) {
        n->type = QF_T_SN_INFO;
    } else if (off == QF_SN_VMDIR && sn->vm_state_size) {
        n->type = QF_T_SN_VMDIR;
    } else if (off >= QF_SN_VMFILE && sn->vs_known && !sn->vs_sections &&
               sn->vs_size && off == QF_SN_VMFILE) {
        n->type = QF_T_SN_RAW;
    } else if (off >= QF_SN_VMFILE && sn->vs_known && sn->vs_sections &&
               off - QF_SN_VMFILE < sn->n_secs) {
        n->type = QF_T_SN_SECTION;
        n->idx = (uint32_t)(off - QF_SN_VMFILE);
    } else {
        ret = -ENOENT;
    }
    pthread_mutex_unlock(&fs->lock);
    if (ret < 0) {
        node_done(fs, n);
    }
    return ret;
}

static bool node_is_dir(const struct qf_node *n)
{
    switch (n->type) {
    case QF_T_ROOT:
    case QF_T_SNAPSHOTS:
    case QF_T_BACKING:
    case QF_T_SN_DIR:
    case QF_T_SN_VMDIR:
        return true;
    default:
        return false;
    }
}

/* The live disk's size (invariant 2). */
static uint64_t disk_size(struct qf_fs *fs)
{
    return atomic_load(&fs->size);
}

static void set_times(struct stat *st, const struct timespec *t)
{
    st->st_atim = *t;
    st->st_mtim = *t;
    st->st_ctim = *t;
}

/* Times of a file the mount shows: the file's own, else the mount's. */
static void file_times(const struct qf_fs *fs, const char *path,
                       struct stat *st)
{
    struct stat hs;
    if (path && stat(path, &hs) == 0) {
        st->st_atim = hs.st_atim;
        st->st_mtim = hs.st_mtim;
        st->st_ctim = hs.st_ctim;
    } else {
        set_times(st, &fs->start);
    }
}

static size_t text_size(int (*build)(char **, size_t *, void *), void *arg)
{
    char *text = NULL;
    size_t len = 0;
    if (build(&text, &len, arg) < 0) {
        return 0;
    }
    free(text);
    return len;
}

static int build_image_info(char **out, size_t *len, void *arg)
{
    return qf_json_image_info(arg, out, len);
}

/* Snapshot info.json: built under fs->lock (a rename changes the name). */
struct snap_arg {
    struct qf_fs *fs;
    struct qf_snap *sn;
};

static int build_snap_info(char **out, size_t *len, void *arg)
{
    const struct snap_arg *a = arg;
    pthread_mutex_lock(&a->fs->lock);
    const int ret = qf_json_snap_info(a->sn, out, len);
    pthread_mutex_unlock(&a->fs->lock);
    return ret;
}

/* Fills the attributes of a node. */
static int node_stat(struct qf_fs *fs, const struct qf_node *n, fuse_ino_t ino,
                     struct stat *st)
{
    const mode_t dir_mode = S_IFDIR | 0555;
    struct qf_snap *sn = n->snap;

    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_uid = fs->uid;
    st->st_gid = fs->gid;
    st->st_nlink = 1;
    set_times(st, &fs->start);
    switch (n->type) {
    case QF_T_ROOT:
        st->st_mode = dir_mode;
        st->st_nlink = fs->n_layers ? 4 : 3;
        break;
    case QF_T_DISK: {
        struct qsnap_info in;
        memset(&in, 0, sizeof(in));
        in.struct_size = sizeof(in);
        st->st_mode = S_IFREG | (fs->o.rw ? 0644 : 0444);
        st->st_size = (off_t)disk_size(fs);
        if (qsnap_get_info(fs->img, &in) == 0) {
            st->st_blocks = (blkcnt_t)((in.disk_size + 511) / 512);
        }
        file_times(fs, fs->image_path, st);
        break;
    }
    case QF_T_INFO:
        st->st_mode = S_IFREG | 0444;
        st->st_size = (off_t)text_size(build_image_info, fs);
        file_times(fs, fs->image_path, st);
        break;
    case QF_T_SNAPSHOTS:
        st->st_mode = S_IFDIR | (fs->o.rw ? 0755 : 0555);
        pthread_mutex_lock(&fs->lock);
        st->st_nlink = 2 + fs->n_snaps;
        pthread_mutex_unlock(&fs->lock);
        break;
    case QF_T_BACKING:
        st->st_mode = dir_mode;
        st->st_nlink = 2;
        break;
    case QF_T_LAYER:
        st->st_mode = S_IFREG | 0444;
        st->st_size = (off_t)n->layer->size;
        file_times(fs, n->layer->path, st);
        break;
    default: {
        const struct timespec date = {(time_t)sn->date_sec,
                                      (long)sn->date_nsec};
        set_times(st, &date);
        pthread_mutex_lock(&fs->lock);
        switch (n->type) {
        case QF_T_SN_DIR:
            st->st_mode = dir_mode;
            st->st_nlink = sn->vm_state_size ? 3 : 2;
            break;
        case QF_T_SN_DISK:
            st->st_mode = S_IFREG | 0444;
            st->st_size = (off_t)sn->disk_size;
            break;
        case QF_T_SN_VMDIR:
            st->st_mode = dir_mode;
            st->st_nlink = 2;
            break;
        case QF_T_SN_RAW:
            st->st_mode = S_IFREG | 0444;
            st->st_size = (off_t)sn->vs_size;
            break;
        case QF_T_SN_SECTION:
            st->st_mode = S_IFREG | 0444;
            st->st_size = (off_t)sn->secs[n->idx].size;
            break;
        default:
            st->st_mode = S_IFREG | 0444;
            break;
        }
        pthread_mutex_unlock(&fs->lock);
        if (n->type == QF_T_SN_INFO) {
            struct snap_arg a = {fs, sn};
            st->st_size = (off_t)text_size(build_snap_info, &a);
        }
        break;
    }
    }
    if (S_ISREG(st->st_mode) && n->type != QF_T_DISK) {
        st->st_blocks = (blkcnt_t)((st->st_size + 511) / 512);
    }
    return 0;
}

/* Attribute timeout: the JSON files change under the kernel's feet. */
static double attr_timeout(const struct qf_node *n)
{
    return (n->type == QF_T_INFO || n->type == QF_T_SN_INFO) ? 0.0 : QF_TIMEOUT;
}

static void reply_entry(fuse_req_t req, struct qf_fs *fs,
                        const struct qf_node *n, fuse_ino_t ino)
{
    struct fuse_entry_param e;
    memset(&e, 0, sizeof(e));
    e.ino = ino;
    e.attr_timeout = attr_timeout(n);
    e.entry_timeout = QF_TIMEOUT;
    node_stat(fs, n, ino, &e.attr);
    fuse_reply_entry(req, &e);
}

/* ------------------------------------------------------------ lookup */

/* Looks `name` up in directory node `p`; fills *n and *ino. */
static int lookup_child(struct qf_fs *fs, const struct qf_node *p,
                        const char *name, struct qf_node *n, fuse_ino_t *ino)
{
    memset(n, 0, sizeof(*n));
    switch (p->type) {
    case QF_T_ROOT:
        if (strcmp(name, "disk") == 0) {
            *ino = QF_INO_DISK;
            n->type = QF_T_DISK;
        } else if (strcmp(name, "info.json") == 0) {
            *ino = QF_INO_INFO;
            n->type = QF_T_INFO;
        } else if (strcmp(name, "snapshots") == 0) {
            *ino = QF_INO_SNAPSHOTS;
            n->type = QF_T_SNAPSHOTS;
        } else if (strcmp(name, "backing") == 0 && fs->n_layers) {
            *ino = QF_INO_BACKING;
            n->type = QF_T_BACKING;
        } else {
            return -ENOENT;
        }
        return 0;
    case QF_T_SNAPSHOTS: {
        /*
         * The table changes only through this mount (a read-only handle
         * does not follow other writers), and every change refreshes it.
         */
        n->snap = qf_snap_get_fname(fs, name);
        if (!n->snap) {
            return -ENOENT;
        }
        n->type = QF_T_SN_DIR;
        *ino = snap_ino(n->snap, QF_SN_DIR);
        return 0;
    }
    case QF_T_BACKING:
        for (uint32_t i = 0; i < fs->n_layers; i++) {
            if (strcmp(fs->layers[i].fname, name) == 0) {
                n->type = QF_T_LAYER;
                n->layer = &fs->layers[i];
                *ino = QF_INO_LAYER + i + 1;
                return 0;
            }
        }
        return -ENOENT;
    case QF_T_SN_DIR: {
        struct qf_snap *sn = p->snap;
        unsigned off;
        pthread_mutex_lock(&fs->lock);
        const bool has_state = sn->vm_state_size != 0;
        pthread_mutex_unlock(&fs->lock);
        if (strcmp(name, "disk") == 0) {
            n->type = QF_T_SN_DISK;
            off = QF_SN_DISK;
        } else if (strcmp(name, "info.json") == 0) {
            n->type = QF_T_SN_INFO;
            off = QF_SN_INFO;
        } else if (strcmp(name, "vmstate") == 0 && has_state) {
            n->type = QF_T_SN_VMDIR;
            off = QF_SN_VMDIR;
        } else {
            return -ENOENT;
        }
        pthread_mutex_lock(&fs->lock);
        sn->refs++;
        pthread_mutex_unlock(&fs->lock);
        n->snap = sn;
        *ino = snap_ino(sn, off);
        return 0;
    }
    case QF_T_SN_VMDIR: {
        struct qf_snap *sn = p->snap;
        pthread_mutex_lock(&fs->snap_lock);
        int ret = qf_snap_probe_vmstate(fs, sn);
        pthread_mutex_unlock(&fs->snap_lock);
        if (ret < 0) {
            return ret;
        }
        ret = -ENOENT;
        pthread_mutex_lock(&fs->lock);
        if (!sn->vs_sections && sn->vs_size && strcmp(name, "raw") == 0) {
            n->type = QF_T_SN_RAW;
            *ino = snap_ino(sn, QF_SN_VMFILE);
            ret = 0;
        }
        for (uint32_t i = 0; sn->vs_sections && i < sn->n_secs; i++) {
            if (strcmp(sn->secs[i].fname, name) == 0) {
                n->type = QF_T_SN_SECTION;
                n->idx = i;
                *ino = snap_ino(sn, QF_SN_VMFILE + i);
                ret = 0;
                break;
            }
        }
        if (ret == 0) {
            sn->refs++;
            n->snap = sn;
        }
        pthread_mutex_unlock(&fs->lock);
        return ret;
    }
    default:
        return -ENOTDIR;
    }
}

static void qf_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct qf_fs *fs = fs_of(req);
    struct qf_node p, n;
    fuse_ino_t ino = 0;

    int ret = resolve(fs, parent, &p);
    if (ret < 0) {
        reply_ret(req, ret);
        return;
    }
    ret = lookup_child(fs, &p, name, &n, &ino);
    node_done(fs, &p);
    if (ret < 0) {
        reply_ret(req, ret);
        return;
    }
    reply_entry(req, fs, &n, ino);
    node_done(fs, &n);
}

static void qf_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    /* Nothing is tied to the kernel's lookup count (invariant 2). */
    (void)ino;
    (void)nlookup;
    fuse_reply_none(req);
}

static void qf_getattr(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    struct qf_node n;
    struct stat st;

    (void)fi;
    const int ret = resolve(fs, ino, &n);
    if (ret < 0) {
        reply_ret(req, ret);
        return;
    }
    node_stat(fs, &n, ino, &st);
    fuse_reply_attr(req, &st, attr_timeout(&n));
    node_done(fs, &n);
}

/* Grows the live disk (truncate to a larger size). */
static int grow_disk(struct qf_fs *fs, uint64_t new_size)
{
    /* snap_lock orders the resize against snapshot creation. */
    pthread_mutex_lock(&fs->snap_lock);
    const uint64_t cur = disk_size(fs);
    int ret = 0;
    if (new_size < cur) {
        ret = -EPERM;
    } else if (new_size > cur) {
        ret = qsnap_resize(fs->img, new_size, 0);
        if (ret == 0) {
            atomic_store(&fs->size, new_size);
        } else {
            log_failure(fs, "resize", ret, qsnap_errmsg(fs->img));
        }
    }
    pthread_mutex_unlock(&fs->snap_lock);
    return ret;
}

static void qf_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr,
                       int to_set, struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    struct qf_node n;
    struct stat st;

    (void)fi;
    int ret = resolve(fs, ino, &n);
    if (ret < 0) {
        reply_ret(req, ret);
        return;
    }
    if (to_set & (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) {
        ret = -EPERM;
    } else if (to_set & FUSE_SET_ATTR_SIZE) {
        if (node_is_dir(&n)) {
            ret = -EISDIR;
        } else if (n.type != QF_T_DISK || !fs->o.rw) {
            ret = -EROFS;
        } else {
            ret = grow_disk(fs, (uint64_t)attr->st_size);
        }
    }
    /* Times cannot be set; they follow the image. */
    if (ret < 0) {
        reply_ret(req, ret);
    } else {
        node_stat(fs, &n, ino, &st);
        fuse_reply_attr(req, &st, attr_timeout(&n));
    }
    node_done(fs, &n);
}

/* ------------------------------------------------------------ directories */

static void dirbuf_add(fuse_req_t req, struct qf_dirbuf *b, const char *name,
                       fuse_ino_t ino, mode_t mode)
{
    if (b->err) {
        return;
    }
    struct stat st;
    memset(&st, 0, sizeof(st));
    st.st_ino = ino;
    st.st_mode = mode;
    const size_t need = fuse_add_direntry(req, NULL, 0, name, NULL, 0);
    char *p = realloc(b->p, b->size + need);
    if (!p) {
        b->err = -ENOMEM;
        return;
    }
    b->p = p;
    fuse_add_direntry(req, b->p + b->size, need, name, &st,
                      (off_t)(b->size + need));
    b->size += need;
}

/* Lists directory node `n` (inode `ino`, parent `parent`) into *b. */
static void list_dir(fuse_req_t req, struct qf_fs *fs, const struct qf_node *n,
                     fuse_ino_t ino, fuse_ino_t parent, struct qf_dirbuf *b)
{
    dirbuf_add(req, b, ".", ino, S_IFDIR);
    dirbuf_add(req, b, "..", parent, S_IFDIR);
    switch (n->type) {
    case QF_T_ROOT:
        dirbuf_add(req, b, "disk", QF_INO_DISK, S_IFREG);
        dirbuf_add(req, b, "info.json", QF_INO_INFO, S_IFREG);
        dirbuf_add(req, b, "snapshots", QF_INO_SNAPSHOTS, S_IFDIR);
        if (fs->n_layers) {
            dirbuf_add(req, b, "backing", QF_INO_BACKING, S_IFDIR);
        }
        break;
    case QF_T_SNAPSHOTS:
        pthread_mutex_lock(&fs->snap_lock);
        b->err = qf_snap_refresh(fs);
        pthread_mutex_lock(&fs->lock);
        for (size_t i = 0; i < fs->n_snaps; i++) {
            dirbuf_add(req, b, fs->snaps[i]->fname,
                       snap_ino(fs->snaps[i], QF_SN_DIR), S_IFDIR);
        }
        pthread_mutex_unlock(&fs->lock);
        pthread_mutex_unlock(&fs->snap_lock);
        break;
    case QF_T_BACKING:
        for (uint32_t i = 0; i < fs->n_layers; i++) {
            dirbuf_add(req, b, fs->layers[i].fname, QF_INO_LAYER + i + 1,
                       S_IFREG);
        }
        break;
    case QF_T_SN_DIR:
        dirbuf_add(req, b, "disk", snap_ino(n->snap, QF_SN_DISK), S_IFREG);
        dirbuf_add(req, b, "info.json", snap_ino(n->snap, QF_SN_INFO), S_IFREG);
        pthread_mutex_lock(&fs->lock);
        if (n->snap->vm_state_size) {
            dirbuf_add(req, b, "vmstate", snap_ino(n->snap, QF_SN_VMDIR),
                       S_IFDIR);
        }
        pthread_mutex_unlock(&fs->lock);
        break;
    case QF_T_SN_VMDIR: {
        struct qf_snap *sn = n->snap;
        pthread_mutex_lock(&fs->snap_lock);
        const int ret = qf_snap_probe_vmstate(fs, sn);
        pthread_mutex_unlock(&fs->snap_lock);
        if (ret < 0) {
            b->err = ret;
            break;
        }
        pthread_mutex_lock(&fs->lock);
        if (!sn->vs_sections && sn->vs_size) {
            dirbuf_add(req, b, "raw", snap_ino(sn, QF_SN_VMFILE), S_IFREG);
        }
        for (uint32_t i = 0; sn->vs_sections && i < sn->n_secs; i++) {
            dirbuf_add(req, b, sn->secs[i].fname,
                       snap_ino(sn, QF_SN_VMFILE + i), S_IFREG);
        }
        pthread_mutex_unlock(&fs->lock);
        break;
    }
    default:
        b->err = -ENOTDIR;
        break;
    }
}

static fuse_ino_t parent_ino(const struct qf_node *n, fuse_ino_t ino)
{
    switch (n->type) {
    case QF_T_SNAPSHOTS:
    case QF_T_BACKING:
        return QF_INO_ROOT;
    case QF_T_SN_DIR:
        return QF_INO_SNAPSHOTS;
    case QF_T_SN_VMDIR:
        return snap_ino(n->snap, QF_SN_DIR);
    default:
        return ino;
    }
}

static void qf_opendir(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    struct qf_node n;

    int ret = resolve(fs, ino, &n);
    if (ret < 0) {
        reply_ret(req, ret);
        return;
    }
    struct qf_dirbuf *b = calloc(1, sizeof(*b));
    if (!b) {
        ret = -ENOMEM;
    } else if (!node_is_dir(&n)) {
        ret = -ENOTDIR;
    } else {
        list_dir(req, fs, &n, ino, parent_ino(&n, ino), b);
        ret = b->err;
    }
    node_done(fs, &n);
    if (ret < 0) {
        if (b) {
            free(b->p);
            free(b);
        }
        reply_ret(req, ret);
        return;
    }
    fi->fh = (uint64_t)(uintptr_t)b;
    if (fuse_reply_open(req, fi) == -ENOENT) {
        free(b->p);
        free(b);
    }
}

static void qf_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    const struct qf_dirbuf *b = (const struct qf_dirbuf *)(uintptr_t)fi->fh;

    (void)ino;
    if (off < 0 || (size_t)off >= b->size) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    /* A copy, for the reason given in qf_read(). */
    const size_t left = b->size - (size_t)off;
    const size_t len = left < size ? left : size;
    char *copy = malloc(len);
    if (!copy) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    memcpy(copy, b->p + off, len);
    fuse_reply_buf(req, copy, len);
    free(copy);
}

static void qf_releasedir(fuse_req_t req, fuse_ino_t ino,
                          struct fuse_file_info *fi)
{
    struct qf_dirbuf *b = (struct qf_dirbuf *)(uintptr_t)fi->fh;

    (void)ino;
    free(b->p);
    free(b);
    fuse_reply_err(req, 0);
}

/* ------------------------------------------------------------ snapshots */

static void qf_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name,
                     mode_t mode)
{
    struct qf_fs *fs = fs_of(req);

    (void)mode;
    if (!fs->o.rw) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (parent != QF_INO_SNAPSHOTS) {
        fuse_reply_err(req, EPERM);
        return;
    }
    char *sname = qf_name_decode(name);
    if (!sname) {
        fuse_reply_err(req, errno == ENOMEM ? ENOMEM : EINVAL);
        return;
    }

    pthread_mutex_lock(&fs->snap_lock);
    /* What the guest wrote so far is part of the snapshot. */
    int ret = qsnap_flush(fs->img);
    if (ret == 0) {
        ret = qsnap_snapshot_create(fs->img, sname, NULL);
    }
    if (ret < 0) {
        log_failure(fs, "mkdir", ret, qsnap_errmsg(fs->img));
    }
    struct qf_node n;
    memset(&n, 0, sizeof(n));
    if (ret == 0) {
        ret = qf_snap_refresh(fs);
    }
    if (ret == 0) {
        n.type = QF_T_SN_DIR;
        n.snap = qf_snap_get_fname(fs, name);
        ret = n.snap ? 0 : -EIO;
    }
    pthread_mutex_unlock(&fs->snap_lock);
    free(sname);
    if (ret < 0) {
        reply_ret(req, ret);
        return;
    }
    reply_entry(req, fs, &n, snap_ino(n.snap, QF_SN_DIR));
    node_done(fs, &n);
}

static void qf_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct qf_fs *fs = fs_of(req);

    if (!fs->o.rw) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (parent != QF_INO_SNAPSHOTS) {
        fuse_reply_err(req, EPERM);
        return;
    }
    pthread_mutex_lock(&fs->snap_lock);
    int ret = qf_snap_refresh(fs);
    struct qf_snap *sn = ret < 0 ? NULL : qf_snap_get_fname(fs, name);
    if (ret == 0 && !sn) {
        ret = -ENOENT;
    }
    if (sn) {
        ret = qf_snap_delete(fs, sn);
        if (ret < 0) {
            log_failure(fs, "rmdir", ret, qsnap_errmsg(fs->img));
        }
        const int r2 = qf_snap_refresh(fs);
        ret = ret < 0 ? ret : r2;
    }
    pthread_mutex_unlock(&fs->snap_lock);
    qf_snap_put(fs, sn);
    reply_ret(req, ret);
}

static void qf_rename(fuse_req_t req, fuse_ino_t parent, const char *name,
                      fuse_ino_t newparent, const char *newname,
                      unsigned int flags)
{
    struct qf_fs *fs = fs_of(req);

    if (!fs->o.rw) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if (parent != QF_INO_SNAPSHOTS) {
        fuse_reply_err(req, EPERM);
        return;
    }
    if (newparent != QF_INO_SNAPSHOTS) {
        fuse_reply_err(req, EXDEV);
        return;
    }
    if (flags & ~(unsigned)RENAME_NOREPLACE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    char *sname = qf_name_decode(newname);
    if (!sname) {
        fuse_reply_err(req, errno == ENOMEM ? ENOMEM : EINVAL);
        return;
    }
    pthread_mutex_lock(&fs->snap_lock);
    int ret = qf_snap_refresh(fs);
    struct qf_snap *sn = ret < 0 ? NULL : qf_snap_get_fname(fs, name);
    if (ret == 0 && !sn) {
        ret = -ENOENT;
    }
    if (sn && strcmp(name, newname) != 0) {
        ret = qsnap_snapshot_rename(fs->img, sn->id, sname);
        if (ret < 0) {
            log_failure(fs, "rename", ret, qsnap_errmsg(fs->img));
        }
        const int r2 = qf_snap_refresh(fs);
        ret = ret < 0 ? ret : r2;
    }
    pthread_mutex_unlock(&fs->snap_lock);
    qf_snap_put(fs, sn);
    free(sname);
    reply_ret(req, ret);
}

/* Files cannot be made or removed anywhere in the tree. */
static void qf_mknod(fuse_req_t req, fuse_ino_t parent, const char *name,
                     mode_t mode, dev_t rdev)
{
    (void)parent;
    (void)name;
    (void)mode;
    (void)rdev;
    fuse_reply_err(req, fs_of(req)->o.rw ? EPERM : EROFS);
}

static void qf_create(fuse_req_t req, fuse_ino_t parent, const char *name,
                      mode_t mode, struct fuse_file_info *fi)
{
    (void)parent;
    (void)name;
    (void)mode;
    (void)fi;
    fuse_reply_err(req, fs_of(req)->o.rw ? EPERM : EROFS);
}

static void qf_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    (void)parent;
    (void)name;
    fuse_reply_err(req, fs_of(req)->o.rw ? EPERM : EROFS);
}

static void qf_symlink(fuse_req_t req, const char *link, fuse_ino_t parent,
                       const char *name)
{
    (void)link;
    (void)parent;
    (void)name;
    fuse_reply_err(req, fs_of(req)->o.rw ? EPERM : EROFS);
}

static void qf_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent,
                    const char *newname)
{
    (void)ino;
    (void)newparent;
    (void)newname;
    fuse_reply_err(req, fs_of(req)->o.rw ? EPERM : EROFS);
}

/* ------------------------------------------------------------ files */

/* Opens what a handle of node `n` reads; fills h. */
static int open_node(struct qf_fs *fs, struct qf_node *n, struct qf_handle *h,
                     struct fuse_file_info *fi)
{
    const bool wr = (fi->flags & O_ACCMODE) != O_RDONLY;
    int ret = 0;

    if (node_is_dir(n)) {
        return -EISDIR;
    }
    if (wr && (n->type != QF_T_DISK || !fs->o.rw)) {
        return -EROFS;
    }
    fi->keep_cache = !fs->o.direct_io;
    fi->direct_io = fs->o.direct_io;
    fi->noflush = 1;
    switch (n->type) {
    case QF_T_DISK:
        if (wr && (fi->flags & O_TRUNC)) {
            /* It would shrink the disk to nothing (as truncate does). */
            return -EPERM;
        }
        h->kind = QF_K_DISK;
        return 0;
    case QF_T_INFO:
    case QF_T_SN_INFO: {
        size_t len = 0;
        h->kind = QF_K_TEXT;
        if (n->type == QF_T_INFO) {
            ret = build_image_info(&h->text, &len, fs);
        } else {
            struct snap_arg a = {fs, n->snap};
            ret = build_snap_info(&h->text, &len, &a);
        }
        h->size = len;
        /* Current at every open, whatever size the kernel last saw. */
        fi->keep_cache = 0;
        fi->direct_io = 1;
        return ret;
    }
    case QF_T_LAYER:
        pthread_mutex_lock(&fs->snap_lock);
        ret = qf_layer_acquire(fs, n->layer);
        pthread_mutex_unlock(&fs->snap_lock);
        if (ret == 0) {
            h->kind = QF_K_LAYER;
            h->layer = n->layer;
            h->size = n->layer->size;
        }
        return ret;
    case QF_T_SN_DISK:
        pthread_mutex_lock(&fs->snap_lock);
        ret = qf_snap_view_acquire(fs, n->snap);
        pthread_mutex_unlock(&fs->snap_lock);
        if (ret == 0) {
            h->kind = QF_K_VIEW;
            h->size = qsnap_view_size(n->snap->view);
        }
        break;
    case QF_T_SN_RAW:
    case QF_T_SN_SECTION:
        pthread_mutex_lock(&fs->snap_lock);
        ret = qf_snap_vs_acquire(fs, n->snap);
        pthread_mutex_unlock(&fs->snap_lock);
        if (ret == 0 && n->type == QF_T_SN_RAW) {
            h->kind = QF_K_RAW;
            h->size = n->snap->vs_size;
        } else if (ret == 0) {
            h->kind = QF_K_SECTION;
            h->section = n->snap->secs[n->idx].name;
            h->size = n->snap->secs[n->idx].size;
        }
        break;
    default:
        return -EINVAL;
    }
    if (ret == 0) {
        /* The handle takes over the node's reference. */
        h->snap = n->snap;
        n->snap = NULL;
    } else {
        log_failure(fs, "open", ret, qsnap_errmsg(fs->img));
    }
    return ret;
}

static void handle_free(struct qf_fs *fs, struct qf_handle *h)
{
    pthread_mutex_lock(&fs->lock);
    if (h->prev) {
        h->prev->next = h->next;
    } else if (fs->handles == h) {
        fs->handles = h->next;
    }
    if (h->next) {
        h->next->prev = h->prev;
    }
    pthread_mutex_unlock(&fs->lock);
    switch (h->kind) {
    case QF_K_VIEW:
        qf_snap_view_release(fs, h->snap);
        break;
    case QF_K_RAW:
    case QF_K_SECTION:
        qf_snap_vs_release(fs, h->snap);
        break;
    case QF_K_LAYER:
        qf_layer_release(fs, h->layer);
        break;
    default:
        break;
    }
    qf_snap_put(fs, h->snap);
    free(h->text);
    free(h);
}

static void qf_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    struct qf_node n;

    int ret = resolve(fs, ino, &n);
    if (ret < 0) {
        reply_ret(req, ret);
        return;
    }
    struct qf_handle *h = calloc(1, sizeof(*h));
    ret = h ? open_node(fs, &n, h, fi) : -ENOMEM;
    node_done(fs, &n);
    if (ret < 0) {
        if (h) {
            free(h->text);
            free(h);
        }
        reply_ret(req, ret);
        return;
    }
    pthread_mutex_lock(&fs->lock);
    h->next = fs->handles;
    if (h->next) {
        h->next->prev = h;
    }
    fs->handles = h;
    pthread_mutex_unlock(&fs->lock);
    fi->fh = (uint64_t)(uintptr_t)h;
    if (fuse_reply_open(req, fi) == -ENOENT) {
        /* The opener went away: no release will come for this handle. */
        handle_free(fs, h);
    }
}

/*
 * Frees the handles still open when the session has ended: a release the
 * kernel had not sent yet when the file system was unmounted never comes.
 */
void qf_release_all(struct qf_fs *fs)
{
    while (fs->handles) {
        handle_free(fs, fs->handles);
    }
}

static void qf_release(fuse_req_t req, fuse_ino_t ino,
                       struct fuse_file_info *fi)
{
    (void)ino;
    handle_free(fs_of(req), (struct qf_handle *)(uintptr_t)fi->fh);
    fuse_reply_err(req, 0);
}

/* The size a handle reads up to. */
static uint64_t handle_size(struct qf_fs *fs, const struct qf_handle *h)
{
    return h->kind == QF_K_DISK ? disk_size(fs) : h->size;
}

static int handle_pread(struct qf_fs *fs, struct qf_handle *h, void *buf,
                        size_t len, uint64_t off)
{
    switch (h->kind) {
    case QF_K_DISK:
        return qsnap_pread(fs->img, buf, len, off);
    case QF_K_TEXT:
        memcpy(buf, h->text + off, len);
        return 0;
    case QF_K_VIEW:
        return qsnap_view_pread(h->snap->view, buf, len, off);
    case QF_K_RAW:
        return qsnap_vmstate_pread(h->snap->vs, buf, len, off);
    case QF_K_SECTION:
        return qsnap_vmstate_section_pread(h->snap->vs, h->section, buf, len,
                                           off);
    case QF_K_LAYER:
        return qsnap_pread(h->layer->img, buf, len, off);
    }
    return -EINVAL;
}

static const char *handle_errmsg(struct qf_fs *fs, const struct qf_handle *h)
{
    switch (h->kind) {
    case QF_K_RAW:
    case QF_K_SECTION:
        return qsnap_vmstate_errmsg(h->snap->vs);
    case QF_K_LAYER:
        return qsnap_errmsg(h->layer->img);
    default:
        return qsnap_errmsg(fs->img);
    }
}

static void qf_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    struct qf_handle *h = (struct qf_handle *)(uintptr_t)fi->fh;

    (void)ino;
    const uint64_t end = handle_size(fs, h);
    if (off < 0 || (uint64_t)off >= end || size == 0) {
        fuse_reply_buf(req, NULL, 0);
        return;
    }
    const size_t len = (uint64_t)off + size > end ? (size_t)(end - off) : size;
    /*
     * Always a private buffer, even for text: once the reply is written
     * the reader may close and the release free the handle's text at once,
     * while a sanitizer still inspects the reply's buffers.
     */
    char *buf = malloc(len);
    if (!buf) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    const int ret = handle_pread(fs, h, buf, len, (uint64_t)off);
    if (ret < 0) {
        log_failure(fs, "read", ret, handle_errmsg(fs, h));
        reply_ret(req, ret);
    } else {
        fuse_reply_buf(req, buf, len);
    }
    free(buf);
}

/*
 * A stream of large writes (a file copied into the disk, mkfs, a restore)
 * starts the image's writeback every 32 MiB, so the disk works while the
 * stream goes on and the fsync at its end has less left to do.  Called
 * after the reply: the writer never waits for it.  Small writes are left
 * to the kernel, as they are often rewritten soon.
 */
#define QF_BULK_WRITE (256u << 10)
#define QF_WRITEBACK_STEP (32u << 20)

static void note_bulk_write(struct qf_fs *fs, size_t len)
{
    if (len < QF_BULK_WRITE) {
        return;
    }
    uint64_t n = atomic_fetch_add(&fs->bulk_unsynced, len) + len;
    if (n >= QF_WRITEBACK_STEP &&
        atomic_compare_exchange_strong(&fs->bulk_unsynced, &n, 0)) {
        qsnap_start_writeback(fs->img);
    }
}

static void qf_write(fuse_req_t req, fuse_ino_t ino, const char *buf,
                     size_t size, off_t off, struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    const struct qf_handle *h = (const struct qf_handle *)(uintptr_t)fi->fh;

    (void)ino;
    if (h->kind != QF_K_DISK || !fs->o.rw) {
        fuse_reply_err(req, EROFS);
        return;
    }
    const uint64_t end = disk_size(fs);
    if (size == 0) {
        fuse_reply_write(req, 0);
        return;
    }
    if (off < 0 || (uint64_t)off >= end) {
        /* A disk does not grow by writing past its end. */
        fuse_reply_err(req, ENOSPC);
        return;
    }
    /* A write running over the end is cut short, as on a block device. */
    const size_t len = (uint64_t)off + size > end ? (size_t)(end - off) : size;
    const int ret = qsnap_pwrite(fs->img, buf, len, (uint64_t)off);
    if (ret < 0) {
        log_failure(fs, "write", ret, qsnap_errmsg(fs->img));
        reply_ret(req, ret);
        return;
    }
    fuse_reply_write(req, len);
    note_bulk_write(fs, len);
}

static void qf_fsync(fuse_req_t req, fuse_ino_t ino, int datasync,
                     struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    const struct qf_handle *h = (const struct qf_handle *)(uintptr_t)fi->fh;

    (void)ino;
    (void)datasync;
    int ret = 0;
    if (h->kind == QF_K_DISK && fs->o.rw) {
        ret = qsnap_flush(fs->img);
        if (ret < 0) {
            log_failure(fs, "fsync", ret, qsnap_errmsg(fs->img));
        }
    }
    reply_ret(req, ret);
}

static void qf_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                         off_t length, struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    const struct qf_handle *h = (const struct qf_handle *)(uintptr_t)fi->fh;
    const int known =
        FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE;

    (void)ino;
    if (h->kind != QF_K_DISK || !fs->o.rw) {
        fuse_reply_err(req, EROFS);
        return;
    }
    if ((mode & ~known) || offset < 0 || length <= 0) {
        fuse_reply_err(req, (mode & ~known) ? EOPNOTSUPP : EINVAL);
        return;
    }
    const uint64_t end = disk_size(fs);
    const uint64_t off = (uint64_t)offset;
    uint64_t stop = off + (uint64_t)length;
    if (stop < off) {
        fuse_reply_err(req, EFBIG);
        return;
    }
    if (stop > end && !(mode & FALLOC_FL_KEEP_SIZE)) {
        /* Would grow the file: the disk keeps its size. */
        fuse_reply_err(req, ENOSPC);
        return;
    }
    stop = stop > end ? end : stop;
    int ret = 0;
    if (off < stop && (mode & FALLOC_FL_PUNCH_HOLE)) {
        ret = qsnap_discard(fs->img, off, stop - off);
    } else if (off < stop && (mode & FALLOC_FL_ZERO_RANGE)) {
        ret = qsnap_write_zeroes(fs->img, off, stop - off, 0);
    }
    /* Plain allocation: every byte of the disk is already there. */
    if (ret < 0) {
        log_failure(fs, "fallocate", ret, qsnap_errmsg(fs->img));
    }
    reply_ret(req, ret);
}

/* Block status of the handle's data (disk, snapshot or layer). */
static int handle_status(struct qf_fs *fs, const struct qf_handle *h,
                         uint64_t off, uint64_t len, uint64_t *pnum,
                         unsigned *flags)
{
    switch (h->kind) {
    case QF_K_DISK:
        return qsnap_block_status(fs->img, off, len, pnum, flags, NULL, NULL);
    case QF_K_VIEW:
        return qsnap_view_block_status(h->snap->view, off, len, pnum, flags);
    case QF_K_LAYER:
        return qsnap_block_status(h->layer->img, off, len, pnum, flags, NULL,
                                  NULL);
    default:
        *pnum = len;
        *flags = QSNAP_BS_DATA;
        return 0;
    }
}

static void qf_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                     struct fuse_file_info *fi)
{
    struct qf_fs *fs = fs_of(req);
    const struct qf_handle *h = (const struct qf_handle *)(uintptr_t)fi->fh;

    (void)ino;
    if (whence != SEEK_DATA && whence != SEEK_HOLE) {
        fuse_reply_err(req, EINVAL);
        return;
    }
    const uint64_t end = handle_size(fs, h);
    if (off < 0 || (uint64_t)off >= end) {
        fuse_reply_err(req, ENXIO);
        return;
    }
    uint64_t pos = (uint64_t)off;
    while (pos < end) {
        uint64_t pnum = 0;
        unsigned flags = 0;
        const int ret = handle_status(fs, h, pos, end - pos, &pnum, &flags);
        if (ret < 0 || pnum == 0) {
            reply_ret(req, ret < 0 ? ret : -EIO);
            return;
        }
        /* Only what surely reads as zeros counts as a hole. */
        const bool hole = (flags & QSNAP_BS_ZERO) != 0;
        if (hole == (whence == SEEK_HOLE)) {
            fuse_reply_lseek(req, (off_t)pos);
            return;
        }
        pos += pnum;
    }
    if (whence == SEEK_DATA) {
        fuse_reply_err(req, ENXIO);
    } else {
        fuse_reply_lseek(req, (off_t)end);
    }
}

static void qf_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct qf_fs *fs = fs_of(req);
    struct statvfs sv;

    (void)ino;
    memset(&sv, 0, sizeof(sv));
    sv.f_bsize = 4096;
    sv.f_frsize = 4096;
    sv.f_blocks = (fsblkcnt_t)((disk_size(fs) + 4095) / 4096);
    pthread_mutex_lock(&fs->lock);
    sv.f_files = 5 + fs->n_layers + fs->n_snaps * 3;
    pthread_mutex_unlock(&fs->lock);
    sv.f_namemax = QF_NAME_MAX;
    if (!fs->o.rw) {
        sv.f_flag = ST_RDONLY;
    }
    fuse_reply_statfs(req, &sv);
}

static void qf_init(void *userdata, struct fuse_conn_info *conn)
{
    const struct qf_fs *fs = userdata;

    conn->max_write = QF_MAX_IO;
    conn->max_read = QF_MAX_IO;
    conn->max_readahead = QF_MAX_IO;
    conn->max_background = 64;
    conn->congestion_threshold = 48;
    conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;
    if (conn->capable & FUSE_CAP_ASYNC_READ) {
        conn->want |= FUSE_CAP_ASYNC_READ;
    }
    /* See "Page cache" above. */
    if (!fs->o.rw && (conn->capable & FUSE_CAP_AUTO_INVAL_DATA)) {
        conn->want |= FUSE_CAP_AUTO_INVAL_DATA;
    } else {
        conn->want &= ~(unsigned)FUSE_CAP_AUTO_INVAL_DATA;
    }
}

const struct fuse_lowlevel_ops qf_ops = {
    .init = qf_init,
    .lookup = qf_lookup,
    .forget = qf_forget,
    .getattr = qf_getattr,
    .setattr = qf_setattr,
    .mknod = qf_mknod,
    .mkdir = qf_mkdir,
    .unlink = qf_unlink,
    .rmdir = qf_rmdir,
    .symlink = qf_symlink,
    .rename = qf_rename,
    .link = qf_link,
    .open = qf_open,
    .read = qf_read,
    .write = qf_write,
    .release = qf_release,
    .fsync = qf_fsync,
    .opendir = qf_opendir,
    .readdir = qf_readdir,
    .releasedir = qf_releasedir,
    .statfs = qf_statfs,
    .create = qf_create,
    .fallocate = qf_fallocate,
    .lseek = qf_lseek,
};
