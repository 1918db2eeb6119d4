/*
 * compact.c - move clusters from the end of the file into free space below
 * it, then truncate.  Keeps every snapshot.
 *
 * With U clusters in use, the file could end at cluster U.  Every used
 * cluster at or past the target end is copied to the lowest free cluster
 * and every reference to it is rewritten:
 *   data clusters      <- L2 entries (any number of L2 tables)
 *   L2 tables          <- L1 entries (the active L1, snapshots' L1s)
 *   refcount blocks    <- refcount table entries
 *   L1 tables, the refcount table, the snapshot table: reallocated whole
 *   and switched by the header or the snapshot table.
 * Compressed data that spans two host clusters, and bitmap clusters, stay
 * where they are.
 *
 * Invariants (crash safety; a crash leaves at worst leaked clusters):
 *   1. A copy and its refcount are flushed before any reference to it is
 *      written.
 *   2. The old cluster's refcount drops to 0 only after every reference
 *      to it has been rewritten and flushed.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qs_int.h"

enum ref_kind {
    REF_L2_ENTRY,  /* where = L2 table offset, idx = entry */
    REF_L1_ENTRY,  /* where = L1 table offset (or 0: active), idx = entry */
    REF_RT_ENTRY,  /* idx = refcount table entry */
    REF_COMPRESSED /* where = L2 table offset, idx = entry */
};

struct ref {
    uint8_t kind;
    uint64_t where;
    uint64_t idx;
};

struct moving {
    struct ref *refs;
    uint32_t n, cap;
    bool pinned; /* cannot move (bitmaps, spanning compressed data) */
    bool l2;     /* is an L2 table (its entries may need rewriting) */
};

struct plan {
    struct qsnap_image *img;
    uint64_t end; /* target: clusters >= end move */
    uint64_t n;   /* clusters tracked: [end, end + n) */
    struct moving *m;
};

static struct moving *slot(struct plan *p, uint64_t off)
{
    const uint64_t c = off >> p->img->cluster_bits;
    if (c < p->end || c >= p->end + p->n) {
        return NULL;
    }
    return &p->m[c - p->end];
}

static int add_ref(struct plan *p, uint64_t off, uint8_t kind, uint64_t where,
                   uint64_t idx)
{
    struct moving *mv = slot(p, off);
    if (!mv) {
        return 0;
    }
    if (mv->n == mv->cap) {
        uint32_t cap = mv->cap ? mv->cap * 2 : 2;
        struct ref *r = realloc(mv->refs, cap * sizeof(*r));
        if (!r) {
            return -ENOMEM;
        }
        mv->refs = r;
        mv->cap = cap;
    }
    mv->refs[mv->n++] = (struct ref){kind, where, idx};
    return 0;
}

static void pin_range(struct plan *p, uint64_t off, uint64_t len)
{
    const uint64_t cs = p->img->cluster_size;
    for (uint64_t o = off & ~(cs - 1); o < off + len; o += cs) {
        struct moving *mv = slot(p, o);
        if (mv) {
            mv->pinned = true;
        }
    }
}

/* Records the references of one L1 table and the L2 tables under it. */
static int map_l1(struct plan *p, const uint64_t *l1, uint32_t n,
                  uint64_t l1_off)
{
    struct qsnap_image *img = p->img;
    const uint64_t cs = img->cluster_size;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t l2_off;
        int ret = qs_l1_validate_entry(img, l1, i, &l2_off);
        if (ret < 0) {
            return ret;
        }
        if (!l2_off) {
            continue;
        }
        struct moving *t = slot(p, l2_off);
        const bool first_visit = !t || t->n == 0;
        ret = add_ref(p, l2_off, REF_L1_ENTRY, l1_off, i);
        if (ret < 0) {
            return ret;
        }
        if (t) {
            t->l2 = true;
        }
        if (!first_visit) {
            continue; /* its entries were recorded already */
        }
        void *l2;
        ret = qs_cache_get(img->l2_cache, l2_off, false, &l2);
        if (ret < 0) {
            return ret;
        }
        for (uint64_t j = 0; j < img->l2_entries && ret == 0; j++) {
            const uint64_t e = qs_l2_entry_get(img, l2, j, NULL);
            const enum qs_ctype ty = qs_l2_entry_type(img, e);
            if (ty == QS_C_NORMAL || ty == QS_C_ZERO_ALLOC) {
                ret =
                    add_ref(p, e & QS_L2E_OFFSET_MASK, REF_L2_ENTRY, l2_off, j);
            } else if (ty == QS_C_COMPRESSED) {
                uint64_t off, len;
                qs_compressed_range(img, e, &off, &len);
                if ((off & ~(cs - 1)) != ((off + len - 1) & ~(cs - 1))) {
                    pin_range(p, off, len);
                } else {
                    ret = add_ref(p, off, REF_COMPRESSED, l2_off, j);
                }
            }
        }
        qs_cache_put(img->l2_cache, l2);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

static void plan_free(struct plan *p)
{
    if (p->m) {
        for (uint64_t i = 0; i < p->n; i++) {
            free(p->m[i].refs);
        }
    }
    free(p->m);
}

/* Rewrites the L2 entries pointing at old_off to new_off. */
static int fix_l2_ref(struct qsnap_image *img, const struct ref *r,
                      uint64_t old_off, uint64_t new_off)
{
    void *l2;
    int ret = qs_cache_get(img->l2_cache, r->where, false, &l2);
    if (ret < 0) {
        return ret;
    }
    uint8_t *p = (uint8_t *)l2 + r->idx * (img->ext_l2 ? 16 : 8);
    uint64_t e = qs_be64_load(p);
    if (r->kind == REF_COMPRESSED) {
        const uint64_t coff = e & img->coffset_mask;
        e = (e & ~img->coffset_mask) | (coff - old_off + new_off);
    } else {
        e = (e & ~QS_L2E_OFFSET_MASK) | new_off;
    }
    qs_be64_store(p, e);
    qs_cache_mark_dirty(img->l2_cache, l2);
    qs_cache_put(img->l2_cache, l2);
    return 0;
}

static int fix_l1_ref(struct qsnap_image *img, const struct ref *r,
                      uint64_t new_off)
{
    if (r->where == 0) {
        uint64_t *e = &img->l1[r->idx];
        *e = (*e & ~QS_L1E_OFFSET_MASK) | new_off;
        if (!img->l1_dirty) {
            img->l1_dirty = true;
            img->l1_dirty_lo = (uint32_t)r->idx;
            img->l1_dirty_hi = (uint32_t)r->idx;
        }
        img->l1_dirty_lo = QS_MIN(img->l1_dirty_lo, (uint32_t)r->idx);
        img->l1_dirty_hi = QS_MAX(img->l1_dirty_hi, (uint32_t)r->idx);
        return 0;
    }
    /* A snapshot's L1 entry: one 8-byte write in place. */
    uint8_t b[8];
    int ret = qs_host_read(img, b, 8, r->where + r->idx * 8);
    if (ret == 0) {
        const uint64_t e = qs_be64_load(b);
        qs_be64_store(b, (e & ~QS_L1E_OFFSET_MASK) | new_off);
        ret = qs_host_write(img, b, 8, r->where + r->idx * 8);
    }
    return ret;
}

/* Moves single clusters (data, L2 tables, refcount blocks). */
static int move_clusters(struct plan *p, uint64_t *moved)
{
    struct qsnap_image *img = p->img;
    const uint64_t cs = img->cluster_size;
    uint8_t *buf = qs_alloc_buf(cs);
    uint64_t *from = calloc(p->n ? p->n : 1, sizeof(*from));
    uint64_t *to = calloc(p->n ? p->n : 1, sizeof(*to));
    uint64_t k = 0;
    int ret = (!buf || !from || !to) ? -ENOMEM : 0;

    /* Pass A: copies, with their refcounts, flushed (invariant 1). */
    for (uint64_t i = p->n; i-- > 0 && ret == 0;) {
        struct moving *mv = &p->m[i];
        if (!mv->n || mv->pinned || mv->refs[0].kind == REF_RT_ENTRY) {
            continue; /* refcount blocks move one by one, below */
        }
        const uint64_t x = (p->end + i) * cs;
        uint64_t rc, y;
        ret = qs_refcount_get(img, x / cs, &rc);
        if (ret < 0 || rc == 0) {
            break;
        }
        ret = qs_alloc_clusters(img, 1, &y);
        if (ret < 0) {
            break;
        }
        if (y >= x) {
            /* No free space below: give it back and stop. */
            ret = qs_refcount_update(img, y, cs, -1);
            break;
        }
        if (mv->l2) {
            ret = qs_cache_writeback(img->l2_cache);
        }
        if (ret == 0) {
            ret = qs_host_read(img, buf, cs, x);
        }
        if (ret == 0) {
            ret = qs_host_write(img, buf, cs, y);
        }
        if (ret == 0 && rc > 1) {
            ret = qs_refcount_set(img, y / cs, rc);
        }
        from[k] = x;
        to[k] = y;
        k++;
    }
    if (ret == 0 && k) {
        ret = qs_cache_writeback(img->rb_cache);
    }
    if (ret == 0 && k) {
        ret = qs_io_flush(img->io);
    }

    /* Pass B: rewrite every reference. */
    for (uint64_t j = 0; j < k && ret == 0; j++) {
        struct moving *mv = slot(p, from[j]);
        for (uint32_t r = 0; r < mv->n && ret == 0; r++) {
            const struct ref *rf = &mv->refs[r];
            switch (rf->kind) {
            case REF_L2_ENTRY:
            case REF_COMPRESSED: {
                /* The table holding the entry may itself have moved. */
                struct ref moved_rf = *rf;
                for (uint64_t q = 0; q < k; q++) {
                    if (from[q] == rf->where) {
                        moved_rf.where = to[q];
                    }
                }
                ret = fix_l2_ref(img, &moved_rf, from[j], to[j]);
                break;
            }
            case REF_L1_ENTRY:
                qs_cache_drop(img->l2_cache, from[j]);
                ret = fix_l1_ref(img, rf, to[j]);
                break;
            case REF_RT_ENTRY:
                break;
            }
        }
    }
    if (ret == 0 && k) {
        ret = qs_meta_sync(img);
    }
    /* Pass C: the old places are unreferenced now (invariant 2). */
    for (uint64_t j = 0; j < k && ret == 0; j++) {
        ret = qs_refcount_set(img, from[j] / cs, 0);
    }
    if (ret == 0 && k) {
        ret = qs_meta_sync(img);
    }
    *moved = k;
    free(buf);
    free(from);
    free(to);
    return ret;
}

/*
 * Moves refcount blocks one at a time: a block may describe its own new
 * place, so each copy is taken after the allocation that changed it.
 */
static int move_refblocks(struct plan *p, uint64_t *moved)
{
    struct qsnap_image *img = p->img;
    const uint64_t cs = img->cluster_size;
    uint8_t *buf = qs_alloc_buf(cs);
    int ret = buf ? 0 : -ENOMEM;
    for (uint64_t i = p->n; i-- > 0 && ret == 0;) {
        struct moving *mv = &p->m[i];
        if (!mv->n || mv->pinned || mv->refs[0].kind != REF_RT_ENTRY) {
            continue;
        }
        const uint64_t x = (p->end + i) * cs;
        const uint64_t rt_idx = mv->refs[0].idx;
        uint64_t y;
        ret = qs_alloc_clusters(img, 1, &y);
        if (ret < 0) {
            break;
        }
        if (y >= x) {
            ret = qs_refcount_update(img, y, cs, -1);
            break;
        }
        /* Copy after the allocation's own refcount change (invariant 1). */
        ret = qs_cache_writeback(img->rb_cache);
        if (ret == 0) {
            ret = qs_host_read(img, buf, cs, x);
        }
        if (ret == 0) {
            ret = qs_host_write(img, buf, cs, y);
        }
        if (ret == 0) {
            ret = qs_io_flush(img->io);
        }
        if (ret < 0) {
            break;
        }
        uint8_t b[8];
        qs_be64_store(b, y);
        ret = qs_host_write(img, b, 8,
                            img->hdr.refcount_table_offset + rt_idx * 8);
        if (ret == 0) {
            ret = qs_io_flush(img->io);
        }
        if (ret < 0) {
            break;
        }
        qs_cache_drop(img->rb_cache, x);
        img->rt[rt_idx] = y;
        /* The table points at the copy, durably: release the old block. */
        ret = qs_refcount_set(img, x / cs, 0);
        if (ret == 0) {
            ret = qs_cache_writeback(img->rb_cache);
        }
        (*moved)++;
    }
    free(buf);
    return ret;
}

/* Rewrites a multi-cluster table at a new, lower place if there is one. */
static int relocate_range(struct qsnap_image *img, uint64_t off, uint64_t bytes,
                          uint64_t *new_off)
{
    const uint64_t cs = img->cluster_size;
    const uint64_t n = QS_DIV_ROUND_UP(bytes, cs);
    uint8_t *buf = qs_alloc_buf(n * cs);
    if (!buf) {
        return -ENOMEM;
    }
    int ret = qs_alloc_clusters(img, n, new_off);
    if (ret == 0 && *new_off > off) {
        ret = qs_refcount_update(img, *new_off, n * cs, -1);
        *new_off = off;
        free(buf);
        return ret;
    }
    if (ret == 0) {
        ret = qs_host_read(img, buf, n * cs, off);
    }
    if (ret == 0) {
        ret = qs_host_write(img, buf, n * cs, *new_off);
    }
    if (ret == 0) {
        ret = qs_cache_writeback(img->rb_cache);
    }
    if (ret == 0) {
        ret = qs_io_flush(img->io);
    }
    free(buf);
    return ret;
}

static int relocate_tables(struct qsnap_image *img, uint64_t end)
{
    const uint64_t cs = img->cluster_size;
    const struct qs_header *h = &img->hdr;
    uint64_t noff;
    int ret = 0;

    /* The active L1: header switch (12 bytes). */
    if (img->l1_size && h->l1_table_offset / cs >= end) {
        const uint64_t bytes = (uint64_t)img->l1_size * 8;
        ret = qs_meta_sync(img);
        if (ret == 0) {
            ret = relocate_range(img, h->l1_table_offset, bytes, &noff);
        }
        if (ret == 0 && noff != h->l1_table_offset) {
            uint8_t f[12];
            qs_be32_store(f, img->l1_size);
            qs_be64_store(f + 4, noff);
            ret = qs_header_switch(img, QS_HDR_OFF_L1, f, 12);
            if (ret == 0) {
                ret = qs_free_deferred(img, h->l1_table_offset,
                                       QS_DIV_ROUND_UP(bytes, cs) * cs);
                img->hdr.l1_table_offset = noff;
            }
        }
    }
    /* The refcount table: header switch (12 bytes). */
    if (ret == 0 && h->refcount_table_offset / cs >= end) {
        const uint64_t bytes = (uint64_t)h->refcount_table_clusters * cs;
        const uint64_t old = h->refcount_table_offset;
        ret = relocate_range(img, old, bytes, &noff);
        if (ret == 0 && noff != old) {
            uint8_t f[12];
            qs_be64_store(f, noff);
            qs_be32_store(f + 8, h->refcount_table_clusters);
            ret = qs_header_switch(img, QS_HDR_OFF_REFTABLE, f, 12);
            if (ret == 0) {
                img->hdr.refcount_table_offset = noff;
                ret = qs_free_deferred(img, old, bytes);
            }
        }
    }
    /*
     * Snapshot L1 tables: new copies, then one new snapshot table.  The
     * old copies are freed only once that table is written: until then
     * the table on disk points at them.  After a failure the snapshots
     * point at their old copies again; the new ones are left as leaks.
     */
    uint64_t *old_l1 = NULL;
    if (ret == 0 && img->n_snapshots) {
        old_l1 = malloc(img->n_snapshots * sizeof(*old_l1));
        if (!old_l1) {
            return -ENOMEM;
        }
    }
    bool table_dirty = false;
    for (uint32_t s = 0; s < img->n_snapshots && ret == 0; s++) {
        struct qs_snapshot *sn = &img->snapshots[s];
        old_l1[s] = sn->l1_offset;
        if (!sn->l1_size || sn->l1_offset / cs < end) {
            continue;
        }
        ret = relocate_range(img, sn->l1_offset, (uint64_t)sn->l1_size * 8,
                             &noff);
        if (ret == 0 && noff != sn->l1_offset) {
            sn->l1_offset = noff;
            table_dirty = true;
        }
    }
    if (ret == 0 && (table_dirty ||
                     (img->n_snapshots && h->snapshots_offset / cs >= end))) {
        ret = qs_snapshot_table_rewrite(img);
    }
    const bool written = ret == 0;
    for (uint32_t s = 0; s < img->n_snapshots && table_dirty; s++) {
        struct qs_snapshot *sn = &img->snapshots[s];
        if (sn->l1_offset == old_l1[s]) {
            continue;
        }
        if (!written) {
            sn->l1_offset = old_l1[s];
        } else if (ret == 0) {
            const uint64_t bytes = (uint64_t)sn->l1_size * 8;
            ret = qs_free_deferred(img, old_l1[s],
                                   QS_DIV_ROUND_UP(bytes, cs) * cs);
        }
    }
    free(old_l1);
    if (ret == 0) {
        ret = qs_settle(img);
    }
    return ret;
}

static int used_clusters(struct qsnap_image *img, uint64_t *used,
                         uint64_t *last)
{
    const uint64_t n = QS_DIV_ROUND_UP(img->file_size, img->cluster_size);
    *used = 0;
    *last = 0;
    for (uint64_t c = 0; c < n; c++) {
        uint64_t rc;
        int ret = qs_refcount_get(img, c, &rc);
        if (ret < 0) {
            return ret;
        }
        if (rc) {
            (*used)++;
            *last = c + 1;
        }
    }
    return 0;
}

static int compact_pass(struct qsnap_image *img, uint64_t *moved)
{
    uint64_t used, last;
    int ret = used_clusters(img, &used, &last);
    if (ret < 0 || last <= used) {
        *moved = 0;
        return ret;
    }
    struct plan p = {.img = img, .end = used, .n = last - used};
    p.m = calloc(p.n, sizeof(*p.m));
    if (!p.m) {
        return -ENOMEM;
    }
    ret = map_l1(&p, img->l1, img->l1_size, 0);
    for (uint32_t s = 0; s < img->n_snapshots && ret == 0; s++) {
        const struct qs_snapshot *sn = &img->snapshots[s];
        uint64_t *l1;
        ret = qs_l1_load(img, sn->l1_offset, sn->l1_size, &l1);
        if (ret == 0) {
            ret = map_l1(&p, l1, sn->l1_size, sn->l1_offset);
            free(l1);
        }
    }
    for (uint64_t r = 0; r < img->rt_size && ret == 0; r++) {
        if (img->rt[r]) {
            ret =
                add_ref(&p, img->rt[r] & QS_RT_OFFSET_MASK, REF_RT_ENTRY, 0, r);
        }
    }
    for (size_t x = 0; x < img->hdr.n_exts; x++) {
        if (img->hdr.exts[x].type == QS_EXT_BITMAPS) {
            /* Bitmap clusters are not tracked here: move nothing. */
            for (uint64_t i = 0; i < p.n; i++) {
                p.m[i].pinned = true;
            }
        }
    }
    if (ret == 0) {
        ret = move_clusters(&p, moved);
    }
    if (ret == 0) {
        ret = move_refblocks(&p, moved);
    }
    plan_free(&p);
    if (ret == 0) {
        ret = relocate_tables(img, used);
    }
    return ret;
}

QSNAP_API int qsnap_compact(qsnap_image *img, qsnap_progress_fn progress,
                            void *opaque)
{
    if (!img) {
        return -EINVAL;
    }
    qs_lock_exclusive(img);
    int ret = 0;
    if (img->format != QSNAP_FMT_QCOW2 || !img->rw || img->corrupt) {
        ret = qs_error(img, -EROFS,
                       "%s: compaction needs a writable, "
                       "intact qcow2 image",
                       img->filename);
    } else if (img->ckpt || img->views) {
        ret = qs_error(img, -EBUSY,
                       "%s: cannot compact while snapshot views or a "
                       "checkpoint are open",
                       img->filename);
    }
    if (ret == 0) {
        ret = qs_mark_dirty(img);
    }
    if (ret == 0) {
        ret = qs_settle(img);
    }
    for (int pass = 0; pass < 4 && ret == 0; pass++) {
        uint64_t moved = 0;
        ret = compact_pass(img, &moved);
        if (progress) {
            progress(opaque, (uint64_t)pass + 1, 4);
        }
        if (ret < 0 || moved == 0) {
            break;
        }
    }
    if (ret == 0) {
        ret = qs_refcount_trim(img);
    }
    if (ret == 0 && progress) {
        progress(opaque, 4, 4);
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}
