/*
 * check.c - consistency check, repair, and refcount rebuild.
 *
 * Every reference in the image (header, L1 tables of the active state and
 * of each snapshot, L2 tables, data and compressed clusters, snapshot
 * table, refcount table and blocks, bitmap directory and tables) is
 * counted into an array, which is then compared with the stored
 * refcounts, as qemu-img check does.
 *
 * Invariants:
 *   1. The array has one counter per cluster of the file (plus what the
 *      refcount blocks describe), so memory is bounded by the file size.
 *   2. A rebuild writes complete new refcount structures beyond the end
 *      of the file and flushes them before one header write switches to
 *      them: a crash leaves either the old or the new structures.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "qs_int.h"

struct ctx {
    struct qsnap_image *img;
    struct qsnap_check_result *res;
    qsnap_check_report_fn report;
    void *opaque;
    uint32_t *ref;  /* computed references per cluster, saturating */
    uint8_t *use;   /* per cluster: USE_META and/or USE_DATA */
    uint64_t n_ref; /* clusters tracked */
    bool count_refcount_structures;
};

/* What a reference uses a cluster for.  A cluster that is both a table
 * and guest data is corrupt whatever its refcount: a write to either
 * overwrites the other. */
enum { USE_META = 1, USE_DATA = 2 };

static void say(struct ctx *c, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void say(struct ctx *c, int level, const char *fmt, ...)
{
    if (!c->report) {
        return;
    }
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    c->report(c->opaque, level, msg);
}

static void add_ref_as(struct ctx *c, uint64_t off, uint64_t len, uint8_t use)
{
    const uint64_t cs = c->img->cluster_size;
    if (!len) {
        return;
    }
    const uint64_t first = off / cs, last = (off + len - 1) / cs;
    for (uint64_t i = first; i <= last; i++) {
        if (i >= c->n_ref) {
            say(c, 0,
                "ERROR: cluster at offset 0x%" PRIx64
                " is beyond the end of the image file",
                i * cs);
            c->res->corruptions++;
            return;
        }
        if (c->ref[i] != UINT32_MAX) {
            c->ref[i]++;
        }
        c->use[i] |= use;
    }
}

/* A reference from metadata to metadata (a table, the header). */
static void add_ref(struct ctx *c, uint64_t off, uint64_t len)
{
    add_ref_as(c, off, len, USE_META);
}

/* A reference from an L2 entry to guest data. */
static void add_data_ref(struct ctx *c, uint64_t off, uint64_t len)
{
    add_ref_as(c, off, len, USE_DATA);
}

static int walk_l2(struct ctx *c, uint64_t l2_off, bool active,
                   uint64_t *next_contig)
{
    struct qsnap_image *img = c->img;
    const uint64_t cs = img->cluster_size;
    void *l2;
    int ret = qs_cache_get(img->l2_cache, l2_off, false, &l2);
    if (ret < 0) {
        c->res->check_errors++;
        return 0;
    }
    for (uint64_t i = 0; i < img->l2_entries; i++) {
        const uint64_t e = qs_l2_entry_get(img, l2, i, NULL);
        const enum qs_ctype t = qs_l2_entry_type(img, e);
        if (t == QS_C_COMPRESSED) {
            uint64_t off, len;
            qs_compressed_range(img, e, &off, &len);
            if (e & QS_OFLAG_COPIED) {
                say(c, 0,
                    "ERROR: compressed cluster entry 0x%016" PRIx64
                    " has the COPIED flag set",
                    e);
                c->res->corruptions++;
            }
            add_data_ref(c, off, len);
            if (active) {
                c->res->allocated_clusters++;
                c->res->compressed_clusters++;
                /* As qemu-img: compressed clusters count as fragmented
                 * and leave the contiguity tracking alone. */
                c->res->fragmented_clusters++;
            }
            continue;
        }
        if (t != QS_C_NORMAL && t != QS_C_ZERO_ALLOC) {
            continue;
        }
        const uint64_t off = e & QS_L2E_OFFSET_MASK;
        if ((e & QS_L2E_RESERVED) || (off & (cs - 1))) {
            say(c, 0,
                "ERROR: L2 entry 0x%016" PRIx64 " in table 0x%" PRIx64
                " is unaligned or has reserved bits",
                e, l2_off);
            c->res->corruptions++;
            continue;
        }
        add_data_ref(c, off, cs);
        if (active) {
            c->res->allocated_clusters++;
            if (*next_contig && off != *next_contig) {
                c->res->fragmented_clusters++;
            }
            *next_contig = off + cs;
        }
    }
    qs_cache_put(img->l2_cache, l2);
    return 0;
}

static int walk_l1(struct ctx *c, const uint64_t *l1, uint32_t n, bool active)
{
    struct qsnap_image *img = c->img;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t next = 0; /* contiguity is tracked per L2 table */
        const uint64_t e = l1[i];
        const uint64_t off = e & QS_L1E_OFFSET_MASK;
        if (!off && !(e & QS_L1E_RESERVED)) {
            continue; /* unallocated (reserved bits count even then) */
        }
        if ((e & QS_L1E_RESERVED) || (off & (img->cluster_size - 1)) ||
            off >= img->file_size) {
            say(c, 0,
                "ERROR: L1 entry %u (0x%016" PRIx64
                ") is unaligned, has reserved bits or points past the end "
                "of the file",
                i, e);
            c->res->corruptions++;
            continue;
        }
        add_ref(c, off, img->cluster_size);
        walk_l2(c, off, active, &next);
    }
    return 0;
}

static int walk_snapshots(struct ctx *c)
{
    struct qsnap_image *img = c->img;
    if (!img->n_snapshots) {
        return 0;
    }
    add_ref(c, img->hdr.snapshots_offset, img->snapshot_table_bytes);
    for (uint32_t s = 0; s < img->n_snapshots; s++) {
        const struct qs_snapshot *sn = &img->snapshots[s];
        if (!sn->l1_size) {
            continue;
        }
        add_ref(c, sn->l1_offset, (uint64_t)sn->l1_size * 8);
        uint64_t *l1 = malloc((size_t)sn->l1_size * 8);
        if (!l1) {
            return -ENOMEM;
        }
        int ret = qs_host_read(img, l1, (size_t)sn->l1_size * 8, sn->l1_offset);
        if (ret < 0) {
            c->res->check_errors++;
            free(l1);
            continue;
        }
        for (uint32_t i = 0; i < sn->l1_size; i++) {
            l1[i] = qs_be64_load(&l1[i]);
        }
        walk_l1(c, l1, sn->l1_size, false);
        free(l1);
    }
    return 0;
}

/* Bitmaps extension: directory, bitmap tables and their data clusters. */
static void walk_bitmaps(struct ctx *c)
{
    struct qsnap_image *img = c->img;
    const uint64_t cs = img->cluster_size;
    for (size_t x = 0; x < img->hdr.n_exts; x++) {
        const struct qs_ext *e = &img->hdr.exts[x];
        if (e->type != QS_EXT_BITMAPS || e->len < 24) {
            continue;
        }
        const uint32_t nb = qs_be32_load(e->data);
        const uint64_t dir_size = qs_be64_load(e->data + 8);
        const uint64_t dir_off = qs_be64_load(e->data + 16);
        if (dir_size > (64u << 20) || dir_off % cs ||
            dir_off + dir_size > img->file_size) {
            say(c, 0,
                "ERROR: bitmap directory at 0x%" PRIx64 " (%" PRIu64
                " bytes) is invalid",
                dir_off, dir_size);
            c->res->corruptions++;
            continue;
        }
        add_ref(c, dir_off, dir_size);
        uint8_t *dir = malloc(dir_size ? dir_size : 1);
        if (!dir || qs_host_read(img, dir, dir_size, dir_off) < 0) {
            free(dir);
            c->res->check_errors++;
            continue;
        }
        uint64_t pos = 0;
        for (uint32_t b = 0; b < nb && pos + 24 <= dir_size; b++) {
            const uint64_t t_off = qs_be64_load(dir + pos);
            const uint32_t t_size = qs_be32_load(dir + pos + 8);
            const uint16_t name_size = qs_be16_load(dir + pos + 18);
            const uint32_t extra = qs_be32_load(dir + pos + 20);
            if ((uint64_t)t_size * 8 <= (64u << 20) && t_off % cs == 0 &&
                t_off + (uint64_t)t_size * 8 <= img->file_size) {
                add_ref(c, t_off, (uint64_t)t_size * 8);
                uint8_t *t = malloc((size_t)t_size * 8 + 1);
                if (t && qs_host_read(img, t, (size_t)t_size * 8, t_off) == 0) {
                    for (uint32_t i = 0; i < t_size; i++) {
                        uint64_t d =
                            qs_be64_load(t + 8 * i) & QS_L2E_OFFSET_MASK;
                        if (d) {
                            add_ref(c, d, cs);
                        }
                    }
                }
                free(t);
            }
            pos += (24 + (uint64_t)extra + name_size + 7) & ~7ull;
        }
        free(dir);
    }
}

static int count_references(struct ctx *c)
{
    struct qsnap_image *img = c->img;
    const uint64_t cs = img->cluster_size;

    add_ref(c, 0, cs);
    add_ref(c, img->hdr.l1_table_offset, (uint64_t)img->l1_size * 8);
    walk_l1(c, img->l1, img->l1_size, true);
    int ret = walk_snapshots(c);
    if (ret < 0) {
        return ret;
    }
    walk_bitmaps(c);
    if (c->count_refcount_structures) {
        add_ref(c, img->hdr.refcount_table_offset,
                (uint64_t)img->hdr.refcount_table_clusters * cs);
        for (uint64_t i = 0; i < img->rt_size; i++) {
            const uint64_t e = img->rt[i];
            const uint64_t off = e & QS_RT_OFFSET_MASK;
            if (!e) {
                continue;
            }
            if ((e & ~QS_RT_OFFSET_MASK) || (off & (cs - 1)) || !off ||
                off >= img->file_size) {
                say(c, 0,
                    "ERROR refcount block %" PRIu64 " (0x%016" PRIx64
                    ") is invalid",
                    i, e);
                c->res->corruptions++;
                continue;
            }
            add_ref(c, off, cs);
        }
    }
    for (uint64_t i = 0; i < c->n_ref; i++) {
        if (c->use[i] == (USE_META | USE_DATA)) {
            say(c, 0,
                "ERROR cluster %" PRIu64 " (offset 0x%" PRIx64
                ") is used both by metadata and as guest data",
                i, i * cs);
            c->res->corruptions++;
        }
    }
    return 0;
}

static int ctx_init(struct ctx *c, struct qsnap_image *img,
                    struct qsnap_check_result *res)
{
    memset(c, 0, sizeof(*c));
    c->img = img;
    c->res = res;
    c->n_ref = QS_DIV_ROUND_UP(img->file_size, img->cluster_size) + 1;
    c->ref = calloc(c->n_ref, sizeof(*c->ref));
    c->use = calloc(c->n_ref, sizeof(*c->use));
    if (!c->ref || !c->use) {
        free(c->ref);
        free(c->use);
        return qs_error(img, -ENOMEM,
                        "%s: out of memory for %" PRIu64 " cluster counters",
                        img->filename, c->n_ref);
    }
    return 0;
}

/* Compares stored and computed refcounts; fixes leaks if asked. */
static int compare_refcounts(struct ctx *c, unsigned fix, bool *low,
                             uint64_t *highest)
{
    struct qsnap_image *img = c->img;
    const uint64_t per_block = 1ull << img->rb_bits;
    /* Like qemu-img, only the clusters of the file are compared. */
    const uint64_t limit = c->n_ref;
    for (uint64_t i = 0; i < limit; i++) {
        const uint64_t r = i / per_block;
        if (r >= img->rt_size || !img->rt[r]) {
            /* No block: stored 0 for the whole range. */
            const uint64_t end = QS_MIN(limit, (r + 1) * per_block);
            for (; i < end; i++) {
                if (c->ref[i]) {
                    say(c, 0,
                        "ERROR cluster %" PRIu64 " refcount=0 reference=%u", i,
                        c->ref[i]);
                    c->res->corruptions++;
                    *low = true;
                    *highest = i + 1;
                }
            }
            i = end - 1;
            continue;
        }
        uint64_t stored;
        if (qs_refcount_get(img, i, &stored) < 0) {
            c->res->check_errors++;
            i = (r + 1) * per_block - 1;
            continue;
        }
        const uint64_t want = c->ref[i];
        if (stored || want) {
            *highest = i + 1;
        }
        if (stored == want) {
            continue;
        }
        /* As qemu-img: a mismatch being fixed is reported as such; a
         * missing refcount needs the structures rebuilt. */
        const bool leak = stored > want;
        const bool fixing =
            stored != 0 &&
            (leak ? (fix & (QSNAP_CHECK_REPAIR_LEAKS | QSNAP_CHECK_REPAIR_ALL))
                  : (fix & QSNAP_CHECK_REPAIR_ALL));
        say(c, fixing ? 2 : (leak ? 1 : 0),
            "%s cluster %" PRIu64 " refcount=%" PRIu64 " reference=%" PRIu64,
            fixing ? "Repairing" : (leak ? "Leaked" : "ERROR"), i, stored,
            want);
        if (leak) {
            c->res->leaks++;
        } else {
            c->res->corruptions++;
        }
        if (stored == 0) {
            *low = true;
        } else if (fixing && qs_refcount_set(img, i, want) == 0) {
            if (leak) {
                c->res->leaks_fixed++;
            } else {
                c->res->corruptions_fixed++;
            }
        }
    }
    return 0;
}

/* COPIED must equal (refcount == 1) in the active tables. */
static int check_copied(struct ctx *c, bool fix)
{
    struct qsnap_image *img = c->img;
    for (uint32_t i = 0; i < img->l1_size; i++) {
        const uint64_t e = img->l1[i];
        const uint64_t off = e & QS_L1E_OFFSET_MASK;
        if (!off || (off & (img->cluster_size - 1)) || off >= img->file_size ||
            (e & QS_L1E_RESERVED)) {
            continue;
        }
        uint64_t rc;
        if (qs_refcount_get(img, off / img->cluster_size, &rc) < 0) {
            c->res->check_errors++;
            continue;
        }
        if ((rc == 1) != !!(e & QS_OFLAG_COPIED)) {
            say(c, 0,
                "ERROR OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%" PRIx64
                " refcount=%" PRIu64,
                i, e, rc);
            c->res->corruptions++;
            if (fix) {
                img->l1[i] =
                    rc == 1 ? e | QS_OFLAG_COPIED : e & ~QS_OFLAG_COPIED;
                if (!img->l1_dirty) {
                    img->l1_dirty = true;
                    img->l1_dirty_lo = i;
                    img->l1_dirty_hi = i;
                }
                img->l1_dirty_lo = QS_MIN(img->l1_dirty_lo, i);
                img->l1_dirty_hi = QS_MAX(img->l1_dirty_hi, i);
                c->res->corruptions_fixed++;
            }
        }
        void *l2;
        if (qs_cache_get(img->l2_cache, off, false, &l2) < 0) {
            c->res->check_errors++;
            continue;
        }
        bool dirty = false;
        for (uint64_t j = 0; j < img->l2_entries; j++) {
            const uint64_t d = qs_l2_entry_get(img, l2, j, NULL);
            const enum qs_ctype t = qs_l2_entry_type(img, d);
            if (t != QS_C_NORMAL && t != QS_C_ZERO_ALLOC) {
                continue;
            }
            const uint64_t doff = d & QS_L2E_OFFSET_MASK;
            if (doff & (img->cluster_size - 1)) {
                continue;
            }
            if (qs_refcount_get(img, doff / img->cluster_size, &rc) < 0) {
                c->res->check_errors++;
                continue;
            }
            if ((rc == 1) != !!(d & QS_OFLAG_COPIED)) {
                say(c, 0,
                    "ERROR OFLAG_COPIED data cluster: l2_entry=%" PRIx64
                    " refcount=%" PRIu64,
                    d, rc);
                c->res->corruptions++;
                if (fix && !img->ext_l2) {
                    const uint64_t nd =
                        rc == 1 ? d | QS_OFLAG_COPIED : d & ~QS_OFLAG_COPIED;
                    qs_be64_store((uint8_t *)l2 + j * 8, nd);
                    dirty = true;
                    c->res->corruptions_fixed++;
                }
            }
        }
        if (dirty) {
            qs_cache_mark_dirty(img->l2_cache, l2);
        }
        qs_cache_put(img->l2_cache, l2);
    }
    return 0;
}

static uint64_t image_end(const struct ctx *c, uint64_t *referenced)
{
    uint64_t hi = 0;
    *referenced = 0;
    for (uint64_t i = 0; i < c->n_ref; i++) {
        if (c->ref[i]) {
            hi = i + 1;
            (*referenced)++;
        }
    }
    return hi * c->img->cluster_size;
}

static int check_once(struct qsnap_image *img, unsigned flags,
                      struct qsnap_check_result *res,
                      qsnap_check_report_fn report, void *opaque,
                      bool *need_rebuild)
{
    struct ctx c;
    int ret = ctx_init(&c, img, res);
    if (ret < 0) {
        return ret;
    }
    c.report = report;
    c.opaque = opaque;
    c.count_refcount_structures = true;
    ret = count_references(&c);
    bool low = false;
    uint64_t highest = 0;
    if (ret == 0) {
        ret = compare_refcounts(&c, flags, &low, &highest);
    }
    if (ret == 0) {
        /* COPIED is repaired only against refcounts that are right. */
        ret = check_copied(&c, (flags & QSNAP_CHECK_REPAIR_ALL) && !low);
    }
    const uint64_t end = image_end(&c, &res->referenced_clusters);
    res->image_end_offset = QS_MAX(end, highest * img->cluster_size);
    res->total_clusters = QS_DIV_ROUND_UP(img->virtual_size, img->cluster_size);
    *need_rebuild = low;
    free(c.ref);
    free(c.use);
    return ret;
}

int qs_check(struct qsnap_image *img, unsigned flags,
             struct qsnap_check_result *res, qsnap_check_report_fn report,
             void *opaque)
{
    bool low = false;
    int ret = check_once(img, flags, res, report, opaque, &low);
    if (ret < 0 ||
        !(flags & (QSNAP_CHECK_REPAIR_LEAKS | QSNAP_CHECK_REPAIR_ALL))) {
        return ret;
    }
    const uint64_t leaks_fixed = res->leaks_fixed;
    uint64_t corruptions_fixed = res->corruptions_fixed;
    if (low && (flags & QSNAP_CHECK_REPAIR_ALL)) {
        ret = qs_rebuild_refcounts(img);
        if (ret < 0) {
            return ret;
        }
        corruptions_fixed = res->corruptions;
    }
    ret = qs_meta_sync(img);
    if (ret < 0) {
        return ret;
    }
    /* Check again so the result describes the repaired image. */
    struct qsnap_check_result again;
    memset(&again, 0, sizeof(again));
    again.struct_size = sizeof(again);
    ret = check_once(img, flags & QSNAP_CHECK_REPAIR_ALL, &again, NULL, NULL,
                     &low);
    if (ret == 0 && (flags & QSNAP_CHECK_REPAIR_ALL)) {
        ret = qs_meta_sync(img);
    }
    again.leaks_fixed = leaks_fixed;
    again.corruptions_fixed = corruptions_fixed;
    *res = again;
    return ret;
}

/* ------------------------------------------------------------ rebuild */

int qs_rebuild_refcounts(struct qsnap_image *img)
{
    const uint64_t cs = img->cluster_size;
    const uint64_t per_block = 1ull << img->rb_bits;
    struct qsnap_check_result dummy;
    memset(&dummy, 0, sizeof(dummy));

    struct ctx c;
    int ret = ctx_init(&c, img, &dummy);
    if (ret < 0) {
        return ret;
    }
    c.count_refcount_structures = false;
    ret = count_references(&c);
    if (ret < 0) {
        goto out;
    }
    uint64_t used = 0;
    for (uint64_t i = 0; i < c.n_ref; i++) {
        if (c.ref[i] > img->refcount_max) {
            ret =
                qs_error(img, -EOVERFLOW,
                         "%s: cluster %" PRIu64 " has %u references, more "
                         "than refcount_bits %u can count",
                         img->filename, i, c.ref[i], 1u << img->refcount_order);
            goto out;
        }
        if (c.ref[i]) {
            used = i + 1;
        }
    }

    /* New table + blocks after everything, covering themselves. */
    const uint64_t start = QS_MAX(used, QS_DIV_ROUND_UP(img->file_size, cs));
    uint64_t n_blocks = 1, t_clusters = 1;
    for (;;) {
        const uint64_t total = start + t_clusters + n_blocks;
        const uint64_t nb = QS_DIV_ROUND_UP(total, per_block);
        const uint64_t tc = QS_DIV_ROUND_UP(nb * 8, cs);
        if (nb <= n_blocks && tc <= t_clusters) {
            break;
        }
        n_blocks = QS_MAX(nb, n_blocks);
        t_clusters = QS_MAX(tc, t_clusters);
    }
    if (t_clusters * cs > QS_MAX_REFTABLE_BYTES) {
        ret = qs_error(img, -EFBIG, "%s: rebuilt refcount table too large",
                       img->filename);
        goto out;
    }
    const uint64_t t_off = start * cs;
    const uint64_t b_off = (start + t_clusters) * cs;
    uint8_t *blocks = qs_alloc_buf(n_blocks * cs);
    uint8_t *table = qs_alloc_buf(t_clusters * cs);
    if (!blocks || !table) {
        free(blocks);
        free(table);
        ret = -ENOMEM;
        goto out;
    }
    memset(blocks, 0, n_blocks * cs);
    memset(table, 0, t_clusters * cs);
    const uint64_t total = start + t_clusters + n_blocks;
    for (uint64_t i = 0; i < total; i++) {
        const uint64_t v = i < c.n_ref ? c.ref[i] : 0;
        const uint64_t rc = i >= start ? 1 : v;
        if (rc) {
            qs_rb_set(img, blocks + (i / per_block) * cs, i % per_block, rc);
        }
    }
    for (uint64_t b = 0; b < n_blocks; b++) {
        qs_be64_store(table + 8 * b, b_off + b * cs);
    }
    ret = qs_host_write(img, blocks, n_blocks * cs, b_off);
    if (ret == 0) {
        ret = qs_host_write(img, table, t_clusters * cs, t_off);
    }
    if (ret == 0) {
        ret = qs_io_flush(img->io);
    }
    if (ret == 0) {
        uint8_t f[12];
        qs_be64_store(f, t_off);
        qs_be32_store(f + 8, (uint32_t)t_clusters);
        ret = qs_header_switch(img, QS_HDR_OFF_REFTABLE, f, 12);
    }
    if (ret == 0) {
        /* Switch the in-memory view to the new structures. */
        qs_cache_reset(img->rb_cache);
        uint64_t *rt = calloc(t_clusters * cs / 8, sizeof(*rt));
        if (!rt) {
            ret = -ENOMEM;
        } else {
            for (uint64_t i = 0; i < t_clusters * cs / 8; i++) {
                rt[i] = qs_be64_load(table + 8 * i);
            }
            free(img->rt);
            img->rt = rt;
            img->rt_size = t_clusters * cs / 8;
            img->hdr.refcount_table_offset = t_off;
            img->hdr.refcount_table_clusters = (uint32_t)t_clusters;
            img->free_cluster_hint = 0;
            img->free_byte_offset = 0;
            img->n_pending = 0;
        }
    }
    if (ret < 0 && !img->errmsg[0]) {
        qs_error(img, ret, "%s: rebuilding refcounts: %s", img->filename,
                 qsnap_strerror(ret));
    }
    free(blocks);
    free(table);
out:
    free(c.ref);
    free(c.use);
    return ret;
}
