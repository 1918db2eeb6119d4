/*
 * qsnap_fuse.h - private interface of qsnap-fuse, the snapshot filesystem.
 *
 * qsnap-fuse shows one image as a small tree (see docs/qsnap-fuse.1):
 *
 *   disk                      the live guest disk as a raw file
 *   info.json                 as `qsnap-img info --output=json`
 *   snapshots/NAME/disk       a snapshot's guest disk, read-only
 *   snapshots/NAME/info.json  the snapshot's table entry
 *   snapshots/NAME/vmstate/   its VM state: the sections, or one file "raw"
 *   backing/LAYER             each image below an overlay, read-only
 *
 * It is written against libfuse's low-level API and uses only <qsnap.h>.
 * fuse_main.c parses the command line, opens the image and runs the
 * session; fuse_fs.c answers the requests; fuse_snap.c keeps the table of
 * snapshots (stable inode numbers, lazily opened views and VM state);
 * fuse_json.c writes the JSON files.
 *
 * Invariants
 *   1. Every request gets exactly one reply; errors are replied with
 *      fuse_reply_err(req, -ret) where ret is a negative errno.
 *   2. Inode numbers never change while mounted and are never reused: the
 *      fixed nodes have small numbers, backing layers QF_INO_LAYER + depth,
 *      and snapshot number k (counted from 1 as snapshots are first seen)
 *      owns the range k << QF_SNAP_SHIFT.  A deleted snapshot's numbers
 *      answer ENOENT from then on.
 *   3. Lock order: fs->snap_lock, then fs->lock.  snap_lock serialises
 *      everything that changes the snapshot table or opens a handle on a
 *      snapshot, so a name resolved to an ID still means that snapshot when
 *      the handle is opened.  fs->lock guards the in-memory tables and
 *      reference counts and is never held across guest I/O.
 *   4. A snapshot's view (and VM state reader) is open exactly while some
 *      file handle uses it; the library refuses to delete it meanwhile.
 */
#ifndef QSNAP_FUSE_H
#define QSNAP_FUSE_H

#define FUSE_USE_VERSION 312

#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include <qsnap.h>

#define QF_PROG "qsnap-fuse"

/* Largest read and write request asked of the kernel (and readahead). */
#define QF_MAX_IO (1u << 20)

/* Longest name the kernel accepts for one path component. */
#define QF_NAME_MAX 255

#if defined(__GNUC__)
#define QF_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define QF_PRINTF(a, b)
#endif

/* ------------------------------------------------------------ inodes */

enum {
    QF_INO_ROOT = FUSE_ROOT_ID,
    QF_INO_DISK = 2,
    QF_INO_INFO = 3,
    QF_INO_SNAPSHOTS = 4,
    QF_INO_BACKING = 5,
    QF_INO_LAYER = 0x100, /* + depth (1 = the backing file) */
};

/* Snapshot number k owns the inodes [k << QF_SNAP_SHIFT, (k + 1) << ...). */
#define QF_SNAP_SHIFT 32

/* Offsets of a snapshot's nodes inside its inode range. */
enum {
    QF_SN_DIR = 0,
    QF_SN_DISK = 1,
    QF_SN_INFO = 2,
    QF_SN_VMDIR = 3,
    QF_SN_VMFILE = 4, /* "raw", or the first section; section i is +i */
};

/* What an inode number stands for. */
enum qf_type {
    QF_T_ROOT,
    QF_T_DISK,
    QF_T_INFO,
    QF_T_SNAPSHOTS,
    QF_T_BACKING,
    QF_T_LAYER,
    QF_T_SN_DIR,
    QF_T_SN_DISK,
    QF_T_SN_INFO,
    QF_T_SN_VMDIR,
    QF_T_SN_RAW,
    QF_T_SN_SECTION,
};

/* ------------------------------------------------------------ state */

/* One section of a snapshot's VM state container. */
struct qf_section {
    char *name;  /* as stored */
    char *fname; /* as listed (escaped) */
    uint64_t size;
};

/* One internal snapshot, as last seen in the snapshot table. */
struct qf_snap {
    uint64_t num;  /* inode range number (invariant 2) */
    unsigned refs; /* the table's reference + one per user */
    bool present;  /* still in the image's snapshot table */
    bool matched;  /* scratch for qf_snap_refresh() */
    char *id;
    char *name;
    char *fname; /* directory name under snapshots/ */
    uint64_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_ns;
    uint64_t vm_state_size;
    uint64_t disk_size;
    int64_t icount;

    /* Opened on first use, closed when the last user goes (invariant 4). */
    qsnap_view *view;
    unsigned n_view;
    qsnap_vmstate *vs;
    unsigned n_vs;

    /* The VM state's shape, read once (a snapshot never changes). */
    bool vs_known;
    bool vs_sections;
    uint64_t vs_size;
    struct qf_section *secs;
    uint32_t n_secs;
};

/* One image below the top of the chain (backing/). */
struct qf_layer {
    char *fname; /* name under backing/ */
    char *path;  /* as the library resolved it */
    int format;
    uint64_t size;
    qsnap_image *img; /* open while some file handle uses it */
    unsigned n_open;
};

/* Options from the command line. */
struct qf_opts {
    bool rw;
    bool direct_io;      /* no page cache for any file */
    bool foreground;     /* log to stderr rather than syslog */
    bool debug;          /* log every failed request */
    uint64_t cache_size; /* the library's metadata cache; 0: default */
};

struct qf_handle;

struct qf_fs {
    qsnap_image *img;
    struct fuse_session *se;
    struct qf_opts o;
    char *image_path; /* absolute */
    uid_t uid;
    gid_t gid;
    struct timespec start;
    _Atomic uint64_t size; /* the live disk's virtual size */
    _Atomic uint64_t bulk_unsynced; /* large writes since writeback began */
    struct qf_handle *handles;      /* open files, under lock */

    pthread_mutex_t snap_lock; /* invariant 3 */
    pthread_mutex_t lock;
    pthread_cond_t released; /* signalled when a view or reader closes */
    struct qf_snap **snaps;  /* in snapshot table order */
    size_t n_snaps;
    size_t cap_snaps;
    uint64_t next_num;

    struct qf_layer *layers; /* depth 1 .. n_layers */
    uint32_t n_layers;
};

/* ------------------------------------------------------------ fuse_fs.c */

/* The low-level operations table. */
extern const struct fuse_lowlevel_ops qf_ops;

/* Frees the open-file handles left when the session has ended. */
void qf_release_all(struct qf_fs *fs);

/* Logs one line: stderr in the foreground, syslog when daemonised. */
void qf_log(const struct qf_fs *fs, const char *fmt, ...) QF_PRINTF(2, 3);

/* ------------------------------------------------------------ fuse_snap.c */

/* Sets up the tables and reads the chain; returns 0 or a negative errno. */
int qf_fs_init(struct qf_fs *fs);

/* Closes every lazily opened handle and frees the tables. */
void qf_fs_fini(struct qf_fs *fs);

/*
 * Re-reads the snapshot table into fs->snaps: entries are matched by ID
 * and date, new ones get the next number, vanished ones are dropped.
 * Caller holds fs->snap_lock.  Returns 0 or a negative errno.
 */
int qf_snap_refresh(struct qf_fs *fs);

/* The entry with number `num`, referenced, or NULL.  Takes fs->lock. */
struct qf_snap *qf_snap_get_num(struct qf_fs *fs, uint64_t num);

/* The present entry listed as `fname`, referenced, or NULL.  fs->lock. */
struct qf_snap *qf_snap_get_fname(struct qf_fs *fs, const char *fname);

/* Drops a reference (freeing a removed entry).  Takes fs->lock. */
void qf_snap_put(struct qf_fs *fs, struct qf_snap *sn);

/*
 * Opens (or shares) the snapshot's view or VM state reader for one file
 * handle.  Caller holds fs->snap_lock.  Returns 0 or a negative errno.
 */
int qf_snap_view_acquire(struct qf_fs *fs, struct qf_snap *sn);
int qf_snap_vs_acquire(struct qf_fs *fs, struct qf_snap *sn);

/* Drops a file handle's use; the last one closes.  Takes fs->lock. */
void qf_snap_view_release(struct qf_fs *fs, struct qf_snap *sn);
void qf_snap_vs_release(struct qf_fs *fs, struct qf_snap *sn);

/*
 * Learns whether the snapshot's VM state is raw or a container and, for a
 * container, its sections (once).  Caller holds fs->snap_lock.
 */
int qf_snap_probe_vmstate(struct qf_fs *fs, struct qf_snap *sn);

/*
 * Deletes the snapshot, waiting up to a few seconds for file handles the
 * kernel is still releasing.  Caller holds fs->snap_lock.
 */
int qf_snap_delete(struct qf_fs *fs, struct qf_snap *sn);

/* Opens (or shares) a backing layer for one file handle; releases one. */
int qf_layer_acquire(struct qf_fs *fs, struct qf_layer *l);
void qf_layer_release(struct qf_fs *fs, struct qf_layer *l);

/*
 * Escapes a stored name for listing: '%' and '/' become %25 and %2F, and
 * the names "." and ".." have their dots escaped.  Returns a malloc'ed
 * string, or NULL when out of memory or the result is longer than a name
 * may be (the caller then lists a stand-in).
 */
char *qf_name_encode(const char *name);

/*
 * The reverse, for names given to mkdir and rename: fails (NULL, errno
 * EINVAL) on a '%' not followed by two hex digits or an escaped NUL.
 */
char *qf_name_decode(const char *fname);

/* ------------------------------------------------------------ fuse_json.c */

/*
 * Builds the text of info.json for the open image (the same document as
 * `qsnap-img info --output=json`).  Returns 0 and a malloc'ed text in
 * *out (length *len), or a negative errno.
 */
int qf_json_image_info(struct qf_fs *fs, char **out, size_t *len);

/* Builds the text of snapshots/NAME/info.json. */
int qf_json_snap_info(const struct qf_snap *sn, char **out, size_t *len);

#endif /* QSNAP_FUSE_H */
