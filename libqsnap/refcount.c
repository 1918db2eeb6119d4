/*
 * refcount.c - reference counts of host clusters, allocation and freeing.
 *
 * Spec: docs/interop/qcow2.txt, "Host cluster management".
 *
 * Invariants:
 *   1. A cluster is free exactly when its refcount is 0; clusters past
 *      the refcount table's coverage, or in a range whose refcount block
 *      is missing, are free.
 *   2. No free cluster lies below img->free_cluster_hint.
 *   3. A refcount is never wrapped: overflow is an error, and so is a
 *      decrement below zero (which would mean the metadata lies).
 *   4. A new refcount block is written and flushed before the refcount
 *      table entry that points to it; a new refcount table (with its own
 *      blocks) is written and flushed before the header points to it.
 *   5. Decrements that follow a dropped pointer wait in img->pending
 *      until that drop is on disk (qs_refcount_drain after a sync), so a
 *      freed cluster is never reused while an old pointer to it may
 *      survive a crash.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qs_int.h"

uint64_t qs_rb_get(const struct qsnap_image *img, const uint8_t *blk,
                   uint64_t i)
{
    switch (img->refcount_order) {
    case 3:
        return blk[i];
    case 4:
        return qs_be16_load(blk + 2 * i);
    case 5:
        return qs_be32_load(blk + 4 * i);
    case 6:
        return qs_be64_load(blk + 8 * i);
    default: {
        /* Sub-byte widths pack LSB-first within each byte. */
        const uint32_t bits = 1u << img->refcount_order;
        const uint32_t per_byte = 8u / bits;
        const uint32_t shift = (uint32_t)(i % per_byte) * bits;
        return (blk[i / per_byte] >> shift) & ((1u << bits) - 1);
    }
    }
}

void qs_rb_set(const struct qsnap_image *img, uint8_t *blk, uint64_t i,
               uint64_t v)
{
    switch (img->refcount_order) {
    case 3:
        blk[i] = (uint8_t)v;
        break;
    case 4:
        qs_be16_store(blk + 2 * i, (uint16_t)v);
        break;
    case 5:
        qs_be32_store(blk + 4 * i, (uint32_t)v);
        break;
    case 6:
        qs_be64_store(blk + 8 * i, v);
        break;
    default: {
        const uint32_t bits = 1u << img->refcount_order;
        const uint32_t per_byte = 8u / bits;
        const uint32_t shift = (uint32_t)(i % per_byte) * bits;
        const uint8_t mask = (uint8_t)(((1u << bits) - 1) << shift);
        blk[i / per_byte] =
            (uint8_t)((blk[i / per_byte] & ~mask) | ((v << shift) & mask));
        break;
    }
    }
}

uint64_t qs_refcount_covered_clusters(const struct qsnap_image *img)
{
    return img->rt_size << img->rb_bits;
}

int qs_refcount_init(struct qsnap_image *img)
{
    const struct qs_header *h = &img->hdr;
    const uint64_t bytes =
        (uint64_t)h->refcount_table_clusters * img->cluster_size;

    img->rt_size = bytes / 8;
    img->rt = malloc(bytes);
    if (!img->rt) {
        return qs_error(img, -ENOMEM,
                        "%s: out of memory for the refcount "
                        "table",
                        img->filename);
    }
    int ret = qs_host_read(img, img->rt, bytes, h->refcount_table_offset);
    if (ret < 0) {
        return qs_error(img, ret, "%s: reading the refcount table: %s",
                        img->filename, qsnap_strerror(ret));
    }
    for (uint64_t i = 0; i < img->rt_size; i++) {
        img->rt[i] = qs_be64_load(&img->rt[i]);
    }
    img->free_cluster_hint = 0;
    return 0;
}

/* Offset of the refcount block for table index `rt_idx`, validated. */
static int block_offset(struct qsnap_image *img, uint64_t rt_idx, uint64_t *off)
{
    uint64_t e = img->rt[rt_idx];
    uint64_t o = e & QS_RT_OFFSET_MASK;
    if ((e & ~QS_RT_OFFSET_MASK) || (o & (img->cluster_size - 1)) ||
        o >= img->file_size) {
        return QS_CORRUPT(img,
                          "%s: refcount table entry %" PRIu64 " (0x%016" PRIx64
                          ") is unaligned, has reserved "
                          "bits set or points past the end of the file "
                          "(%" PRIu64 " bytes)",
                          img->filename, rt_idx, e, img->file_size);
    }
    if (o == 0) {
        return QS_CORRUPT(img,
                          "%s: refcount table entry %" PRIu64
                          " points at the header cluster",
                          img->filename, rt_idx);
    }
    *off = o;
    return 0;
}

/* The refcount block for table index `rt_idx`, pinned in the cache. */
static int get_block(struct qsnap_image *img, uint64_t rt_idx, uint8_t **blk)
{
    uint64_t off = 0;
    int ret = block_offset(img, rt_idx, &off);
    if (ret < 0) {
        return ret;
    }
    return qs_cache_get(img->rb_cache, off, false, (void **)blk);
}

int qs_refcount_get(struct qsnap_image *img, uint64_t idx, uint64_t *rc)
{
    const uint64_t rt_idx = idx >> img->rb_bits;
    if (rt_idx >= img->rt_size || img->rt[rt_idx] == 0) {
        *rc = 0;
        return 0;
    }
    uint8_t *blk;
    int ret = get_block(img, rt_idx, &blk);
    if (ret < 0) {
        return ret;
    }
    *rc = qs_rb_get(img, blk, idx & ((1ull << img->rb_bits) - 1));
    qs_cache_put(img->rb_cache, blk);
    return 0;
}

/*
 * Grows the refcount table to at least `min_entries`.  The new table and
 * the blocks describing it go right after the old table's coverage, each
 * block counting the new clusters (invariant 4).
 */
static int grow_reftable(struct qsnap_image *img, uint64_t min_entries)
{
    const uint64_t cs = img->cluster_size;
    const uint64_t per_cluster = cs / 8;
    const uint64_t per_block = 1ull << img->rb_bits;
    const uint64_t start = img->rt_size << img->rb_bits;
    uint64_t n_blocks = 1, n_entries, t_clusters;

    for (;;) {
        n_entries = QS_MAX(min_entries, img->rt_size + img->rt_size / 2);
        n_entries = QS_MAX(n_entries, img->rt_size + n_blocks);
        n_entries = QS_DIV_ROUND_UP(n_entries, per_cluster) * per_cluster;
        t_clusters = n_entries / per_cluster;
        uint64_t need = QS_DIV_ROUND_UP(t_clusters + n_blocks, per_block);
        if (need <= n_blocks) {
            break;
        }
        n_blocks = need;
    }
    if (n_entries * 8 > QS_MAX_REFTABLE_BYTES) {
        return qs_error(img, -EFBIG,
                        "%s: the refcount table would grow to %" PRIu64
                        " bytes, over the limit of %u",
                        img->filename, n_entries * 8, QS_MAX_REFTABLE_BYTES);
    }
    const uint64_t t_off = start * cs;
    const uint64_t b_off = (start + t_clusters) * cs;
    if (b_off + n_blocks * cs > QS_MAX_HOST_OFFSET) {
        return qs_error(img, -EFBIG,
                        "%s: image would exceed the maximum "
                        "host offset",
                        img->filename);
    }

    uint8_t *blocks = qs_alloc_buf(n_blocks * cs);
    uint64_t *table = qs_alloc_buf(n_entries * 8);
    int ret = -ENOMEM;
    if (!blocks || !table) {
        goto out;
    }
    memset(blocks, 0, n_blocks * cs);
    for (uint64_t c = 0; c < t_clusters + n_blocks; c++) {
        qs_rb_set(img, blocks + (c / per_block) * cs, c % per_block, 1);
    }
    memset(table, 0, n_entries * 8);
    for (uint64_t i = 0; i < img->rt_size; i++) {
        qs_be64_store(&table[i], img->rt[i]);
    }
    for (uint64_t j = 0; j < n_blocks; j++) {
        qs_be64_store(&table[img->rt_size + j], b_off + j * cs);
    }

    /* New structures first, flushed; nothing points to them yet. */
    ret = qs_host_write(img, blocks, n_blocks * cs, b_off);
    if (ret == 0) {
        ret = qs_host_write(img, table, n_entries * 8, t_off);
    }
    if (ret == 0) {
        ret = qs_io_flush(img->io);
    }
    if (ret < 0) {
        ret = qs_error(img, ret, "%s: writing a new refcount table: %s",
                       img->filename, qsnap_strerror(ret));
        goto out;
    }

    /* Commit point: one 12-byte header write switches the table. */
    uint8_t field[12];
    qs_be64_store(field, t_off);
    qs_be32_store(field + 8, (uint32_t)t_clusters);
    ret = qs_header_switch(img, QS_HDR_OFF_REFTABLE, field, sizeof(field));
    if (ret < 0) {
        goto out;
    }

    const uint64_t old_off = img->hdr.refcount_table_offset;
    const uint64_t old_clusters = img->hdr.refcount_table_clusters;
    uint64_t *rt = realloc(img->rt, n_entries * 8);
    if (!rt) {
        ret = -ENOMEM;
        goto out;
    }
    img->rt = rt;
    for (uint64_t i = img->rt_size; i < n_entries; i++) {
        img->rt[i] = qs_be64_load(&table[i]);
    }
    img->rt_size = n_entries;
    img->hdr.refcount_table_offset = t_off;
    img->hdr.refcount_table_clusters = (uint32_t)t_clusters;

    /* The old table is unreferenced now; a crash from here leaks it. */
    ret = qs_refcount_update(img, old_off, old_clusters * cs, -1);

out:
    free(blocks);
    free(table);
    return ret;
}

/*
 * Makes sure the refcount block for `rt_idx` exists.  Returns 1 if it
 * placed new structures (the caller must search for space again), 0 if
 * nothing changed, or -errno.
 */
static int ensure_block(struct qsnap_image *img, uint64_t rt_idx)
{
    int placed = 0;
    if (rt_idx >= img->rt_size) {
        int ret = grow_reftable(img, rt_idx + 1);
        if (ret < 0) {
            return ret;
        }
        placed = 1;
    }
    if (img->rt[rt_idx] != 0) {
        return placed;
    }

    /*
     * A missing block means every cluster of its range is free, so the
     * block can describe itself from the first cluster of that range.
     */
    const uint64_t cs = img->cluster_size;
    const uint64_t blk_idx = rt_idx << img->rb_bits;
    if (blk_idx == 0) {
        return QS_CORRUPT(img,
                          "%s: refcount table entry 0 is empty, so "
                          "the header cluster has no refcount",
                          img->filename);
    }
    uint8_t *blk = qs_alloc_buf(cs);
    if (!blk) {
        return -ENOMEM;
    }
    memset(blk, 0, cs);
    qs_rb_set(img, blk, 0, 1);
    int ret = qs_host_write(img, blk, cs, blk_idx * cs);
    free(blk);
    if (ret == 0) {
        ret = qs_io_flush(img->io);
    }
    if (ret < 0) {
        return qs_error(img, ret, "%s: writing a refcount block: %s",
                        img->filename, qsnap_strerror(ret));
    }
    /*
     * Point the table at it.  Its durability comes with the flush that
     * precedes any L2 write relying on these refcounts (cache dependency).
     */
    uint8_t ent[8];
    qs_be64_store(ent, blk_idx * cs);
    ret =
        qs_host_write(img, ent, 8, img->hdr.refcount_table_offset + rt_idx * 8);
    if (ret < 0) {
        return qs_error(img, ret,
                        "%s: writing refcount table entry %" PRIu64 ": %s",
                        img->filename, rt_idx, qsnap_strerror(ret));
    }
    img->rt[rt_idx] = blk_idx * cs;
    qs_cache_mark_unflushed(img->rb_cache);
    return 1;
}

int qs_refcount_update(struct qsnap_image *img, uint64_t host_off, uint64_t len,
                       int64_t delta)
{
    if (len == 0 || delta == 0) {
        return 0;
    }
    const uint64_t first = host_off >> img->cluster_bits;
    const uint64_t last = (host_off + len - 1) >> img->cluster_bits;
    const uint64_t mask = (1ull << img->rb_bits) - 1;

    for (uint64_t idx = first; idx <= last;) {
        const uint64_t rt_idx = idx >> img->rb_bits;
        if (rt_idx >= img->rt_size || img->rt[rt_idx] == 0) {
            if (delta < 0) {
                return QS_CORRUPT(img,
                                  "%s: refcount of cluster 0x%" PRIx64
                                  " would drop below zero",
                                  img->filename, idx << img->cluster_bits);
            }
            int ret = ensure_block(img, rt_idx);
            if (ret < 0) {
                return ret;
            }
            continue;
        }
        uint8_t *blk;
        int ret = get_block(img, rt_idx, &blk);
        if (ret < 0) {
            return ret;
        }
        const uint64_t end = QS_MIN(last, idx | mask);
        for (; idx <= end; idx++) {
            const uint64_t v = qs_rb_get(img, blk, idx & mask);
            if (delta < 0 && v < (uint64_t)-delta) {
                qs_cache_put(img->rb_cache, blk);
                return QS_CORRUPT(img,
                                  "%s: refcount of cluster 0x%" PRIx64
                                  " would drop below zero (it is %" PRIu64 ")",
                                  img->filename, idx << img->cluster_bits, v);
            }
            if (delta > 0 && img->refcount_max - v < (uint64_t)delta) {
                qs_cache_put(img->rb_cache, blk);
                return qs_error(img, -EOVERFLOW,
                                "%s: refcount of cluster 0x%" PRIx64
                                " would exceed %" PRIu64 " (refcount_bits %u)",
                                img->filename, idx << img->cluster_bits,
                                img->refcount_max, 1u << img->refcount_order);
            }
            const uint64_t nv = v + (uint64_t)delta;
            qs_rb_set(img, blk, idx & mask, nv);
            if (nv == 0 && idx < img->free_cluster_hint) {
                img->free_cluster_hint = idx;
            }
        }
        qs_cache_mark_dirty(img->rb_cache, blk);
        qs_cache_put(img->rb_cache, blk);
    }
    return 0;
}

int qs_refcount_set(struct qsnap_image *img, uint64_t idx, uint64_t value)
{
    if (value > img->refcount_max) {
        return qs_error(img, -EOVERFLOW,
                        "%s: refcount %" PRIu64 " of cluster 0x%" PRIx64
                        " exceeds %" PRIu64,
                        img->filename, value, idx << img->cluster_bits,
                        img->refcount_max);
    }
    const uint64_t rt_idx = idx >> img->rb_bits;
    if (rt_idx >= img->rt_size || img->rt[rt_idx] == 0) {
        if (value == 0) {
            return 0;
        }
        int ret = ensure_block(img, rt_idx);
        if (ret < 0) {
            return ret;
        }
        if (rt_idx >= img->rt_size || img->rt[rt_idx] == 0) {
            return -EIO;
        }
    }
    uint8_t *blk;
    int ret = get_block(img, rt_idx, &blk);
    if (ret < 0) {
        return ret;
    }
    qs_rb_set(img, blk, idx & ((1ull << img->rb_bits) - 1), value);
    qs_cache_mark_dirty(img->rb_cache, blk);
    qs_cache_put(img->rb_cache, blk);
    if (value == 0 && idx < img->free_cluster_hint) {
        img->free_cluster_hint = idx;
    }
    return 0;
}

/*
 * First fit from the hint: the start of the first run of `n` free clusters
 * (or, with `partial`, of the first free run, up to n long).
 */
static int find_free(struct qsnap_image *img, uint64_t n, bool partial,
                     uint64_t *start, uint64_t *got)
{
    const uint64_t per_block = 1ull << img->rb_bits;
    uint64_t idx = img->free_cluster_hint;
    uint64_t run_start = idx, run_len = 0;
    bool hint_moved = false;

    for (;;) {
        const uint64_t rt_idx = idx >> img->rb_bits;
        if (rt_idx >= img->rt_size || img->rt[rt_idx] == 0) {
            if (!hint_moved) {
                img->free_cluster_hint = idx;
                hint_moved = true;
            }
            if (run_len == 0) {
                run_start = idx;
            }
            uint64_t block_end = (rt_idx + 1) << img->rb_bits;
            if (rt_idx >= img->rt_size) {
                block_end = idx + n; /* everything past the table is free */
            }
            run_len += block_end - idx;
            idx = block_end;
            if (run_len >= n) {
                break;
            }
            continue;
        }
        uint8_t *blk;
        int ret = get_block(img, rt_idx, &blk);
        if (ret < 0) {
            return ret;
        }
        const uint64_t block_end = (rt_idx + 1) << img->rb_bits;
        bool done = false;
        for (; idx < block_end; idx++) {
            if (qs_rb_get(img, blk, idx % per_block) == 0) {
                if (!hint_moved) {
                    img->free_cluster_hint = idx;
                    hint_moved = true;
                }
                if (run_len == 0) {
                    run_start = idx;
                }
                if (++run_len >= n) {
                    idx++;
                    done = true;
                    break;
                }
            } else if (partial && run_len > 0) {
                done = true;
                break;
            } else {
                run_len = 0;
            }
        }
        qs_cache_put(img->rb_cache, blk);
        if (done) {
            break;
        }
    }
    *start = run_start;
    *got = QS_MIN(run_len, n);
    return 0;
}

/*
 * Reserving ahead.  A write past the end of the host file extends it, and
 * file systems serialise those: ext4 and XFS take the inode lock
 * exclusively for an O_DIRECT write that extends the file and finish it
 * before the next one starts.  So when an allocation grows the image, the
 * host file is first extended with fallocate() by a margin (a quarter of
 * the file, 1 to 64 MiB, as QEMU's preallocate filter does with its
 * defaults of 1 and 128 MiB); the clusters allocated next lie inside the
 * file and their writes run side by side.  qsnap_close cuts off what is
 * left of the margin, qs_refcount_trim drops it with the free tail.  A
 * crash leaves it as zeroed space past the last cluster, which no
 * refcount covers: free space, not a leak.  Best effort: a host file that
 * cannot reserve (a block device, a file system without fallocate) is
 * written as before.
 */
#define QS_RESERVE_MIN (UINT64_C(1) << 20)
#define QS_RESERVE_MAX (UINT64_C(64) << 20)

static void reserve_ahead(struct qsnap_image *img, uint64_t end)
{
    if (img->reserve_off || end <= img->reserved_end) {
        return;
    }
    const uint64_t unit = QS_MAX(QS_RESERVE_MIN, img->cluster_size);
    const uint64_t margin =
        QS_MIN(QS_MAX(end / 4, QS_RESERVE_MIN), QS_RESERVE_MAX);
    const uint64_t target = (end + margin + unit - 1) / unit * unit;
    const uint64_t from = QS_MAX(img->file_size, img->reserved_end);

    if (target > QS_MAX_HOST_OFFSET) {
        return;
    }
    const int ret = qs_io_reserve(img->io, from, target - from);
    if (ret == -EOPNOTSUPP || ret == -ENOSYS || ret == -EINVAL) {
        img->reserve_off = true;
    }
    if (ret < 0) {
        return;
    }
    img->reserved_end = target;
    /* Past the file's old end: new, zeroed space. */
    if (img->zero_lo >= img->zero_hi || img->zero_hi != from) {
        img->zero_lo = from;
    }
    img->zero_hi = target;
}

/* The host file now ends at `size`. */
static void host_truncated(struct qsnap_image *img, uint64_t size)
{
    img->file_size = size;
    img->reserved_end = 0;
    img->zero_hi = QS_MIN(img->zero_hi, size);
}

int qs_reserve_release(struct qsnap_image *img)
{
    if (img->reserved_end <= img->file_size) {
        return 0;
    }
    const int ret = qs_io_truncate(img->io, img->file_size);
    if (ret < 0) {
        return qs_error(img, ret, "%s: truncating to %" PRIu64 " bytes: %s",
                        img->filename, img->file_size, qsnap_strerror(ret));
    }
    host_truncated(img, img->file_size);
    return 0;
}

static int alloc_common(struct qsnap_image *img, uint64_t n, bool partial,
                        uint64_t *host_off, uint64_t *n_got, bool *zeroed)
{
    const uint64_t cs = img->cluster_size;
    bool drained = false;

    if (n == 0) {
        return -EINVAL;
    }
    for (int attempt = 0; attempt < 64; attempt++) {
        uint64_t start, got;
        int ret = find_free(img, n, partial, &start, &got);
        if (ret < 0) {
            return ret;
        }
        if ((start + got) * cs > QS_MAX_HOST_OFFSET) {
            return qs_error(img, -EFBIG,
                            "%s: no space below the maximum host offset",
                            img->filename);
        }
        /*
         * About to grow the file while freed clusters wait for their
         * pointer drops to be durable: make them durable and reuse them.
         */
        if (!drained && img->n_pending && (start + got) * cs > img->file_size) {
            drained = true;
            ret = qs_meta_sync(img);
            if (ret == 0) {
                ret = qs_refcount_drain(img);
            }
            if (ret < 0) {
                return ret;
            }
            continue;
        }
        bool moved = false;
        for (uint64_t r = start >> img->rb_bits;
             r <= (start + got - 1) >> img->rb_bits; r++) {
            ret = ensure_block(img, r);
            if (ret < 0) {
                return ret;
            }
            if (ret > 0) {
                moved = true;
                break;
            }
        }
        if (moved) {
            continue;
        }
        ret = qs_refcount_update(img, start * cs, got * cs, 1);
        if (ret < 0) {
            return ret;
        }
        if (start == img->free_cluster_hint) {
            img->free_cluster_hint = start + got;
        }
        /*
         * Allocated space counts as part of the file even before it is
         * written (an L2 table may wait in the cache), so validation of
         * offsets against the file size accepts it.
         */
        const uint64_t lo = start * cs, hi = (start + got) * cs;
        if (hi > img->file_size) {
            reserve_ahead(img, hi);
            img->file_size = hi;
        }
        /* Handed out: no longer part of the zero window. */
        const bool in_window = lo >= img->zero_lo && hi <= img->zero_hi;
        img->zero_lo = QS_MAX(img->zero_lo, hi);
        *host_off = lo;
        if (n_got) {
            *n_got = got;
        }
        if (zeroed) {
            *zeroed = in_window;
        }
        return 0;
    }
    return qs_error(img, -EIO, "%s: cluster allocation did not converge",
                    img->filename);
}

int qs_alloc_clusters(struct qsnap_image *img, uint64_t n, uint64_t *host_off)
{
    return alloc_common(img, n, false, host_off, NULL, NULL);
}

int qs_alloc_run(struct qsnap_image *img, uint64_t max_n, uint64_t *host_off,
                 uint64_t *n_got, bool *zeroed)
{
    return alloc_common(img, max_n, true, host_off, n_got, zeroed);
}

int qs_alloc_bytes(struct qsnap_image *img, uint64_t len, uint64_t *host_off)
{
    const uint64_t cs = img->cluster_size;
    uint64_t fbo = img->free_byte_offset;
    int ret;

    if (len == 0 || len > cs) {
        return -EINVAL;
    }
    if (fbo) {
        /* A cluster whose refcount is at its maximum takes no more users
         * (1-bit refcounts: never shared). */
        uint64_t rc;
        ret = qs_refcount_get(img, fbo >> img->cluster_bits, &rc);
        if (ret < 0) {
            return ret;
        }
        if (rc >= img->refcount_max) {
            fbo = img->free_byte_offset = 0;
        }
    }
    if (fbo && len <= cs - (fbo & (cs - 1))) {
        /* Fits in the current cluster: one more user of it. */
        ret = qs_refcount_update(img, fbo & ~(cs - 1), 1, 1);
        if (ret < 0) {
            return ret;
        }
        *host_off = fbo;
        fbo += len;
        img->free_byte_offset = (fbo & (cs - 1)) ? fbo : 0;
        return 0;
    }
    uint64_t fresh;
    ret = qs_alloc_clusters(img, 1, &fresh);
    if (ret < 0) {
        return ret;
    }
    /* alloc may have drained pending frees, resetting the cursor */
    fbo = img->free_byte_offset;
    if (fbo && fresh == (fbo & ~(cs - 1)) + cs) {
        /* Contiguous: span the boundary, as QEMU does. */
        ret = qs_refcount_update(img, fbo & ~(cs - 1), 1, 1);
        if (ret < 0) {
            return ret;
        }
        *host_off = fbo;
    } else {
        *host_off = fresh;
    }
    fbo = *host_off + len;
    img->free_byte_offset = (fbo & (cs - 1)) ? fbo : 0;
    return 0;
}

int qs_free_deferred(struct qsnap_image *img, uint64_t host_off, uint64_t len)
{
    if (img->n_pending == img->cap_pending) {
        size_t cap = img->cap_pending ? img->cap_pending * 2 : 64;
        struct qs_pending_free *p = realloc(img->pending, cap * sizeof(*p));
        if (!p) {
            return -ENOMEM;
        }
        img->pending = p;
        img->cap_pending = cap;
    }
    img->pending[img->n_pending++] = (struct qs_pending_free){host_off, len};
    return 0;
}

static int cmp_pending(const void *a, const void *b)
{
    const struct qs_pending_free *x = a, *y = b;
    return x->host_off < y->host_off ? -1 : x->host_off > y->host_off;
}

/* Truncates the file after its last used cluster. */
int qs_refcount_trim(struct qsnap_image *img)
{
    const uint64_t cs = img->cluster_size;
    uint64_t end = QS_DIV_ROUND_UP(img->file_size, cs);
    const uint64_t orig = end;

    while (end > 1) {
        uint64_t rc;
        int ret = qs_refcount_get(img, end - 1, &rc);
        if (ret < 0) {
            return ret;
        }
        if (rc) {
            break;
        }
        end--;
    }
    if (end == orig) {
        return 0;
    }
    int ret = qs_io_truncate(img->io, end * cs);
    if (ret < 0) {
        return qs_error(img, ret, "%s: truncating to %" PRIu64 " bytes: %s",
                        img->filename, end * cs, qsnap_strerror(ret));
    }
    host_truncated(img, end * cs);
    return 0;
}

void qs_inplace_wait_idle(struct qsnap_image *img)
{
    pthread_mutex_lock(&img->job_mtx);
    while (img->inplace_inflight) {
        pthread_cond_wait(&img->job_cond, &img->job_mtx);
    }
    pthread_mutex_unlock(&img->job_mtx);
}

int qs_refcount_drain(struct qsnap_image *img)
{
    const uint64_t cs = img->cluster_size;
    int ret = 0;

    if (!img->n_pending) {
        return 0;
    }
    /* An in-place write that looked up a cluster before it was freed may
     * still be on its way to it: let it land before the cluster is reused
     * or punched. */
    qs_inplace_wait_idle(img);
    qsort(img->pending, img->n_pending, sizeof(*img->pending), cmp_pending);
    uint64_t punch_start = 0, punch_len = 0;
    bool tail_freed = false;

    for (size_t i = 0; i < img->n_pending && ret == 0; i++) {
        const struct qs_pending_free *p = &img->pending[i];
        ret = qs_refcount_update(img, p->host_off, p->len, -1);
        if (ret < 0) {
            break;
        }
        const uint64_t first = p->host_off / cs;
        const uint64_t last = (p->host_off + p->len - 1) / cs;
        for (uint64_t c = first; c <= last; c++) {
            uint64_t rc;
            ret = qs_refcount_get(img, c, &rc);
            if (ret < 0 || rc) {
                continue;
            }
            qs_cache_drop(img->l2_cache, c * cs);
            if ((c + 1) * cs >= img->file_size) {
                tail_freed = true;
            }
            if (punch_len && punch_start + punch_len == c * cs) {
                punch_len += cs;
                continue;
            }
            if (punch_len) {
                qs_io_punch(img->io, punch_start, punch_len);
            }
            punch_start = c * cs;
            punch_len = cs;
        }
    }
    if (punch_len) {
        /* Best effort: a file system without hole punching keeps them. */
        qs_io_punch(img->io, punch_start, punch_len);
    }
    img->n_pending = 0;
    img->free_byte_offset = 0;
    if (ret == 0 && tail_freed) {
        ret = qs_refcount_trim(img);
    }
    return ret;
}
