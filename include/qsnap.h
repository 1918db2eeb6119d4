/*
 * qsnap.h - the public interface of libqsnap, a qcow2 snapshot engine.
 *
 * libqsnap reads and writes qcow2 images (versions 2 and 3, as QEMU writes
 * them) and raw images.  It is meant to be linked into a VMM's block layer
 * and into tools; it never prints, never exits and keeps no global state.
 *
 * Conventions
 *   - Every fallible call returns 0 (or a non-negative count) on success and
 *     a negative errno on failure.  qsnap_strerror() turns the code into
 *     text; qsnap_errmsg() returns the handle's last message, which names
 *     the file, the field and the value involved.
 *   - Calls that have no handle yet take `char *err, size_t errlen` (both
 *     may be NULL/0) and write the message there.
 *   - Options structs begin with `struct_size`; initialise them with the
 *     matching *_init() function so new fields can be added without breaking
 *     the ABI.
 *
 * Threads
 *   A qsnap_image may be shared by any number of threads.  Reads run in
 *   parallel under a shared lock.  Writes hold no lock while their data
 *   goes to disk: one that lands on clusters the image already owns looks
 *   up where they are under the shared lock, and one that needs new
 *   clusters (up to 16 of them) takes the lock exclusively only to
 *   allocate them and, once its data is written, to link them in.  Other
 *   metadata changes (discard, zeroing, flush) take the lock exclusively;
 *   operations on the whole image (snapshots, resize, compaction, commit)
 *   also wait for the writes in flight.  qsnap_close() must not race any
 *   other call on the same handle.  Different handles are independent, but only one
 *   read-write handle per image file may exist (see image locking below).
 *
 * Image locking
 *   Images are locked with open-file-description byte locks exactly as
 *   QEMU's file driver does, so qsnap and QEMU (qemu-img, qemu-io, a
 *   running VM) refuse to write an image the other is using.  Read-only
 *   opens with QSNAP_OPEN_FORCE_SHARE take no exclusive claim, like
 *   `qemu-img -U`.
 */
#ifndef QSNAP_H
#define QSNAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(QSNAP_BUILDING) && defined(__GNUC__)
#define QSNAP_API __attribute__((visibility("default")))
#else
#define QSNAP_API
#endif

#define QSNAP_VERSION_MAJOR 0
#define QSNAP_VERSION_MINOR 1
#define QSNAP_VERSION_PATCH 0

/* Returns the library's version as "MAJOR.MINOR.PATCH". */
QSNAP_API const char *qsnap_version(void);

/* Returns a static description of a (negative or positive) errno code. */
QSNAP_API const char *qsnap_strerror(int err);

/*
 * Allocates `len` bytes suited to I/O with an image: aligned for O_DIRECT
 * (QSNAP_OPEN_NOCACHE) and, from 1 MiB up, rounded up to whole 2 MiB
 * pieces, 2 MiB-aligned and advised to transparent huge pages, so large
 * requests reach the disk in few segments.  Any buffer works with the I/O calls; this one is faster.
 * Free it with qsnap_free_buf().  Returns NULL when out of memory.
 */
QSNAP_API void *qsnap_alloc_buf(size_t len);
QSNAP_API void qsnap_free_buf(void *buf);

typedef struct qsnap_image qsnap_image;

/* ------------------------------------------------------------------ */
/* Opening, creating, closing                                         */
/* ------------------------------------------------------------------ */

enum qsnap_open_flags {
    QSNAP_OPEN_RDWR = 1u << 0,         /* open for writing */
    QSNAP_OPEN_FORCE_SHARE = 1u << 1,  /* read-only, share all (qemu -U) */
    QSNAP_OPEN_NO_BACKING = 1u << 2,   /* do not open backing files */
    QSNAP_OPEN_NOCACHE = 1u << 3,      /* O_DIRECT for aligned data I/O */
    QSNAP_OPEN_WRITETHROUGH = 1u << 4, /* flush after every write */
    QSNAP_OPEN_CHECK = 1u << 5,        /* open damaged/dirty images as they
                                          are, for qsnap_check() */
};

enum qsnap_format {
    QSNAP_FMT_AUTO = 0, /* qcow2 if the magic matches, raw otherwise */
    QSNAP_FMT_QCOW2 = 1,
    QSNAP_FMT_RAW = 2,
};

struct qsnap_open_opts {
    size_t struct_size;  /* sizeof(struct qsnap_open_opts) */
    unsigned flags;      /* enum qsnap_open_flags */
    int format;          /* enum qsnap_format */
    uint64_t cache_size; /* bytes for L2 + refcount caches; 0 = default */
};

/* Fills *opts with defaults (read-only, auto format, default caches). */
QSNAP_API void qsnap_open_opts_init(struct qsnap_open_opts *opts);

/*
 * Opens the image at `path`.  A dirty image (lazy refcounts, crash) opened
 * read-write has its refcounts rebuilt first; an image with the corrupt
 * bit opens read-only only.
 * Returns: 0, -ENOENT, -EACCES, -EINVAL (bad argument), -EUCLEAN (corrupt
 * metadata), -ENOTSUP (unknown incompatible feature, encryption, external
 * data file), -EAGAIN (locked by another process), -EROFS, -ENOMEM, -EIO.
 */
QSNAP_API int qsnap_open(const char *path, const struct qsnap_open_opts *opts,
                         qsnap_image **out, char *err, size_t errlen);

/*
 * Flushes everything and closes.  The handle is freed even on failure; a
 * failure means data written since the last successful qsnap_flush() may
 * not be on disk.
 */
QSNAP_API int qsnap_close(qsnap_image *img);

enum qsnap_prealloc {
    QSNAP_PREALLOC_OFF = 0,
    QSNAP_PREALLOC_METADATA = 1, /* L2 tables and cluster addresses */
    QSNAP_PREALLOC_FALLOC = 2,   /* metadata + fallocate() the data */
    QSNAP_PREALLOC_FULL = 3,     /* metadata + write zeroes */
};

enum qsnap_compression {
    QSNAP_COMPRESSION_ZLIB = 0,
    QSNAP_COMPRESSION_ZSTD = 1,
};

struct qsnap_create_opts {
    size_t struct_size;       /* sizeof(struct qsnap_create_opts) */
    int format;               /* QSNAP_FMT_QCOW2 (default) or _RAW */
    uint64_t size;            /* virtual size in bytes */
    uint32_t cluster_size;    /* 512 .. 2 MiB, power of two; 64 KiB */
    int version;              /* 3 (compat 1.1, default) or 2 (0.10) */
    int refcount_bits;        /* 1, 2, 4, ..., 64; default 16 */
    bool lazy_refcounts;      /* v3 only */
    int compression_type;     /* enum qsnap_compression; v3 only for zstd */
    int prealloc;             /* enum qsnap_prealloc */
    const char *backing_file; /* NULL: none */
    const char *backing_fmt;  /* "qcow2", "raw" or NULL */
};

/* Fills *opts with qemu-img's defaults (v3, 64 KiB, 16-bit, zlib). */
QSNAP_API void qsnap_create_opts_init(struct qsnap_create_opts *opts);

/*
 * Creates a new image at `path`, replacing an existing file.  On a failure
 * after the file was opened, the half-made file is removed.
 * Returns: 0, -EINVAL (bad option, message names it), -EEXIST,
 * -ENOSPC, -EIO, -EAGAIN (the file is locked by another process).
 */
QSNAP_API int qsnap_create(const char *path,
                           const struct qsnap_create_opts *opts, char *err,
                           size_t errlen);

/*
 * The handle's last error message ("" if none).  Owned by the handle and
 * overwritten by the next failure on any thread; threads sharing a handle
 * should use qsnap_errmsg_copy().
 */
QSNAP_API const char *qsnap_errmsg(const qsnap_image *img);

/* Copies the last error message into buf (always NUL-terminated). */
QSNAP_API void qsnap_errmsg_copy(qsnap_image *img, char *buf, size_t len);

/* ------------------------------------------------------------------ */
/* Information                                                        */
/* ------------------------------------------------------------------ */

struct qsnap_info {
    size_t struct_size;    /* set by the caller */
    int format;            /* enum qsnap_format */
    uint64_t virtual_size; /* guest-visible bytes */
    uint64_t file_size;    /* apparent size of the host file */
    uint64_t disk_size;    /* bytes the host file occupies on disk */
    uint32_t cluster_size; /* qcow2 only, below too */
    int version;           /* 2 or 3 */
    int refcount_bits;
    int compression_type;
    bool lazy_refcounts;
    bool dirty;
    bool corrupt;
    bool extended_l2;
    bool read_only;
    uint32_t nb_snapshots;
    char backing_file[1024]; /* as written in the header, "" if none */
    char backing_fmt[32];    /* "" if not recorded */
    char filename[4096];     /* path the image was opened with */
};

/* Fills *info (info->struct_size must be set).  Thread-safe. */
QSNAP_API int qsnap_get_info(qsnap_image *img, struct qsnap_info *info);

/* ------------------------------------------------------------------ */
/* Guest I/O                                                          */
/* ------------------------------------------------------------------ */
/*
 * All offsets and lengths are in bytes, any alignment.  Ranges must lie
 * inside the virtual size (-EINVAL otherwise).  Reads of unallocated
 * ranges return the backing file's data or zeros.  Every call transfers the
 * whole range or fails.
 */
QSNAP_API int qsnap_preadv(qsnap_image *img, const struct iovec *iov,
                           int iovcnt, uint64_t offset);
QSNAP_API int qsnap_pwritev(qsnap_image *img, const struct iovec *iov,
                            int iovcnt, uint64_t offset);
QSNAP_API int qsnap_pread(qsnap_image *img, void *buf, size_t len,
                          uint64_t offset);
QSNAP_API int qsnap_pwrite(qsnap_image *img, const void *buf, size_t len,
                           uint64_t offset);

enum qsnap_zero_flags {
    /* Whole clusters may be deallocated rather than kept allocated. */
    QSNAP_ZERO_MAY_UNMAP = 1u << 0,
};

/* Makes the range read as zeros (zero clusters in v3, where possible). */
QSNAP_API int qsnap_write_zeroes(qsnap_image *img, uint64_t offset,
                                 uint64_t len, unsigned flags);

/*
 * Discards the range: whole clusters are freed (their space reused or
 * returned to the host), partial clusters are zeroed.  Afterwards the range
 * reads as zeros.
 */
QSNAP_API int qsnap_discard(qsnap_image *img, uint64_t offset, uint64_t len);

/*
 * Writes one whole cluster (len == cluster size, offset cluster-aligned, or
 * the final partial cluster of the disk) compressed with the image's
 * compression type.  Compression runs outside the image lock, so several
 * threads calling this compress in parallel.
 */
QSNAP_API int qsnap_write_compressed(qsnap_image *img, const void *buf,
                                     size_t len, uint64_t offset);

/*
 * Starts the host's writeback of the data written so far and returns
 * without waiting for it: a hint for a caller streaming large writes that
 * will flush at the end (the flush then has less left to do).  It may
 * block while the disk's queue is full, so call it off the latency path.
 * Returns 0 or -EINVAL.
 */
QSNAP_API int qsnap_start_writeback(qsnap_image *img);

/* Makes every completed write durable (metadata in crash-safe order). */
QSNAP_API int qsnap_flush(qsnap_image *img);

/*
 * Changes the virtual size.  Shrinking requires QSNAP_RESIZE_SHRINK and
 * that nothing is allocated past the new end.
 */
enum qsnap_resize_flags {
    QSNAP_RESIZE_SHRINK = 1u << 0,
};
QSNAP_API int qsnap_resize(qsnap_image *img, uint64_t new_size, unsigned flags);

enum qsnap_bs_flags {
    QSNAP_BS_DATA = 1u << 0,       /* reads come from stored data */
    QSNAP_BS_ZERO = 1u << 1,       /* reads as zeros */
    QSNAP_BS_ALLOCATED = 1u << 2,  /* the layer at *depth holds the range */
    QSNAP_BS_OFFSET = 1u << 3,     /* *host_off is valid */
    QSNAP_BS_COMPRESSED = 1u << 4, /* stored compressed */
};

/*
 * Describes the range starting at `offset`: *pnum receives how many bytes
 * (at most `len`) share the same status, *flags the QSNAP_BS_* bits,
 * *host_off (may be NULL) the offset in the file named by *depth, and
 * *depth (may be NULL) which layer decides it (0 = this image, 1 its
 * backing file, ...).  QSNAP_BS_ALLOCATED is set when that layer holds the
 * range; a range no layer holds reads as zeros and reports the depth of
 * the bottom layer (or of the first layer shorter than the offset).
 */
QSNAP_API int qsnap_block_status(qsnap_image *img, uint64_t offset,
                                 uint64_t len, uint64_t *pnum, unsigned *flags,
                                 uint64_t *host_off, int *depth);

/* ------------------------------------------------------------------ */
/* Consistency check and repair                                       */
/* ------------------------------------------------------------------ */

enum qsnap_check_flags {
    QSNAP_CHECK_REPAIR_LEAKS = 1u << 0,
    QSNAP_CHECK_REPAIR_ALL = 1u << 1, /* leaks and corruptions */
};

struct qsnap_check_result {
    size_t struct_size;
    uint64_t corruptions;  /* found (after repair: remaining) */
    uint64_t leaks;        /* found (after repair: remaining) */
    uint64_t check_errors; /* I/O errors during the check */
    uint64_t corruptions_fixed;
    uint64_t leaks_fixed;
    uint64_t image_end_offset;
    uint64_t total_clusters;     /* clusters the virtual disk spans */
    uint64_t allocated_clusters; /* of those, allocated in this image */
    uint64_t fragmented_clusters;
    uint64_t compressed_clusters;
    uint64_t referenced_clusters; /* host clusters in use (refcount > 0) */
};

/*
 * Called for each problem found; `level` is 0 for corruptions ("ERROR"),
 * 1 for leaks ("Leaked cluster") and 2 for a mismatch being repaired
 * ("Repairing cluster"); the message is one line, no newline.
 */
typedef void (*qsnap_check_report_fn)(void *opaque, int level, const char *msg);

/*
 * Checks the image's metadata and refcounts against each other; with a
 * repair flag (image opened read-write) fixes what it can.  Open damaged
 * images with QSNAP_OPEN_CHECK so the check sees them as they are.  Takes
 * the image exclusively: other threads' calls wait until it is done.
 * Returns 0 when the check itself ran (look at *res for the findings).
 */
QSNAP_API int qsnap_check(qsnap_image *img, unsigned flags,
                          struct qsnap_check_result *res,
                          qsnap_check_report_fn report, void *opaque);

/* ------------------------------------------------------------------ */
/* Internal snapshots                                                 */
/* ------------------------------------------------------------------ */
/*
 * A snapshot copies only the active L1 table and shares every L2 table and
 * data cluster by reference count; later writes copy on write.  IDs are
 * assigned as QEMU does (max numeric ID + 1).  Calls taking `id_or_name`
 * match an ID first, then a name (the first, if QEMU left duplicates).
 * All snapshot calls take the image lock exclusively; a crash at any point
 * leaves the old or the new snapshot table and at worst leaked clusters.
 */

struct qsnap_snapshot_info {
    size_t struct_size;
    char *id;              /* owned by the list */
    char *name;            /* owned by the list */
    uint64_t date_sec;     /* creation time, seconds since the epoch */
    uint32_t date_nsec;
    uint64_t vm_clock_ns;  /* guest run time */
    uint64_t vm_state_size;
    uint64_t disk_size;    /* virtual size when the snapshot was taken */
    int64_t icount;        /* record/replay instruction count, -1: none */
    uint32_t l1_size;
};

/* Returns the snapshots in table order; free with qsnap_snapshot_list_free.
 * Shared lock.  Returns: 0, -ENOMEM. */
QSNAP_API int qsnap_snapshot_list(qsnap_image *img,
                                  struct qsnap_snapshot_info **list,
                                  uint32_t *count);
QSNAP_API void qsnap_snapshot_list_free(struct qsnap_snapshot_info *list,
                                        uint32_t count);

struct qsnap_snapshot_opts {
    size_t struct_size;
    uint64_t vm_clock_ns; /* guest run time to record; 0 by default */
    int64_t icount;       /* -1 (default): none */
    uint64_t date_sec;    /* 0: now */
    uint32_t date_nsec;
};
QSNAP_API void qsnap_snapshot_opts_init(struct qsnap_snapshot_opts *opts);

/*
 * Creates a snapshot of the current disk named `name` (opts may be NULL).
 * Writes that other threads have issued but that have not returned yet
 * may be in the snapshot in part, as on a disk whose snapshot is taken
 * under running I/O; writes that returned are in it whole.
 * Returns: 0, -EEXIST (the name or an ID with that text exists), -EINVAL
 * (empty or too long name), -EROFS, -EOVERFLOW (refcount_bits too small:
 * 1-bit images cannot share clusters), -ENOSPC, -EIO.
 */
QSNAP_API int qsnap_snapshot_create(qsnap_image *img, const char *name,
                                    const struct qsnap_snapshot_opts *opts);

/* Reverts the disk to the snapshot (it stays in the table).
 * Returns: 0, -ENOENT, -EROFS, -EBUSY (a checkpoint is open), -EIO. */
QSNAP_API int qsnap_snapshot_apply(qsnap_image *img, const char *id_or_name);

/* Deletes a snapshot and frees what only it used.
 * Returns: 0, -ENOENT, -EBUSY (a view or VM state reader is open), -EIO. */
QSNAP_API int qsnap_snapshot_delete(qsnap_image *img, const char *id_or_name);

/* Renames a snapshot.  Returns: 0, -ENOENT, -EEXIST, -EINVAL. */
QSNAP_API int qsnap_snapshot_rename(qsnap_image *img, const char *id_or_name,
                                    const char *new_name);

/*
 * Bytes of host clusters that only this snapshot references: what
 * deleting it would free.  Walks the snapshot's tables (shared lock).
 */
QSNAP_API int qsnap_snapshot_exclusive_size(qsnap_image *img,
                                            const char *id_or_name,
                                            uint64_t *bytes);

/*
 * Moves clusters from the end of the file into free space below and
 * truncates, rewriting every reference to them (L1, L2, refcount table and
 * blocks, snapshot table and snapshot L1s).  Every snapshot is kept.
 * Crash-safe: each moved cluster is copied and flushed before any
 * reference to it changes.  Returns: 0, -EROFS, -EBUSY, -EIO.
 */
typedef void (*qsnap_progress_fn)(void *opaque, uint64_t done,
                                  uint64_t total);
QSNAP_API int qsnap_compact(qsnap_image *img, qsnap_progress_fn progress,
                            void *opaque);

/*
 * Views and VM state readers may be used from several threads at once
 * (reads take the image's lock shared; a VM state reader serialises its
 * chunk cache internally); close them before closing their image.
 */
typedef struct qsnap_view qsnap_view;

/*
 * Opens a read-only view of a snapshot's guest disk.  Reads through the
 * view may run while other threads write the live image; the snapshot
 * cannot be deleted while a view of it is open.
 * Returns: 0, -ENOENT, -ENOMEM, -EUCLEAN.
 */
QSNAP_API int qsnap_view_open(qsnap_image *img, const char *id_or_name,
                              qsnap_view **out);
QSNAP_API uint64_t qsnap_view_size(const qsnap_view *view);
QSNAP_API int qsnap_view_preadv(qsnap_view *view, const struct iovec *iov,
                                int iovcnt, uint64_t offset);
QSNAP_API int qsnap_view_pread(qsnap_view *view, void *buf, size_t len,
                               uint64_t offset);
/* As qsnap_block_status, for the snapshot's disk (depth 0 = this image). */
QSNAP_API int qsnap_view_block_status(qsnap_view *view, uint64_t offset,
                                      uint64_t len, uint64_t *pnum,
                                      unsigned *flags);
QSNAP_API void qsnap_view_close(qsnap_view *view);

/* ------------------------------------------------------------------ */
/* VM state: the VMM save path                                        */
/* ------------------------------------------------------------------ */
/*
 * A checkpoint is a snapshot with the VM's state (memory, devices) stored
 * in the same file, where QEMU stores it: in the guest-invisible area after
 * the virtual disk, captured by the snapshot and dropped from the live disk
 * afterwards.  Nothing is visible before qsnap_checkpoint_commit(), which
 * writes the snapshot table entry last; qsnap_checkpoint_abort() frees
 * everything written.  One checkpoint may be open per image at a time;
 * guest I/O may continue while it is open.
 *
 * The state is either QEMU's raw migration stream (qsnap_checkpoint_write;
 * QEMU's loadvm reads it) or qsnap's section container (named sections,
 * cut into independently zstd-compressed chunks with xxhash checksums;
 * all-zero chunks take no space; see docs/vmstate-format.md).
 */

typedef struct qsnap_checkpoint qsnap_checkpoint;

enum qsnap_checkpoint_flags {
    QSNAP_CHECKPOINT_RAW = 0,           /* a raw byte stream (QEMU's) */
    QSNAP_CHECKPOINT_SECTIONS = 1u << 0 /* the section container */
};

/*
 * Begins a checkpoint named `name` (opts may be NULL).
 * Returns: 0, -EEXIST (name taken), -EBUSY (another checkpoint is open),
 * -EROFS, -EINVAL, -ENOMEM.
 */
QSNAP_API int qsnap_checkpoint_begin(qsnap_image *img, const char *name,
                                     const struct qsnap_snapshot_opts *opts,
                                     unsigned flags, qsnap_checkpoint **out);

/* Appends raw VM state (QSNAP_CHECKPOINT_RAW). */
QSNAP_API int qsnap_checkpoint_write(qsnap_checkpoint *ck, const void *buf,
                                     size_t len);

/*
 * Sections (QSNAP_CHECKPOINT_SECTIONS): begin one, append its bytes in
 * order, end it; then the next.  Names are 1..255 bytes and unique.
 */
QSNAP_API int qsnap_checkpoint_section_begin(qsnap_checkpoint *ck,
                                             const char *name);
QSNAP_API int qsnap_checkpoint_section_write(qsnap_checkpoint *ck,
                                             const void *buf, size_t len);
QSNAP_API int qsnap_checkpoint_section_end(qsnap_checkpoint *ck);

/*
 * Makes the checkpoint a snapshot (state and disk as they are now) and
 * frees `ck`.  On failure nothing is visible and `ck` is freed too.
 */
QSNAP_API int qsnap_checkpoint_commit(qsnap_checkpoint *ck);
/* Discards the checkpoint and frees `ck`.  qsnap_close() does so for a
 * checkpoint still open on the image. */
QSNAP_API int qsnap_checkpoint_abort(qsnap_checkpoint *ck);

typedef struct qsnap_vmstate qsnap_vmstate;

struct qsnap_section_info {
    size_t struct_size;
    char name[256];
    uint64_t size;        /* uncompressed bytes */
    uint64_t stored_size; /* bytes the section takes in the image */
};

/*
 * Opens a snapshot's VM state for reading (restore side).  The snapshot
 * cannot be deleted while it is open.
 * Returns: 0, -ENOENT (no such snapshot), -ENODATA (no VM state),
 * -EUCLEAN (a damaged container), -ENOMEM.
 */
QSNAP_API int qsnap_vmstate_open(qsnap_image *img, const char *id_or_name,
                                 qsnap_vmstate **out);
QSNAP_API uint64_t qsnap_vmstate_size(const qsnap_vmstate *vs);
/* True if the state is a section container, false for a raw stream. */
QSNAP_API bool qsnap_vmstate_has_sections(const qsnap_vmstate *vs);
/* The raw bytes of the VM state area (either kind). */
QSNAP_API int qsnap_vmstate_pread(qsnap_vmstate *vs, void *buf, size_t len,
                                  uint64_t offset);
/* Sections of a container; free the list with free(). */
QSNAP_API int qsnap_vmstate_sections(qsnap_vmstate *vs,
                                     struct qsnap_section_info **list,
                                     uint32_t *count);
/*
 * Reads bytes of one section at any offset; every chunk touched is
 * checksummed.  Returns: 0, -ENOENT, -EINVAL (beyond the section),
 * -EUCLEAN (checksum mismatch; the message names section and chunk).
 */
QSNAP_API int qsnap_vmstate_section_pread(qsnap_vmstate *vs,
                                          const char *section, void *buf,
                                          size_t len, uint64_t offset);
QSNAP_API void qsnap_vmstate_close(qsnap_vmstate *vs);

/* The handle's last error message for VM state and checkpoint calls. */
QSNAP_API const char *qsnap_vmstate_errmsg(const qsnap_vmstate *vs);

/* ------------------------------------------------------------------ */
/* Backing chains and external checkpoints                            */
/* ------------------------------------------------------------------ */
/*
 * An image may have a backing file (qcow2 or raw), which may have its own:
 * a chain.  Relative backing names are resolved against the directory of
 * the image that names them, as QEMU does; names are always taken as file
 * names (never as QEMU's json: or protocol syntax).  Backing files are
 * opened read-only, must be regular files, and a chain may be at most 64
 * images deep; loops are found by device and inode.
 */

struct qsnap_layer_info {
    size_t struct_size;
    char filename[4096];     /* path as opened */
    char backing_name[1024]; /* as written in this layer's header */
    char backing_fmt[32];
    int format;              /* enum qsnap_format */
    uint64_t virtual_size;
    uint64_t allocated_bytes; /* guest bytes this layer decides */
    uint32_t nb_snapshots;
};

/* The chain from `img` (index 0) down to its base; free() the list. */
QSNAP_API int qsnap_chain_list(qsnap_image *img,
                               struct qsnap_layer_info **list,
                               uint32_t *count);

/*
 * External checkpoint, as a VMM takes one: `*img` (read-write) is flushed
 * and frozen, a new qcow2 overlay at `overlay_path` gets it as backing
 * file, and `*img` is replaced by a read-write handle on the overlay.
 * `opts` (may be NULL) gives the overlay's options; its size and backing
 * fields are ignored.  On failure `*img` is still the old, usable handle
 * (reopened if the switch had begun), or NULL if even reopening it failed.
 * Returns: 0, -EEXIST, -EROFS, -EIO, -ENOMEM.
 */
QSNAP_API int qsnap_overlay_push(qsnap_image **img, const char *overlay_path,
                                 const struct qsnap_create_opts *opts);

enum qsnap_commit_flags {
    QSNAP_COMMIT_KEEP = 1u << 0, /* do not empty the committed image (-d) */
};

/*
 * Writes what `top` (and any layer between it and `base`) holds into
 * `base`, a file of top's chain (NULL: top's backing file), growing base
 * if it is smaller.  Without QSNAP_COMMIT_KEEP, and when base is top's
 * backing file, top is emptied afterwards so it reads through to base.
 * `top` must be open read-write.  Returns: 0, -ENOENT (base not in the
 * chain), -EINVAL (no backing file), -EROFS, -EIO.
 */
QSNAP_API int qsnap_commit(qsnap_image *top, const char *base,
                           unsigned flags, qsnap_progress_fn progress,
                           void *opaque);

enum qsnap_rebase_flags {
    QSNAP_REBASE_UNSAFE = 1u << 0, /* only rewrite the backing name (-u) */
};

/*
 * Changes img's backing file to `backing` (NULL or "": none) with format
 * `backing_fmt` (NULL: probe).  The safe mode first copies into img every
 * range where the old and the new backing chains differ and img does not
 * decide, so the guest-visible content stays the same.
 */
QSNAP_API int qsnap_rebase(qsnap_image *img, const char *backing,
                           const char *backing_fmt, unsigned flags,
                           qsnap_progress_fn progress, void *opaque);

/*
 * Copies into img everything it reads from the layers above `base` (NULL:
 * the whole chain), then makes `base` its backing file (NULL: none), so
 * img stands alone down to base.
 */
QSNAP_API int qsnap_stream(qsnap_image *img, const char *base,
                           qsnap_progress_fn progress, void *opaque);

enum qsnap_merge_flags {
    QSNAP_MERGE_AUTO = 0,          /* whichever moves less data */
    QSNAP_MERGE_STREAM = 1u << 0,  /* stream the layer up into its child */
    QSNAP_MERGE_COMMIT = 1u << 1,  /* commit the child down into the layer */
};

/*
 * Merge-on-delete: removes `layer`, a file of the chain below `top_path`,
 * without changing what any remaining layer shows, and keeps every
 * remaining layer at its path.  Either streams the layer's data that its
 * child does not hide into the child and points the child at the layer's
 * backing file, or commits the child into the layer and moves the layer
 * into the child's place.  Copies first, switches the backing pointer,
 * removes the file last: a crash leaves every remaining layer readable with
 * its own content.  The top itself cannot be deleted (that is a revert).
 * Returns: 0, -ENOENT (not in the chain), -EINVAL (the top), -EIO, ...
 */
QSNAP_API int qsnap_checkpoint_delete(const char *top_path,
                                      const char *layer, unsigned flags,
                                      qsnap_progress_fn progress,
                                      void *opaque, char *err,
                                      size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* QSNAP_H */
