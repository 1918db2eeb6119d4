/*
 * qs_int.h - libqsnap's private umbrella: the image structure and the
 * internal interfaces between modules.
 *
 * Layering: io < endian < header < cache < refcount < cluster <
 * snapshot/check < image.  Lower modules never call higher ones.
 *
 * Locking (see also include/qsnap.h):
 *   img->lock (rwlock): guest reads hold it shared, in-place writes only
 *       while they look up their clusters; anything that changes metadata
 *       holds it exclusive.
 *       Allocating writes drop it while their data goes to disk; whole-
 *       image operations take it with qs_lock_exclusive(), which waits for
 *       those writes to end (cluster.c, "unlocked allocation").
 *   img->meta_mtx: the caches (entry lookup, load, eviction), the error
 *       message.  Always taken after img->lock, never the other way.
 * Functions named qs_* below expect img->lock held exclusively unless they
 * say otherwise.
 */
#ifndef QS_INT_H
#define QS_INT_H

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "qs_cache.h"
#include "qs_compress.h"
#include "qs_endian.h"
#include "qs_header.h"
#include "qs_io.h"
#include "qsnap.h"

/* Internal open flag: this image is a backing file. */
#define QS_OPEN_BACKING (1u << 31)

#define QS_MIN(a, b) ((a) < (b) ? (a) : (b))
#define QS_MAX(a, b) ((a) > (b) ? (a) : (b))
#define QS_DIV_ROUND_UP(n, d) (((n) + (d)-1) / (d))

/* L1/L2 entry bits (spec: "Cluster mapping"). */
#define QS_OFLAG_COPIED (UINT64_C(1) << 63)
#define QS_OFLAG_COMPRESSED (UINT64_C(1) << 62)
#define QS_OFLAG_ZERO (UINT64_C(1) << 0)
#define QS_L1E_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define QS_L1E_RESERVED UINT64_C(0x7f000000000001ff)
#define QS_L2E_OFFSET_MASK UINT64_C(0x00fffffffffffe00)
#define QS_L2E_RESERVED UINT64_C(0x3f000000000001fe)
#define QS_RT_OFFSET_MASK UINT64_C(0xfffffffffffffe00)

/* What a guest cluster (or subcluster) maps to. */
enum qs_ctype {
    QS_C_UNALLOC,    /* falls through to the backing file, or zeros */
    QS_C_ZERO_PLAIN, /* reads as zeros, no host cluster */
    QS_C_ZERO_ALLOC, /* reads as zeros, host cluster kept */
    QS_C_NORMAL,     /* data at host_off */
    QS_C_COMPRESSED, /* compressed data at a byte offset */
};

struct qs_snapshot {
    uint64_t l1_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_ns;
    uint64_t vm_state_size;
    uint64_t disk_size;
    int64_t icount;
    uint32_t extra_size;    /* as read; rewritten at least 24 */
    uint8_t *extra_unknown; /* extra data past the fields we know */
    uint32_t extra_unknown_len;
};

/* A queued refcount decrement, applied once the pointer drop is durable. */
struct qs_pending_free {
    uint64_t host_off;
    uint64_t len;
};

struct qsnap_image {
    char *filename;
    int format; /* QSNAP_FMT_QCOW2 or QSNAP_FMT_RAW */
    unsigned open_flags;
    uint64_t cache_size; /* as opened, for reopening the backing chain */
    bool rw;
    bool corrupt; /* metadata damage seen, or switch_failed: no more writes */
    /* A header switch was written but not flushed (qs_header_switch). */
    bool switch_failed;
    qs_io *io;
    uint64_t file_size; /* host file size as far as we grew it */
    /* The host file is allocated up to here, past file_size when space
     * was reserved ahead (refcount.c, "Reserving ahead"); 0: nothing
     * reserved.  Under the exclusive lock. */
    uint64_t reserved_end;
    bool reserve_off; /* the host file cannot reserve: no more tries */
    /* Reserved host bytes in [zero_lo, zero_hi) read as zeros: nothing
     * was allocated or written there since (empty when zero_lo >= zero_hi).
     * Under the exclusive lock. */
    uint64_t zero_lo, zero_hi;

    pthread_rwlock_t lock;
    pthread_mutex_t meta_mtx;
    /* Allocating writes in flight (cluster.c, "unlocked allocation"):
     * the list and drainers under img->lock, job_gen under job_mtx;
     * job_cond signals job_gen and inplace_inflight changes. */
    struct qs_write_job *jobs;
    unsigned drainers;
    unsigned inplace_inflight; /* under job_mtx */
    pthread_mutex_t job_mtx;
    pthread_cond_t job_cond;
    uint64_t job_gen;
    pthread_mutex_t err_mtx; /* guards errmsg only */
    char errmsg[1024];

    /* raw images: only io, file_size and virtual_size below are used */
    uint64_t virtual_size;

    struct qs_header hdr;
    uint32_t cluster_bits;
    uint64_t cluster_size;
    uint32_t l2_bits; /* log2 of entries per L2 table */
    uint64_t l2_entries;
    bool ext_l2;
    uint32_t sc_bits; /* log2 of the subcluster size */
    uint32_t rb_bits; /* log2 of refcount entries per block */
    uint32_t refcount_order;
    uint64_t refcount_max;
    uint32_t csize_shift; /* compressed descriptor: sector count shift */
    uint64_t csize_mask;
    uint64_t coffset_mask;

    uint64_t *l1; /* active L1, host byte order */
    uint32_t l1_size;
    bool l1_dirty;
    uint32_t l1_dirty_lo, l1_dirty_hi; /* dirty index range, inclusive */

    struct qsnap_image *backing; /* NULL: unallocated reads as zeros */

    uint64_t *rt; /* refcount table, host byte order */
    uint64_t rt_size;

    qs_cache *l2_cache;
    qs_cache *rb_cache;

    uint64_t free_cluster_hint; /* no free cluster below this index */
    uint64_t free_byte_offset;  /* compressed allocation cursor, or 0 */

    struct qs_pending_free *pending;
    size_t n_pending;
    size_t cap_pending;

    struct qs_snapshot *snapshots;
    uint32_t n_snapshots;
    uint64_t snapshot_table_bytes;

    bool dirty_marked; /* lazy refcounts: the dirty bit is on disk */
    bool txn_dirty;    /* set by qs_txn_begin, cleared by qs_txn_end */

    struct qsnap_view *views;      /* open snapshot views (exclusive lock) */
    struct qsnap_checkpoint *ckpt; /* the open checkpoint, if any */
};

struct qsnap_view {
    struct qsnap_image *img;
    uint64_t l1_offset; /* identifies the snapshot */
    uint64_t *l1;
    uint32_t l1_size;
    uint64_t size;
    struct qsnap_view *next;
};

/* ---------------------------------------------------------------- error */
void qs_fmt_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Sets the handle's message; returns `code`. */
int qs_error(struct qsnap_image *img, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Records metadata corruption: message, image flagged, -EUCLEAN. */
int qs_corrupt(struct qsnap_image *img, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
#define QS_CORRUPT(img, ...) qs_corrupt((img), __VA_ARGS__)

/* ---------------------------------------------------------------- raw */
int qs_raw_read(struct qsnap_image *img, const struct iovec *iov, int n,
                uint64_t off, uint64_t len);
int qs_raw_block_status(struct qsnap_image *img, uint64_t off, uint64_t len,
                        uint64_t *pnum, unsigned *flags);

/* ---------------------------------------------------------------- host */
/* Metadata I/O helpers that keep img->file_size current. */
int qs_host_write(struct qsnap_image *img, const void *buf, size_t len,
                  uint64_t host_off);
/* qs_host_writev and qs_write flags. */
enum {
    /* Data written once and not read back soon (VM state): goes through
     * qs_io_pwritev_bulk, past the host's cache where it can. */
    QS_WRITE_BULK = 1u << 0,
};
int qs_host_writev(struct qsnap_image *img, const struct iovec *iov, int n,
                   uint64_t host_off, unsigned wflags);
int qs_host_read(struct qsnap_image *img, void *buf, size_t len,
                 uint64_t host_off);
void *qs_alloc_buf(size_t len); /* page-aligned, for O_DIRECT */

/* ---------------------------------------------------------------- refcount */
int qs_refcount_init(struct qsnap_image *img);
/* Entry i of a refcount block buffer, at the image's refcount width. */
uint64_t qs_rb_get(const struct qsnap_image *img, const uint8_t *blk,
                   uint64_t i);
void qs_rb_set(const struct qsnap_image *img, uint8_t *blk, uint64_t i,
               uint64_t v);
int qs_refcount_get(struct qsnap_image *img, uint64_t cluster_idx,
                    uint64_t *rc);
/* Adds `delta` to every cluster touched by [host_off, host_off+len). */
int qs_refcount_update(struct qsnap_image *img, uint64_t host_off, uint64_t len,
                       int64_t delta);
int qs_refcount_set(struct qsnap_image *img, uint64_t cluster_idx,
                    uint64_t value);
/* n contiguous clusters with refcount 1. */
int qs_alloc_clusters(struct qsnap_image *img, uint64_t n, uint64_t *host_off);
/* Up to max_n contiguous clusters at the first free spot; *zeroed (if not
 * NULL) tells whether they are known to read as zeros. */
int qs_alloc_run(struct qsnap_image *img, uint64_t max_n, uint64_t *host_off,
                 uint64_t *n_got, bool *zeroed);
/* Byte allocation for compressed data (may share a host cluster). */
int qs_alloc_bytes(struct qsnap_image *img, uint64_t len, uint64_t *host_off);
/* Queues a decrement for after the next metadata sync. */
int qs_free_deferred(struct qsnap_image *img, uint64_t host_off, uint64_t len);
/* Cuts off space reserved past the image's last cluster. */
int qs_reserve_release(struct qsnap_image *img);
/* Applies queued decrements; punches holes, truncates a free tail. */
int qs_refcount_drain(struct qsnap_image *img);
uint64_t qs_refcount_covered_clusters(const struct qsnap_image *img);
/* Truncates the file after its last used cluster. */
int qs_refcount_trim(struct qsnap_image *img);

/* ---------------------------------------------------------------- cluster */
struct qs_mapping {
    enum qs_ctype type;
    bool copied;       /* NORMAL, refcount 1 (L1 and L2 COPIED): writable
                          in place */
    uint64_t host_off; /* NORMAL/ZERO_ALLOC: host offset of guest_off;
                          COMPRESSED: descriptor start */
    uint64_t csize;    /* COMPRESSED: bytes to read */
    uint64_t len;      /* bytes from guest_off with this mapping */
};

int qs_l1_validate_entry(struct qsnap_image *img, const uint64_t *l1,
                         uint32_t idx, uint64_t *l2_off);
/* Describes the mapping at guest_off (shared lock suffices). */
int qs_map(struct qsnap_image *img, uint64_t guest_off, uint64_t len,
           struct qs_mapping *m);
int qs_map_l1(struct qsnap_image *img, const uint64_t *l1, uint32_t l1_size,
              uint64_t guest_off, uint64_t len, struct qs_mapping *m);
int qs_read(struct qsnap_image *img, const struct iovec *iov, int n,
            uint64_t guest_off, uint64_t len);
/* Reads through any L1 table (a snapshot's), shared lock suffices. */
int qs_read_l1(struct qsnap_image *img, const uint64_t *l1, uint32_t l1_size,
               const struct iovec *iov, int n, uint64_t guest_off,
               uint64_t len);
/* Where an in-place write goes: guest bytes [pos, pos + len) of the
 * request at host_off. */
struct qs_extent {
    uint64_t host_off, pos, len;
};
struct qs_inplace_plan {
    size_t n;
    struct qs_extent *ext; /* local, or allocated for long requests */
    struct qs_extent local[8];
};
/*
 * Shared lock held.  Returns 1 if every cluster of the request is owned
 * (COPIED): then write with qs_inplace_data after dropping the lock and
 * finish with qs_inplace_end.  0 if the exclusive path is needed (nothing
 * done), or -errno.
 */
int qs_inplace_begin(struct qsnap_image *img, uint64_t guest_off, uint64_t len,
                     struct qs_inplace_plan *p);
/* No lock needed. */
int qs_inplace_data(struct qsnap_image *img, const struct qs_inplace_plan *p,
                    const struct iovec *iov, int n);
void qs_inplace_end(struct qsnap_image *img, struct qs_inplace_plan *p);
/* Exclusive lock held: returns once no in-place write is in flight. */
void qs_inplace_wait_idle(struct qsnap_image *img);
int qs_write(struct qsnap_image *img, const struct iovec *iov, int n,
             uint64_t guest_off, uint64_t len, unsigned wflags);

/* One contiguous host run of an allocating write (cluster.c). */
struct qs_alloc_run {
    uint64_t l2_idx; /* first entry in its L2 table */
    uint64_t host;   /* host offset of the run */
    uint64_t got;    /* clusters */
    bool fresh;      /* allocated for this write (not rewritten) */
    bool zeroed;     /* fresh space known to read as zeros */
    bool bulk;       /* QS_WRITE_BULK */
    uint64_t skip;   /* bytes of the run left unwritten at its start */
    uint8_t *head_buf, *tail_buf;
    struct iovec *iov; /* old head, the request's bytes, old tail */
    int iovcnt;
};

#define QS_JOB_MAX_CLUSTERS 16

/* An allocating write whose data is written without the lock. */
struct qs_write_job {
    struct qs_write_job *next; /* img->jobs */
    uint64_t guest_lo, guest_hi; /* the guest clusters it owns */
    uint64_t l1_idx;
    int n_runs;
    struct qs_alloc_run runs[QS_JOB_MAX_CLUSTERS];
};

/*
 * Exclusive lock held.  Returns 1 if the request became a job (write its
 * data with qs_write_job_data without the lock, then call qs_write_end
 * with the lock), 0 if it must go through qs_write, or -errno.
 */
int qs_write_begin(struct qsnap_image *img, const struct iovec *iov, int n,
                   uint64_t guest_off, uint64_t len, struct qs_write_job *job);
/* No lock needed. */
int qs_write_job_data(struct qsnap_image *img, const struct qs_write_job *job);
/* Exclusive lock held; `ret` is qs_write_job_data's result. */
int qs_write_end(struct qsnap_image *img, struct qs_write_job *job, int ret);
/*
 * Exclusive lock held.  If a job owns part of [guest_off, +len), waits
 * (dropping the lock) until some job ends and returns true: look again.
 */
bool qs_jobs_wait_range(struct qsnap_image *img, uint64_t guest_off,
                        uint64_t len);
/* Takes img->lock exclusively once no job is in flight. */
void qs_lock_exclusive(struct qsnap_image *img);
enum qs_zero_mode {
    QS_ZERO_WRITE,     /* reads as zeros; keep allocations unless unmap */
    QS_ZERO_DISCARD,   /* reads as zeros; free whole clusters */
    QS_ZERO_UNALLOCATE /* whole clusters fall through to the backing file */
};
int qs_zero(struct qsnap_image *img, uint64_t guest_off, uint64_t len,
            enum qs_zero_mode mode, bool may_unmap);
int qs_write_compressed(struct qsnap_image *img, const void *cbuf, size_t clen,
                        const void *raw, uint64_t guest_off);
int qs_l1_grow(struct qsnap_image *img, uint32_t min_size);
int qs_preallocate(struct qsnap_image *img, int mode);
int qs_meta_sync(struct qsnap_image *img);
/* Writes the incompatible-features field with the dirty bit set or clear,
 * and flushes it. */
int qs_dirty_bit_write(struct qsnap_image *img, bool on);
int qs_mark_dirty(struct qsnap_image *img);
/* Brackets a change of refcounts and COPIED flags (see cluster.c). */
int qs_txn_begin(struct qsnap_image *img);
int qs_txn_end(struct qsnap_image *img);
uint64_t qs_l2_entry_get(const struct qsnap_image *img, const void *l2,
                         uint64_t idx, uint64_t *bitmap);
enum qs_ctype qs_l2_entry_type(const struct qsnap_image *img, uint64_t e);
void qs_compressed_range(const struct qsnap_image *img, uint64_t e,
                         uint64_t *host_off, uint64_t *len);
bool qs_overlaps_metadata(const struct qsnap_image *img, uint64_t host_off,
                          uint64_t len);

/* ---------------------------------------------------------------- snapshot */
int qs_snapshot_table_load(struct qsnap_image *img);
void qs_snapshot_table_free(struct qsnap_image *img);
/* Reads an L1 table into host byte order (caller frees). */
int qs_l1_load(struct qsnap_image *img, uint64_t off, uint32_t n,
               uint64_t **out);
/* Sets COPIED in the active tables exactly where refcount == 1. */
int qs_refresh_copied(struct qsnap_image *img);
/*
 * +1 (immediately) or -1 (deferred) on every L2 table and data cluster
 * under l1[0..n); with clear_copied also drops COPIED in those L2 tables.
 */
int qs_tree_refcount(struct qsnap_image *img, const uint64_t *l1, uint32_t n,
                     int delta, bool clear_copied);
int qs_snapshot_create_locked(struct qsnap_image *img, const char *name,
                              const struct qsnap_snapshot_opts *o,
                              uint64_t vm_state_size);
int qs_snapshot_check_name(struct qsnap_image *img, const char *name);
/* Index of the snapshot with that ID (first) or name, or -ENOENT. */
int qs_snapshot_lookup(struct qsnap_image *img, const char *key);
bool qs_view_open_on(const struct qsnap_image *img, uint64_t l1_offset);
/* Writes the snapshot table anew (after entries changed in memory). */
int qs_snapshot_table_rewrite(struct qsnap_image *img);
/* Syncs metadata and applies every queued free. */
int qs_settle(struct qsnap_image *img);

/* ---------------------------------------------------------------- vmstate */
/* Guest offset of the VM state area for a disk of `disk_size` bytes. */
uint64_t qs_vmstate_offset(const struct qsnap_image *img, uint64_t disk_size);
/* Drops the active L1's VM state area (entries past the disk). */
int qs_vmstate_drop(struct qsnap_image *img);

/* ---------------------------------------------------------------- header */
/* Rewrites cluster 0 from img->hdr. */
int qs_header_write(struct qsnap_image *img);
int qs_header_write_field(struct qsnap_image *img, uint32_t off,
                          const void *data, size_t len);
/*
 * The commit point of a metadata switch: writes header bytes [off, +len)
 * and flushes them.  On failure before the write, the old state stands.
 * If the flush fails, the file names the new state but a crash may still
 * bring the old one back: qs_switch_failed() stops the handle, so that
 * both stay intact on disk.  Callers keep their old state unless 0.
 */
int qs_header_switch(struct qsnap_image *img, uint32_t off, const void *data,
                     size_t len);
/* Stops all writes after a failed flush of header bytes [off, off + len)
 * that were written; returns err. */
int qs_switch_failed(struct qsnap_image *img, int err, uint32_t off,
                     size_t len);
/* Why writes are refused once img->corrupt is set, for messages. */
const char *qs_stop_reason(const struct qsnap_image *img);

/* ---------------------------------------------------------------- image */
/*
 * Opens an image over an existing io back-end (tests: in-memory and
 * fault-injecting files).  The image owns `io` afterwards, also on error.
 */
int qs_open_io(const char *name, qs_io *io, const struct qsnap_open_opts *o,
               struct qsnap_image **out, char *err, size_t errlen);

/* Resolves a backing name against img's directory, as QEMU does. */
int qs_backing_path(const struct qsnap_image *img, const char *name,
                    char *path, size_t len);
/* Closes and opens img's backing chain again from its header. */
int qs_reopen_backing(struct qsnap_image *img);

/* ---------------------------------------------------------------- check */
int qs_check(struct qsnap_image *img, unsigned flags,
             struct qsnap_check_result *res, qsnap_check_report_fn report,
             void *opaque);
/* Recomputes every refcount from the metadata and writes fresh refcount
 * structures at the end of the file (dirty images, check -r all). */
int qs_rebuild_refcounts(struct qsnap_image *img);

#endif /* QS_INT_H */
