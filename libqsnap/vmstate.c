/*
 * vmstate.c - VM state in the image: the checkpoint transaction (save
 * side), VM state readers (restore side) and the section container.
 *
 * Where the state lives (QEMU-compatible): at guest offset
 * ceil(disk_size / span) * span of the active L1, span being the bytes one
 * L2 table maps.  It is written there before the snapshot is created, so
 * the snapshot's L1 captures it, and dropped from the active L1 after.
 *
 * The section container is qsnap's own format, docs/vmstate-format.md:
 *
 *   superblock (64 bytes at offset 0; 4 KiB reserved)
 *     0 magic "QSNAPVMS"   8 version (1)   12 chunk_size   16 n_sections
 *     20 reserved   24 dir_offset   32 dir_size   40 dir_hash (XXH64)
 *     48 data_end   56 sb_hash (XXH64 of bytes 0..55)
 *   chunk data (zstd frames or raw bytes), back to back
 *   directory at dir_offset, per section:
 *     0 name_len (u16)  2 reserved (6)  8 size  16 n_chunks
 *     24 section_hash: XXH64 (seed = size) of its chunk records
 *     32 name, zero-padded to a multiple of 8
 *     then n_chunks records of 24 bytes:
 *       0 offset  8 stored_len (u32)  12 kind (u32: 0 zero, 1 zstd, 2 raw)
 *       16 XXH64 of the chunk's uncompressed bytes
 *   All integers big-endian.
 *
 * Invariants:
 *   1. Before commit no snapshot entry exists: an interrupted checkpoint
 *      leaves at most clusters in the active VM state area, which the next
 *      checkpoint (or abort) drops.
 *   2. Every container field is validated against the area's size before
 *      use; every chunk read is checked against its hash; the chunk table
 *      of a section is checked against the section hash when opened.
 *   3. Chunks are encoded (zero test, hash, zstd) a batch at a time, by the
 *      caller's thread and a helper thread taking chunks from a shared
 *      counter, and are written strictly in order once the whole batch is
 *      done; the helper touches nothing but the slots it took.
 *   4. The encoded bytes are gathered in two output buffers: the caller's
 *      thread fills one while a writer thread writes the other into the
 *      area, so that putting them into the host file overlaps with the
 *      encoding.  Every write of the area has ended before the checkpoint
 *      commits, aborts or writes its directory.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>
#include <zstd.h>

#include "qs_int.h"

#define VMS_MAGIC "QSNAPVMS"
#define VMS_VERSION 1u
#define VMS_SB_LEN 64u
#define VMS_DATA_START 4096u
#define VMS_CHUNK_SIZE (128u << 10)
#define VMS_MIN_CHUNK (4u << 10)
#define VMS_MAX_CHUNK (16u << 20)
#define VMS_MAX_DIR (64u << 20)
#define VMS_MAX_SECTIONS 65536u
#define VMS_MAX_NAME 255u
#define VMS_OUTBUF (4u << 20)
/* Bytes of VM state written between two writeback hints. */
#define VMS_WRITEBACK_STEP (32u << 20)
/* Chunks encoded together: the caller's thread and one helper share them. */
#define VMS_BATCH 16u
/*
 * zstd level for chunks: one of the fast negative levels, as memory images
 * are large and the save is CPU-bound.  On bench/vmsavebench.c's 2 GiB
 * image, -2 against 1: 10-15% less CPU, 0.7% more bytes stored.
 */
#ifndef VMS_ZSTD_LEVEL
#define VMS_ZSTD_LEVEL (-2)
#endif

enum { CHUNK_ZERO = 0, CHUNK_ZSTD = 1, CHUNK_RAW = 2 };

struct chunk_rec {
    uint64_t offset;
    uint32_t stored_len;
    uint32_t kind;
    uint64_t hash;
};

struct section {
    char name[VMS_MAX_NAME + 1];
    uint64_t size;
    uint64_t n_chunks;
    uint64_t stored;
    struct chunk_rec *chunks;
    uint64_t cap_chunks;
};

uint64_t qs_vmstate_offset(const struct qsnap_image *img, uint64_t disk_size)
{
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    return ((disk_size + (1ull << span_bits) - 1) >> span_bits) << span_bits;
}

int qs_vmstate_drop(struct qsnap_image *img)
{
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    const uint64_t first =
        qs_vmstate_offset(img, img->virtual_size) >> span_bits;
    bool any = false;
    for (uint64_t i = first; i < img->l1_size; i++) {
        if (img->l1[i] & QS_L1E_OFFSET_MASK) {
            any = true;
            break;
        }
    }
    if (!any) {
        return 0;
    }
    /* Release the tree, then clear the entries; the frees wait until the
     * cleared L1 is on disk (qs_settle syncs before it drains). */
    int ret = qs_tree_refcount(img, img->l1 + first,
                               (uint32_t)(img->l1_size - first), -1, false);
    if (ret < 0) {
        return ret;
    }
    for (uint64_t i = first; i < img->l1_size; i++) {
        if (img->l1[i]) {
            img->l1[i] = 0;
            if (!img->l1_dirty) {
                img->l1_dirty = true;
                img->l1_dirty_lo = (uint32_t)i;
                img->l1_dirty_hi = (uint32_t)i;
            }
            img->l1_dirty_lo = QS_MIN(img->l1_dirty_lo, (uint32_t)i);
            img->l1_dirty_hi = QS_MAX(img->l1_dirty_hi, (uint32_t)i);
        }
    }
    return qs_settle(img);
}

/* ------------------------------------------------------------ save */

/* One chunk on its way into the container. */
struct enc_slot {
    uint8_t *in; /* VMS_CHUNK_SIZE bytes */
    uint32_t len;
    bool zero; /* a whole zero chunk, found in the caller's buffer */
    uint32_t section; /* index in ck->sections */
    uint32_t kind;    /* results of encoding: */
    uint32_t stored_len;
    uint64_t hash;
    uint8_t *z; /* ZSTD_compressBound(VMS_CHUNK_SIZE) bytes */
};

/* Chunks that fill up together and are encoded together. */
struct batch {
    struct enc_slot slots[VMS_BATCH];
    uint32_t n;       /* full slots; slots[n] is being filled */
    atomic_uint next; /* next slot to take for encoding */
};

/*
 * Double-buffered encoder (invariant 3): while the caller fills one batch,
 * the helper thread encodes the other; when the caller's batch is full,
 * its thread takes what is left of the other one, waits for the helper to
 * finish, writes it out, and hands over the full one.
 */
struct encoder {
    struct batch b[2];
    unsigned fill;      /* the batch being filled */
    bool in_flight;     /* b[!fill] is handed over, not yet written */
    ZSTD_CCtx *cctx[2]; /* [0] the caller's, [1] the helper's */
    uint64_t zero_hash; /* of a whole zero chunk */

    bool helper; /* the helper thread runs */
    pthread_t thread;
    pthread_mutex_t mtx;
    pthread_cond_t go, done;
    uint64_t given;    /* batches handed to the helper */
    uint64_t finished; /* batches it has finished */
    unsigned work;     /* the batch it is to encode */
    bool quit;
};

/*
 * The output writer (invariant 4).  Without a second processor there is
 * no thread and out_flush() writes in the caller's thread.
 */
struct out_writer {
    bool thread_ok;
    pthread_t thread;
    pthread_mutex_t mtx;
    pthread_cond_t go, done;
    struct qsnap_checkpoint *ck;
    const uint8_t *buf; /* handed over: buf[0..len) goes to area offset off */
    size_t len;
    uint64_t off;
    bool busy; /* a buffer is handed over and not yet written */
    bool quit;
    int err; /* the first failed write */
};

struct qsnap_checkpoint {
    struct qsnap_image *img;
    char *name;
    struct qsnap_snapshot_opts opts;
    unsigned flags;
    uint64_t base; /* guest offset of the VM state area */
    uint64_t pos;  /* raw: bytes written; sections: end of chunk data */
    int error;     /* sticky: a failed write dooms the checkpoint */
    uint64_t unsynced; /* bytes written since the last writeback hint */

    /* section container writer */
    struct section *sections;
    uint32_t n_sections;
    bool in_section;
    uint8_t *out_buf[2];
    uint8_t *out; /* the one being filled */
    size_t out_fill;
    uint64_t out_pos; /* container offset of out[0] */
    struct encoder *enc;
    struct out_writer *writer;
};

static int area_write(struct qsnap_checkpoint *ck, const void *buf, size_t len,
                      uint64_t off, unsigned wflags)
{
    struct qsnap_image *img = ck->img;
    struct iovec v = {(void *)buf, len};
    if (!len) {
        return 0;
    }
    qs_lock_exclusive(img);
    int ret = img->corrupt ? -EROFS
                           : qs_write(img, &v, 1, ck->base + off, len, wflags);
    pthread_rwlock_unlock(&img->lock);
    /* VM state is gigabytes written once, all flushed at the commit: get
     * the disk going on it now rather than all at once then. */
    ck->unsynced += len;
    if (ret == 0 && ck->unsynced >= VMS_WRITEBACK_STEP) {
        ck->unsynced = 0;
        qs_io_start_writeback(img->io);
    }
    return ret;
}

static void *writer_main(void *arg)
{
    struct out_writer *w = arg;
    pthread_mutex_lock(&w->mtx);
    for (;;) {
        while (!w->busy && !w->quit) {
            pthread_cond_wait(&w->go, &w->mtx);
        }
        if (!w->busy) {
            break; /* quit, with nothing left to write */
        }
        pthread_mutex_unlock(&w->mtx);
        const int ret =
            area_write(w->ck, w->buf, w->len, w->off, QS_WRITE_BULK);
        pthread_mutex_lock(&w->mtx);
        if (ret < 0 && !w->err) {
            w->err = ret;
        }
        w->busy = false;
        pthread_cond_signal(&w->done);
    }
    pthread_mutex_unlock(&w->mtx);
    return NULL;
}

static struct out_writer *writer_new(struct qsnap_checkpoint *ck)
{
    struct out_writer *w = calloc(1, sizeof(*w));
    if (!w) {
        return NULL;
    }
    w->ck = ck;
    pthread_mutex_init(&w->mtx, NULL);
    pthread_cond_init(&w->go, NULL);
    pthread_cond_init(&w->done, NULL);
    if (sysconf(_SC_NPROCESSORS_ONLN) > 1 &&
        pthread_create(&w->thread, NULL, writer_main, w) == 0) {
        w->thread_ok = true;
    }
    return w;
}

/* Waits until the writer is idle; returns the first error it met. */
static int writer_wait(struct out_writer *w)
{
    if (!w || !w->thread_ok) {
        return 0;
    }
    pthread_mutex_lock(&w->mtx);
    while (w->busy) {
        pthread_cond_wait(&w->done, &w->mtx);
    }
    const int err = w->err;
    pthread_mutex_unlock(&w->mtx);
    return err;
}

/* Ends the thread after the write it holds, and frees the writer. */
static void writer_free(struct out_writer *w)
{
    if (!w) {
        return;
    }
    if (w->thread_ok) {
        pthread_mutex_lock(&w->mtx);
        w->quit = true;
        pthread_cond_signal(&w->go);
        pthread_mutex_unlock(&w->mtx);
        pthread_join(w->thread, NULL);
    }
    pthread_mutex_destroy(&w->mtx);
    pthread_cond_destroy(&w->go);
    pthread_cond_destroy(&w->done);
    free(w);
}

/* Sends the output buffer to the area and switches to the other one. */
static int out_flush(struct qsnap_checkpoint *ck)
{
    struct out_writer *w = ck->writer;
    const size_t len = ck->out_fill;
    const uint64_t off = ck->out_pos;
    ck->out_pos += len;
    ck->out_fill = 0;
    if (!len) {
        return 0;
    }
    if (!w->thread_ok) {
        return area_write(ck, ck->out, len, off, QS_WRITE_BULK);
    }
    /* The writer is done with the other buffer once it is idle. */
    const int ret = writer_wait(w);
    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&w->mtx);
    w->buf = ck->out;
    w->len = len;
    w->off = off;
    w->busy = true;
    pthread_cond_signal(&w->go);
    pthread_mutex_unlock(&w->mtx);
    ck->out = ck->out == ck->out_buf[0] ? ck->out_buf[1] : ck->out_buf[0];
    return 0;
}

static int out_put(struct qsnap_checkpoint *ck, const void *p, size_t len)
{
    while (len) {
        const size_t n = QS_MIN(len, VMS_OUTBUF - ck->out_fill);
        memcpy(ck->out + ck->out_fill, p, n);
        ck->out_fill += n;
        p = (const uint8_t *)p + n;
        len -= n;
        if (ck->out_fill == VMS_OUTBUF) {
            int ret = out_flush(ck);
            if (ret < 0) {
                return ret;
            }
        }
    }
    return 0;
}

static bool all_zero(const uint8_t *p, size_t len)
{
    /* 64 bytes a step (the compiler vectorises the OR), then words. */
    size_t i = 0;
    for (; i + 64 <= len; i += 64) {
        uint64_t w[8];
        memcpy(w, p + i, sizeof(w));
        if (w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) {
            return false;
        }
    }
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        if (w) {
            return false;
        }
    }
    for (; i < len; i++) {
        if (p[i]) {
            return false;
        }
    }
    return true;
}

/* Zero test, hash and compression of one chunk; never fails (a chunk
 * zstd cannot shrink is stored raw). */
static void encode_slot(const struct encoder *e, struct enc_slot *sl,
                        ZSTD_CCtx *cctx)
{
    if (sl->zero || all_zero(sl->in, sl->len)) {
        sl->kind = CHUNK_ZERO;
        sl->stored_len = 0;
        sl->hash = sl->len == VMS_CHUNK_SIZE ? e->zero_hash
                                             : XXH64(sl->in, sl->len, 0);
        return;
    }
    sl->hash = XXH64(sl->in, sl->len, 0);
    const size_t zl =
        ZSTD_compressCCtx(cctx, sl->z, ZSTD_compressBound(VMS_CHUNK_SIZE),
                          sl->in, sl->len, VMS_ZSTD_LEVEL);
    if (!ZSTD_isError(zl) && zl < sl->len) {
        sl->kind = CHUNK_ZSTD;
        sl->stored_len = (uint32_t)zl;
    } else {
        sl->kind = CHUNK_RAW;
        sl->stored_len = sl->len;
    }
}

/* Takes slots from the batch's counter until it is used up. */
static void encode_some(const struct encoder *e, struct batch *b,
                        ZSTD_CCtx *cctx)
{
    for (;;) {
        const unsigned i = atomic_fetch_add(&b->next, 1);
        if (i >= b->n) {
            return;
        }
        encode_slot(e, &b->slots[i], cctx);
    }
}

static void *helper_main(void *arg)
{
    struct encoder *e = arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&e->mtx);
    for (;;) {
        while (e->given == seen && !e->quit) {
            pthread_cond_wait(&e->go, &e->mtx);
        }
        if (e->quit) {
            break;
        }
        seen = e->given;
        struct batch *b = &e->b[e->work];
        pthread_mutex_unlock(&e->mtx);
        encode_some(e, b, e->cctx[1]);
        pthread_mutex_lock(&e->mtx);
        e->finished = seen;
        pthread_cond_signal(&e->done);
    }
    pthread_mutex_unlock(&e->mtx);
    return NULL;
}

static void encoder_free(struct encoder *e)
{
    if (!e) {
        return;
    }
    if (e->helper) {
        pthread_mutex_lock(&e->mtx);
        e->quit = true;
        pthread_cond_signal(&e->go);
        pthread_mutex_unlock(&e->mtx);
        pthread_join(e->thread, NULL);
    }
    pthread_mutex_destroy(&e->mtx);
    pthread_cond_destroy(&e->go);
    pthread_cond_destroy(&e->done);
    for (unsigned k = 0; k < 2; k++) {
        for (unsigned i = 0; i < VMS_BATCH; i++) {
            free(e->b[k].slots[i].in);
            free(e->b[k].slots[i].z);
        }
    }
    ZSTD_freeCCtx(e->cctx[0]);
    ZSTD_freeCCtx(e->cctx[1]);
    free(e);
}

static struct encoder *encoder_new(void)
{
    struct encoder *e = calloc(1, sizeof(*e));
    if (!e) {
        return NULL;
    }
    pthread_mutex_init(&e->mtx, NULL);
    pthread_cond_init(&e->go, NULL);
    pthread_cond_init(&e->done, NULL);
    bool ok = true;
    for (unsigned k = 0; k < 2; k++) {
        for (unsigned i = 0; i < VMS_BATCH && ok; i++) {
            struct enc_slot *sl = &e->b[k].slots[i];
            sl->in = malloc(VMS_CHUNK_SIZE);
            sl->z = malloc(ZSTD_compressBound(VMS_CHUNK_SIZE));
            ok = sl->in && sl->z;
        }
    }
    e->cctx[0] = ZSTD_createCCtx();
    e->cctx[1] = ZSTD_createCCtx();
    if (!ok || !e->cctx[0] || !e->cctx[1]) {
        encoder_free(e);
        return NULL;
    }
    memset(e->b[0].slots[0].in, 0, VMS_CHUNK_SIZE);
    e->zero_hash = XXH64(e->b[0].slots[0].in, VMS_CHUNK_SIZE, 0);
    /* A helper only where there is a second processor to run it. */
    if (sysconf(_SC_NPROCESSORS_ONLN) > 1 &&
        pthread_create(&e->thread, NULL, helper_main, e) == 0) {
        e->helper = true;
    }
    return e;
}

/* Appends one encoded chunk to its section and to the output. */
static int emit_slot(struct qsnap_checkpoint *ck, const struct enc_slot *sl)
{
    struct section *s = &ck->sections[sl->section];
    if (s->n_chunks == s->cap_chunks) {
        const uint64_t cap = s->cap_chunks ? s->cap_chunks * 2 : 64;
        struct chunk_rec *c = realloc(s->chunks, cap * sizeof(*c));
        if (!c) {
            return -ENOMEM;
        }
        s->chunks = c;
        s->cap_chunks = cap;
    }
    struct chunk_rec *r = &s->chunks[s->n_chunks++];
    r->kind = sl->kind;
    r->stored_len = sl->stored_len;
    r->hash = sl->hash;
    r->offset = sl->kind == CHUNK_ZERO ? 0 : ck->out_pos + ck->out_fill;
    s->stored += sl->stored_len;
    switch (sl->kind) {
    case CHUNK_ZSTD:
        return out_put(ck, sl->z, sl->stored_len);
    case CHUNK_RAW:
        return out_put(ck, sl->in, sl->len);
    default:
        return 0;
    }
}

/* Finishes encoding the batch in flight (helping the helper) and writes
 * it out in order. */
static int drain_in_flight(struct qsnap_checkpoint *ck)
{
    struct encoder *e = ck->enc;
    if (!e->in_flight) {
        return 0;
    }
    struct batch *b = &e->b[!e->fill];
    encode_some(e, b, e->cctx[0]);
    if (e->helper) {
        pthread_mutex_lock(&e->mtx);
        while (e->finished != e->given) {
            pthread_cond_wait(&e->done, &e->mtx);
        }
        pthread_mutex_unlock(&e->mtx);
    }
    e->in_flight = false;
    int ret = 0;
    for (unsigned i = 0; i < b->n && ret == 0; i++) {
        ret = emit_slot(ck, &b->slots[i]);
    }
    for (unsigned i = 0; i < VMS_BATCH; i++) {
        b->slots[i].len = 0;
        b->slots[i].zero = false;
    }
    b->n = 0;
    return ret;
}

/* Writes out the batch in flight and hands over the one being filled. */
static int batch_flush(struct qsnap_checkpoint *ck)
{
    struct encoder *e = ck->enc;
    int ret = drain_in_flight(ck);
    struct batch *b = &e->b[e->fill];
    if (ret < 0 || !b->n) {
        return ret;
    }
    atomic_store(&b->next, 0);
    if (e->helper) {
        pthread_mutex_lock(&e->mtx);
        e->work = e->fill;
        e->given++;
        pthread_cond_signal(&e->go);
        pthread_mutex_unlock(&e->mtx);
    }
    e->in_flight = true;
    e->fill = !e->fill;
    return 0;
}

/* Closes the slot being filled (if it holds anything); hands the batch
 * over when it is full. */
static int slot_close(struct qsnap_checkpoint *ck)
{
    struct encoder *e = ck->enc;
    struct batch *b = &e->b[e->fill];
    struct enc_slot *sl = &b->slots[b->n];
    if (!sl->len) {
        return 0;
    }
    sl->section = ck->n_sections - 1;
    b->n++;
    return b->n == VMS_BATCH ? batch_flush(ck) : 0;
}

static void ck_free(struct qsnap_checkpoint *ck)
{
    for (uint32_t i = 0; i < ck->n_sections; i++) {
        free(ck->sections[i].chunks);
    }
    free(ck->sections);
    writer_free(ck->writer);
    free(ck->out_buf[0]);
    free(ck->out_buf[1]);
    encoder_free(ck->enc);
    free(ck->name);
    free(ck);
}

QSNAP_API int qsnap_checkpoint_begin(qsnap_image *img, const char *name,
                                     const struct qsnap_snapshot_opts *opts,
                                     unsigned flags, qsnap_checkpoint **out)
{
    if (!img || !out || (flags & ~(unsigned)QSNAP_CHECKPOINT_SECTIONS)) {
        return -EINVAL;
    }
    struct qsnap_checkpoint *ck = calloc(1, sizeof(*ck));
    if (!ck) {
        return -ENOMEM;
    }
    qsnap_snapshot_opts_init(&ck->opts);
    if (opts) {
        memcpy(&ck->opts, opts, QS_MIN(opts->struct_size, sizeof(ck->opts)));
    }
    ck->img = img;
    ck->flags = flags;
    ck->name = name ? strdup(name) : NULL;
    if (flags & QSNAP_CHECKPOINT_SECTIONS) {
        /* Aligned, for the direct writes of bulk data. */
        ck->out_buf[0] = qs_alloc_buf(VMS_OUTBUF);
        ck->out_buf[1] = qs_alloc_buf(VMS_OUTBUF);
        ck->out = ck->out_buf[0];
        ck->enc = encoder_new();
        ck->writer = writer_new(ck);
        ck->pos = VMS_DATA_START;
        ck->out_pos = VMS_DATA_START;
    }
    if ((name && !ck->name) ||
        ((flags & QSNAP_CHECKPOINT_SECTIONS) &&
         (!ck->out_buf[0] || !ck->out_buf[1] || !ck->enc || !ck->writer))) {
        ck_free(ck);
        return -ENOMEM;
    }

    qs_lock_exclusive(img);
    int ret = 0;
    if (img->format != QSNAP_FMT_QCOW2 || !img->rw || img->corrupt) {
        ret = qs_error(img, -EROFS,
                       "%s: checkpoints need a writable qcow2 "
                       "image",
                       img->filename);
    } else if (img->ckpt) {
        ret = qs_error(img, -EBUSY, "%s: a checkpoint is already open",
                       img->filename);
    } else {
        ret = qs_snapshot_check_name(img, name);
    }
    if (ret == 0 && img->refcount_max < 2) {
        ret = qs_error(img, -EOVERFLOW,
                       "%s: refcount_bits=1 images cannot hold snapshots",
                       img->filename);
    }
    if (ret == 0) {
        ret = qs_mark_dirty(img);
    }
    if (ret == 0) {
        /* Leftovers of an interrupted checkpoint go first (invariant 1). */
        ret = qs_vmstate_drop(img);
    }
    if (ret == 0) {
        ck->base = qs_vmstate_offset(img, img->virtual_size);
        img->ckpt = ck;
    }
    pthread_rwlock_unlock(&img->lock);
    if (ret < 0) {
        ck_free(ck);
        return ret;
    }
    *out = ck;
    return 0;
}

static int ck_usable(struct qsnap_checkpoint *ck, bool sections)
{
    if (!ck) {
        return -EINVAL;
    }
    if (ck->error) {
        return ck->error;
    }
    if (!!(ck->flags & QSNAP_CHECKPOINT_SECTIONS) != sections) {
        return qs_error(ck->img, -EINVAL,
                        "%s: checkpoint '%s' was begun for %s",
                        ck->img->filename, ck->name,
                        sections ? "raw VM state" : "sections");
    }
    return 0;
}

QSNAP_API int qsnap_checkpoint_write(qsnap_checkpoint *ck, const void *buf,
                                     size_t len)
{
    int ret = ck_usable(ck, false);
    if (ret == 0 && len && !buf) {
        ret = -EINVAL;
    }
    if (ret < 0) {
        return ret; /* a refused call changes nothing */
    }
    ret = area_write(ck, buf, len, ck->pos, 0);
    if (ret < 0) {
        ck->error = ret; /* a failed write dooms the checkpoint */
        return ret;
    }
    ck->pos += len;
    return 0;
}

QSNAP_API int qsnap_checkpoint_section_begin(qsnap_checkpoint *ck,
                                             const char *name)
{
    int ret = ck_usable(ck, true);
    if (ret < 0) {
        return ret;
    }
    struct qsnap_image *img = ck->img;
    if (ck->in_section) {
        return qs_error(img, -EINVAL, "%s: section '%s' is still open",
                        img->filename, ck->sections[ck->n_sections - 1].name);
    }
    if (!name || !name[0] || strlen(name) > VMS_MAX_NAME) {
        return qs_error(img, -EINVAL, "%s: section names must be 1 to %u bytes",
                        img->filename, VMS_MAX_NAME);
    }
    for (uint32_t i = 0; i < ck->n_sections; i++) {
        if (strcmp(ck->sections[i].name, name) == 0) {
            return qs_error(img, -EEXIST, "%s: section '%s' already exists",
                            img->filename, name);
        }
    }
    if (ck->n_sections >= VMS_MAX_SECTIONS) {
        return qs_error(img, -EFBIG, "%s: too many sections", img->filename);
    }
    struct section *s =
        realloc(ck->sections, (ck->n_sections + 1) * sizeof(*s));
    if (!s) {
        return -ENOMEM;
    }
    ck->sections = s;
    s = &ck->sections[ck->n_sections++];
    memset(s, 0, sizeof(*s));
    snprintf(s->name, sizeof(s->name), "%s", name);
    ck->in_section = true;
    return 0;
}

QSNAP_API int qsnap_checkpoint_section_write(qsnap_checkpoint *ck,
                                             const void *buf, size_t len)
{
    int ret = ck_usable(ck, true);
    if (ret < 0) {
        return ret;
    }
    if (!ck->in_section) {
        return qs_error(ck->img, -EINVAL, "%s: no section is open",
                        ck->img->filename);
    }
    struct section *s = &ck->sections[ck->n_sections - 1];
    struct encoder *e = ck->enc;
    const uint8_t *p = buf;
    while (len && ret == 0) {
        struct batch *b = &e->b[e->fill];
        struct enc_slot *sl = &b->slots[b->n];
        if (!sl->len && len >= VMS_CHUNK_SIZE &&
            all_zero(p, VMS_CHUNK_SIZE)) {
            /* Half of a guest's memory is zero pages: no copy for them. */
            sl->zero = true;
            sl->len = VMS_CHUNK_SIZE;
            s->size += VMS_CHUNK_SIZE;
            p += VMS_CHUNK_SIZE;
            len -= VMS_CHUNK_SIZE;
            ret = slot_close(ck);
            continue;
        }
        const size_t n = QS_MIN(len, VMS_CHUNK_SIZE - sl->len);
        memcpy(sl->in + sl->len, p, n);
        sl->len += (uint32_t)n;
        s->size += n;
        p += n;
        len -= n;
        if (sl->len == VMS_CHUNK_SIZE) {
            ret = slot_close(ck);
        }
    }
    if (ret < 0) {
        ck->error = ret;
    }
    return ret;
}

QSNAP_API int qsnap_checkpoint_section_end(qsnap_checkpoint *ck)
{
    int ret = ck_usable(ck, true);
    if (ret < 0) {
        return ret;
    }
    if (!ck->in_section) {
        return qs_error(ck->img, -EINVAL, "%s: no section is open",
                        ck->img->filename);
    }
    ret = slot_close(ck);
    ck->in_section = false;
    if (ret < 0) {
        ck->error = ret;
    }
    return ret;
}

static uint64_t section_hash(const struct section *s, const uint8_t *recs)
{
    return XXH64(recs, s->n_chunks * 24, s->size);
}

static void encode_recs(const struct section *s, uint8_t *p)
{
    for (uint64_t c = 0; c < s->n_chunks; c++) {
        const struct chunk_rec *r = &s->chunks[c];
        qs_be64_store(p + c * 24, r->offset);
        qs_be32_store(p + c * 24 + 8, r->stored_len);
        qs_be32_store(p + c * 24 + 12, r->kind);
        qs_be64_store(p + c * 24 + 16, r->hash);
    }
}

/* Directory and superblock; returns the container's total size. */
static int finish_container(struct qsnap_checkpoint *ck, uint64_t *total)
{
    /* Hand over the last batch, then write it out too. */
    int ret = batch_flush(ck);
    if (ret == 0) {
        ret = drain_in_flight(ck);
    }
    if (ret == 0) {
        ret = out_flush(ck);
    }
    if (ret == 0) {
        ret = writer_wait(ck->writer);
    }
    if (ret < 0) {
        return ret;
    }
    const uint64_t dir_off = ck->out_pos;
    uint64_t dir_size = 0;
    for (uint32_t i = 0; i < ck->n_sections; i++) {
        const struct section *s = &ck->sections[i];
        dir_size +=
            32 + ((strlen(s->name) + 7) & ~(size_t)7) + s->n_chunks * 24;
    }
    if (dir_size > VMS_MAX_DIR) {
        return qs_error(ck->img, -EFBIG,
                        "%s: VM state directory of %" PRIu64
                        " bytes is too large",
                        ck->img->filename, dir_size);
    }
    uint8_t *dir = calloc(1, dir_size ? dir_size : 1);
    if (!dir) {
        return -ENOMEM;
    }
    uint8_t *p = dir;
    for (uint32_t i = 0; i < ck->n_sections; i++) {
        const struct section *s = &ck->sections[i];
        const size_t nl = strlen(s->name);
        const size_t name_pad = (nl + 7) & ~(size_t)7;
        qs_be16_store(p, (uint16_t)nl);
        qs_be64_store(p + 8, s->size);
        qs_be64_store(p + 16, s->n_chunks);
        memcpy(p + 32, s->name, nl);
        uint8_t *recs = p + 32 + name_pad;
        encode_recs(s, recs);
        qs_be64_store(p + 24, section_hash(s, recs));
        p = recs + s->n_chunks * 24;
    }
    ret = area_write(ck, dir, dir_size, dir_off, 0);
    uint8_t sb[VMS_SB_LEN];
    memset(sb, 0, sizeof(sb));
    memcpy(sb, VMS_MAGIC, 8);
    qs_be32_store(sb + 8, VMS_VERSION);
    qs_be32_store(sb + 12, VMS_CHUNK_SIZE);
    qs_be32_store(sb + 16, ck->n_sections);
    qs_be64_store(sb + 24, dir_off);
    qs_be64_store(sb + 32, dir_size);
    qs_be64_store(sb + 40, XXH64(dir, dir_size, 0));
    qs_be64_store(sb + 48, dir_off);
    qs_be64_store(sb + 56, XXH64(sb, 56, 0));
    free(dir);
    if (ret == 0) {
        ret = area_write(ck, sb, sizeof(sb), 0, 0);
    }
    *total = dir_off + dir_size;
    return ret;
}

static void ck_detach(struct qsnap_checkpoint *ck)
{
    if (ck->img->ckpt == ck) {
        ck->img->ckpt = NULL;
    }
}

QSNAP_API int qsnap_checkpoint_commit(qsnap_checkpoint *ck)
{
    if (!ck) {
        return -EINVAL;
    }
    struct qsnap_image *img = ck->img;
    /* No write of the area may land after the drop below (invariant 4). */
    const int werr = writer_wait(ck->writer);
    int ret = ck->error ? ck->error : werr;
    uint64_t size = ck->pos;
    if (ret == 0 && (ck->flags & QSNAP_CHECKPOINT_SECTIONS)) {
        if (ck->in_section) {
            ret = qsnap_checkpoint_section_end(ck);
        }
        if (ret == 0) {
            ret = finish_container(ck, &size);
        }
    }
    qs_lock_exclusive(img);
    if (ret == 0) {
        ret = qs_snapshot_create_locked(img, ck->name, &ck->opts, size);
    }
    /* Committed or not, the live disk drops the area (invariant 1). */
    int r2 = img->corrupt ? 0 : qs_vmstate_drop(img);
    ck_detach(ck);
    pthread_rwlock_unlock(&img->lock);
    ck_free(ck);
    return ret < 0 ? ret : r2;
}

QSNAP_API int qsnap_checkpoint_abort(qsnap_checkpoint *ck)
{
    if (!ck) {
        return -EINVAL;
    }
    struct qsnap_image *img = ck->img;
    (void)writer_wait(ck->writer); /* its error no longer matters */
    qs_lock_exclusive(img);
    int ret = img->corrupt ? 0 : qs_vmstate_drop(img);
    ck_detach(ck);
    pthread_rwlock_unlock(&img->lock);
    ck_free(ck);
    return ret;
}

/* ------------------------------------------------------------ restore */

struct qsnap_vmstate {
    struct qsnap_view view; /* registers the reader, pins the snapshot */
    uint64_t base;
    uint64_t size;
    bool container;
    uint32_t chunk_size;
    uint64_t data_end;
    struct section *sections;
    uint32_t n_sections;

    pthread_mutex_t mtx; /* guards the decoded-chunk cache */
    uint8_t *cbuf;
    int64_t cached_sec;
    uint64_t cached_chunk;
    ZSTD_DCtx *dctx;
};

static int area_read(struct qsnap_vmstate *vs, void *buf, size_t len,
                     uint64_t off)
{
    struct qsnap_image *img = vs->view.img;
    struct iovec v = {buf, len};
    if (!len) {
        return 0;
    }
    pthread_rwlock_rdlock(&img->lock);
    int ret = qs_read_l1(img, vs->view.l1, vs->view.l1_size, &v, 1,
                         vs->base + off, len);
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

static int cmp_section_name(const void *a, const void *b)
{
    return strcmp((*(const struct section *const *)a)->name,
                  (*(const struct section *const *)b)->name);
}

/* Section names are unique (reads go by name): sorted, no two alike. */
static int check_unique_names(struct qsnap_vmstate *vs, const char *fn,
                              const char *snap)
{
    if (vs->n_sections < 2) {
        return 0;
    }
    const struct section **order = malloc(vs->n_sections * sizeof(*order));
    if (!order) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < vs->n_sections; i++) {
        order[i] = &vs->sections[i];
    }
    qsort(order, vs->n_sections, sizeof(*order), cmp_section_name);
    int ret = 0;
    for (uint32_t i = 1; i < vs->n_sections && ret == 0; i++) {
        if (strcmp(order[i - 1]->name, order[i]->name) == 0) {
            ret = qs_error(vs->view.img, -EUCLEAN,
                           "%s: snapshot %s: VM state section name '%s' "
                           "appears twice",
                           fn, snap, order[i]->name);
        }
    }
    free(order);
    return ret;
}

static int parse_container(struct qsnap_vmstate *vs, const char *fn,
                           const char *snap)
{
    struct qsnap_image *img = vs->view.img;
    uint8_t sb[VMS_SB_LEN];
    int ret = area_read(vs, sb, sizeof(sb), 0);
    if (ret < 0) {
        return ret;
    }
    if (memcmp(sb, VMS_MAGIC, 8) != 0) {
        return 0; /* a raw stream (QEMU's) */
    }
    vs->container = true;
#define BADC(...) return QS_CORRUPT(img, __VA_ARGS__)
    if (qs_be64_load(sb + 56) != XXH64(sb, 56, 0)) {
        BADC("%s: snapshot %s: VM state container superblock checksum "
             "mismatch",
             fn, snap);
    }
    const uint32_t version = qs_be32_load(sb + 8);
    vs->chunk_size = qs_be32_load(sb + 12);
    vs->n_sections = qs_be32_load(sb + 16);
    const uint64_t dir_off = qs_be64_load(sb + 24);
    const uint64_t dir_size = qs_be64_load(sb + 32);
    vs->data_end = qs_be64_load(sb + 48);
    if (version != VMS_VERSION) {
        return qs_error(img, -ENOTSUP,
                        "%s: snapshot %s: VM state container version %u "
                        "is not supported",
                        fn, snap, version);
    }
    if (vs->chunk_size < VMS_MIN_CHUNK || vs->chunk_size > VMS_MAX_CHUNK) {
        BADC("%s: snapshot %s: VM state chunk_size %u out of range", fn, snap,
             vs->chunk_size);
    }
    if (vs->n_sections > VMS_MAX_SECTIONS || dir_size > VMS_MAX_DIR ||
        dir_off < VMS_DATA_START || dir_off > vs->size ||
        dir_size > vs->size - dir_off || vs->data_end > dir_off) {
        BADC("%s: snapshot %s: VM state directory (offset %" PRIu64 ", %" PRIu64
             " bytes, %u sections) lies outside the %" PRIu64 "-byte state",
             fn, snap, dir_off, dir_size, vs->n_sections, vs->size);
    }
    uint8_t *dir = malloc(dir_size ? dir_size : 1);
    if (!dir) {
        return -ENOMEM;
    }
    ret = area_read(vs, dir, dir_size, dir_off);
    if (ret == 0 && qs_be64_load(sb + 40) != XXH64(dir, dir_size, 0)) {
        ret = QS_CORRUPT(img,
                         "%s: snapshot %s: VM state directory checksum "
                         "mismatch",
                         fn, snap);
    }
    vs->sections =
        calloc(vs->n_sections ? vs->n_sections : 1, sizeof(*vs->sections));
    if (ret == 0 && !vs->sections) {
        ret = -ENOMEM;
    }
    uint64_t pos = 0;
    const size_t bound = ZSTD_compressBound(vs->chunk_size);
    for (uint32_t i = 0; ret == 0 && i < vs->n_sections; i++) {
        struct section *s = &vs->sections[i];
        if (dir_size - pos < 32) {
            ret = QS_CORRUPT(img,
                             "%s: snapshot %s: VM state directory "
                             "truncated at section %u",
                             fn, snap, i);
            break;
        }
        const uint8_t *p = dir + pos;
        const uint32_t nl = qs_be16_load(p);
        s->size = qs_be64_load(p + 8);
        s->n_chunks = qs_be64_load(p + 16);
        const uint64_t want_chunks =
            s->size / vs->chunk_size + (s->size % vs->chunk_size != 0);
        const uint64_t name_pad = (nl + 7) & ~7u;
        if (nl == 0 || nl > VMS_MAX_NAME || s->n_chunks != want_chunks ||
            s->n_chunks > (dir_size - pos - 32) / 24 ||
            name_pad + s->n_chunks * 24 > dir_size - pos - 32) {
            ret = QS_CORRUPT(img,
                             "%s: snapshot %s: VM state section %u has "
                             "name length %u, size %" PRIu64 " and %" PRIu64
                             " chunks, which do not fit",
                             fn, snap, i, nl, s->size, s->n_chunks);
            break;
        }
        memcpy(s->name, p + 32, nl);
        s->name[nl] = '\0';
        const uint8_t *recs = p + 32 + name_pad;
        if (qs_be64_load(p + 24) != section_hash(s, recs)) {
            ret = QS_CORRUPT(img,
                             "%s: snapshot %s: VM state section '%s': chunk "
                             "table checksum mismatch",
                             fn, snap, s->name);
            break;
        }
        s->chunks = calloc(s->n_chunks ? s->n_chunks : 1, sizeof(*s->chunks));
        if (!s->chunks) {
            ret = -ENOMEM;
            break;
        }
        for (uint64_t c = 0; c < s->n_chunks; c++) {
            struct chunk_rec *r = &s->chunks[c];
            r->offset = qs_be64_load(recs + c * 24);
            r->stored_len = qs_be32_load(recs + c * 24 + 8);
            r->kind = qs_be32_load(recs + c * 24 + 12);
            r->hash = qs_be64_load(recs + c * 24 + 16);
            const uint64_t clen =
                QS_MIN(vs->chunk_size, s->size - c * vs->chunk_size);
            bool ok;
            switch (r->kind) {
            case CHUNK_ZERO:
                ok = r->stored_len == 0;
                break;
            case CHUNK_ZSTD:
                ok = r->stored_len > 0 && r->stored_len <= bound;
                break;
            case CHUNK_RAW:
                ok = r->stored_len == clen;
                break;
            default:
                ok = false;
            }
            if (ok && r->kind != CHUNK_ZERO &&
                (r->offset < VMS_DATA_START || r->offset > vs->data_end ||
                 r->stored_len > vs->data_end - r->offset)) {
                ok = false;
            }
            if (!ok) {
                ret = QS_CORRUPT(
                    img,
                    "%s: snapshot %s: VM state section '%s' "
                    "chunk %" PRIu64 ": kind %u, %u bytes at %" PRIu64
                    " is invalid",
                    fn, snap, s->name, c, r->kind, r->stored_len, r->offset);
                break;
            }
            s->stored += r->stored_len;
        }
        pos += 32 + name_pad + s->n_chunks * 24;
    }
#undef BADC
    free(dir);
    if (ret == 0) {
        ret = check_unique_names(vs, fn, snap);
    }
    if (ret == 0) {
        vs->cbuf = malloc(vs->chunk_size);
        vs->dctx = ZSTD_createDCtx();
        if (!vs->cbuf || !vs->dctx) {
            ret = -ENOMEM;
        }
    }
    return ret;
}

static void vs_free(struct qsnap_vmstate *vs)
{
    if (vs->sections) {
        for (uint32_t i = 0; i < vs->n_sections; i++) {
            free(vs->sections[i].chunks);
        }
    }
    free(vs->sections);
    free(vs->cbuf);
    ZSTD_freeDCtx(vs->dctx);
    free(vs->view.l1);
    pthread_mutex_destroy(&vs->mtx);
    free(vs);
}

QSNAP_API int qsnap_vmstate_open(qsnap_image *img, const char *id_or_name,
                                 qsnap_vmstate **out)
{
    if (!img || !out) {
        return -EINVAL;
    }
    struct qsnap_vmstate *vs = calloc(1, sizeof(*vs));
    if (!vs) {
        return -ENOMEM;
    }
    pthread_mutex_init(&vs->mtx, NULL);
    vs->cached_sec = -1;
    qs_lock_exclusive(img);
    int idx = img->format == QSNAP_FMT_QCOW2
                  ? qs_snapshot_lookup(img, id_or_name)
                  : qs_error(img, -ENOENT,
                             "%s: raw images have no "
                             "snapshots",
                             img->filename);
    int ret = idx < 0 ? idx : 0;
    char snap[64] = "";
    if (ret == 0) {
        const struct qs_snapshot *sn = &img->snapshots[idx];
        snprintf(snap, sizeof(snap), "%.60s", sn->name);
        if (sn->vm_state_size == 0) {
            ret = qs_error(img, -ENODATA,
                           "%s: snapshot '%s' (ID %s) has no VM state",
                           img->filename, sn->name, sn->id);
        } else {
            ret = qs_l1_load(img, sn->l1_offset, sn->l1_size, &vs->view.l1);
            vs->view.img = img;
            vs->view.l1_offset = sn->l1_offset;
            vs->view.l1_size = sn->l1_size;
            vs->view.size = sn->disk_size;
            vs->base = qs_vmstate_offset(img, sn->disk_size);
            vs->size = sn->vm_state_size;
        }
    }
    if (ret == 0) {
        vs->view.next = img->views;
        img->views = &vs->view;
    }
    pthread_rwlock_unlock(&img->lock);
    if (ret == 0 && vs->size >= VMS_SB_LEN) {
        ret = parse_container(vs, img->filename, snap);
        if (ret < 0) {
            qsnap_vmstate_close(vs);
            return ret;
        }
    }
    if (ret < 0) {
        vs_free(vs);
        return ret;
    }
    *out = vs;
    return 0;
}

QSNAP_API uint64_t qsnap_vmstate_size(const qsnap_vmstate *vs)
{
    return vs ? vs->size : 0;
}

QSNAP_API bool qsnap_vmstate_has_sections(const qsnap_vmstate *vs)
{
    return vs && vs->container;
}

QSNAP_API const char *qsnap_vmstate_errmsg(const qsnap_vmstate *vs)
{
    return vs ? qsnap_errmsg(vs->view.img) : "";
}

QSNAP_API int qsnap_vmstate_pread(qsnap_vmstate *vs, void *buf, size_t len,
                                  uint64_t offset)
{
    if (!vs || (len && !buf)) {
        return -EINVAL;
    }
    if (offset > vs->size || len > vs->size - offset) {
        return qs_error(vs->view.img, -EINVAL,
                        "%s: VM state read at %" PRIu64 " length %zu is "
                        "beyond its size %" PRIu64,
                        vs->view.img->filename, offset, len, vs->size);
    }
    return area_read(vs, buf, len, offset);
}

QSNAP_API int qsnap_vmstate_sections(qsnap_vmstate *vs,
                                     struct qsnap_section_info **list,
                                     uint32_t *count)
{
    if (!vs || !list || !count) {
        return -EINVAL;
    }
    const uint32_t n = vs->container ? vs->n_sections : 0;
    struct qsnap_section_info *l = calloc(n ? n : 1, sizeof(*l));
    if (!l) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < n; i++) {
        l[i].struct_size = sizeof(l[i]);
        snprintf(l[i].name, sizeof(l[i].name), "%s", vs->sections[i].name);
        l[i].size = vs->sections[i].size;
        l[i].stored_size = vs->sections[i].stored;
    }
    *list = l;
    *count = n;
    return 0;
}

/* Decodes chunk c of section si into vs->cbuf (mtx held). */
static int load_chunk(struct qsnap_vmstate *vs, uint32_t si, uint64_t c)
{
    struct qsnap_image *img = vs->view.img;
    const struct section *s = &vs->sections[si];
    const struct chunk_rec *r = &s->chunks[c];
    const uint64_t clen = QS_MIN(vs->chunk_size, s->size - c * vs->chunk_size);
    int ret = 0;

    if (vs->cached_sec == (int64_t)si && vs->cached_chunk == c) {
        return 0;
    }
    vs->cached_sec = -1;
    if (r->kind == CHUNK_ZERO) {
        memset(vs->cbuf, 0, clen);
    } else if (r->kind == CHUNK_RAW) {
        ret = area_read(vs, vs->cbuf, clen, r->offset);
    } else {
        uint8_t *z = malloc(r->stored_len);
        if (!z) {
            return -ENOMEM;
        }
        ret = area_read(vs, z, r->stored_len, r->offset);
        if (ret == 0) {
            size_t d =
                ZSTD_decompressDCtx(vs->dctx, vs->cbuf, clen, z, r->stored_len);
            if (ZSTD_isError(d) || d != clen) {
                ret = QS_CORRUPT(img,
                                 "%s: VM state section '%s' chunk %" PRIu64
                                 " does not decompress to %" PRIu64 " bytes",
                                 img->filename, s->name, c, clen);
            }
        }
        free(z);
    }
    if (ret == 0 && XXH64(vs->cbuf, clen, 0) != r->hash) {
        ret = QS_CORRUPT(img,
                         "%s: VM state section '%s' chunk %" PRIu64
                         ": checksum mismatch",
                         img->filename, s->name, c);
    }
    if (ret == 0) {
        vs->cached_sec = si;
        vs->cached_chunk = c;
    }
    return ret;
}

QSNAP_API int qsnap_vmstate_section_pread(qsnap_vmstate *vs,
                                          const char *section, void *buf,
                                          size_t len, uint64_t offset)
{
    if (!vs || !section || (len && !buf)) {
        return -EINVAL;
    }
    struct qsnap_image *img = vs->view.img;
    int64_t si = -1;
    for (uint32_t i = 0; vs->container && i < vs->n_sections; i++) {
        if (strcmp(vs->sections[i].name, section) == 0) {
            si = i;
            break;
        }
    }
    if (si < 0) {
        return qs_error(img, -ENOENT, "%s: no VM state section '%s'",
                        img->filename, section);
    }
    const struct section *s = &vs->sections[si];
    if (offset > s->size || len > s->size - offset) {
        return qs_error(img, -EINVAL,
                        "%s: read at %" PRIu64 " length %zu is beyond "
                        "section '%s' (%" PRIu64 " bytes)",
                        img->filename, offset, len, s->name, s->size);
    }
    pthread_mutex_lock(&vs->mtx);
    int ret = 0;
    uint8_t *p = buf;
    while (len && ret == 0) {
        const uint64_t c = offset / vs->chunk_size;
        const uint64_t in = offset % vs->chunk_size;
        ret = load_chunk(vs, (uint32_t)si, c);
        if (ret < 0) {
            break;
        }
        const uint64_t clen =
            QS_MIN(vs->chunk_size, s->size - c * vs->chunk_size);
        const size_t n = (size_t)QS_MIN(len, clen - in);
        memcpy(p, vs->cbuf + in, n);
        p += n;
        offset += n;
        len -= n;
    }
    pthread_mutex_unlock(&vs->mtx);
    return ret;
}

QSNAP_API void qsnap_vmstate_close(qsnap_vmstate *vs)
{
    if (!vs) {
        return;
    }
    struct qsnap_image *img = vs->view.img;
    if (img) {
        qs_lock_exclusive(img);
        for (struct qsnap_view **pp = &img->views; *pp; pp = &(*pp)->next) {
            if (*pp == &vs->view) {
                *pp = vs->view.next;
                break;
            }
        }
        pthread_rwlock_unlock(&img->lock);
    }
    vs_free(vs);
}
