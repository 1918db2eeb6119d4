/*
 * snapshot.c - the internal snapshot table.
 *
 * Spec: docs/interop/qcow2.txt, "Snapshots".
 *
 * Invariants:
 *   1. Every loaded entry has its L1 table cluster-aligned and inside the
 *      file, its lengths bounded (extra data <= 1 KiB, table <= 64 MiB).
 *   2. Extra data past the fields we know is kept and written back.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qs_int.h"

#define QS_SN_HEADER_LEN 40u
#define QS_SN_MAX_EXTRA 1024u
#define QS_SN_MAX_TABLE (64u << 20)
#define QS_SN_KNOWN_EXTRA 24u

void qs_snapshot_table_free(struct qsnap_image *img)
{
    for (uint32_t i = 0; i < img->n_snapshots; i++) {
        free(img->snapshots[i].id);
        free(img->snapshots[i].name);
        free(img->snapshots[i].extra_unknown);
    }
    free(img->snapshots);
    img->snapshots = NULL;
    img->n_snapshots = 0;
    img->snapshot_table_bytes = 0;
}

static char *dup_bytes(const uint8_t *p, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, p, n);
        s[n] = '\0';
    }
    return s;
}

int qs_snapshot_table_load(struct qsnap_image *img)
{
    const struct qs_header *h = &img->hdr;
    const uint64_t cs = img->cluster_size;
    uint64_t pos = h->snapshots_offset;
    int ret = 0;

    if (h->nb_snapshots == 0) {
        return 0;
    }
    img->snapshots = calloc(h->nb_snapshots, sizeof(*img->snapshots));
    if (!img->snapshots) {
        return -ENOMEM;
    }
    uint8_t *var = malloc(QS_SN_MAX_EXTRA + 2 * 65535u);
    if (!var) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < h->nb_snapshots; i++) {
        struct qs_snapshot *sn = &img->snapshots[i];
        uint8_t fix[QS_SN_HEADER_LEN];

        if (pos - h->snapshots_offset + QS_SN_HEADER_LEN > QS_SN_MAX_TABLE ||
            pos + QS_SN_HEADER_LEN > img->file_size) {
            ret = QS_CORRUPT(img,
                             "%s: snapshot table entry %u at 0x%" PRIx64
                             " runs past the end of the file (%" PRIu64
                             " bytes) or the 64 MiB table limit",
                             img->filename, i, pos, img->file_size);
            goto out;
        }
        ret = qs_host_read(img, fix, sizeof(fix), pos);
        if (ret < 0) {
            goto out;
        }
        sn->l1_offset = qs_be64_load(fix);
        sn->l1_size = qs_be32_load(fix + 8);
        const uint32_t id_len = qs_be16_load(fix + 12);
        const uint32_t name_len = qs_be16_load(fix + 14);
        sn->date_sec = qs_be32_load(fix + 16);
        sn->date_nsec = qs_be32_load(fix + 20);
        sn->vm_clock_ns = qs_be64_load(fix + 24);
        sn->vm_state_size = qs_be32_load(fix + 32);
        sn->extra_size = qs_be32_load(fix + 36);
        sn->disk_size = h->size;
        sn->icount = -1;

        if (sn->extra_size > QS_SN_MAX_EXTRA) {
            ret = QS_CORRUPT(img,
                             "%s: snapshot %u: extra_data_size %u exceeds "
                             "%u bytes",
                             img->filename, i, sn->extra_size, QS_SN_MAX_EXTRA);
            goto out;
        }
        const uint64_t var_len = (uint64_t)sn->extra_size + id_len + name_len;
        const uint64_t entry_len = (QS_SN_HEADER_LEN + var_len + 7) & ~7ull;
        if (pos - h->snapshots_offset + entry_len > QS_SN_MAX_TABLE ||
            pos + QS_SN_HEADER_LEN + var_len > img->file_size) {
            ret = QS_CORRUPT(img,
                             "%s: snapshot %u (%" PRIu64 " bytes at 0x%" PRIx64
                             ") runs past the end of the file or the table "
                             "limit",
                             img->filename, i, entry_len, pos);
            goto out;
        }
        ret = qs_host_read(img, var, var_len, pos + QS_SN_HEADER_LEN);
        if (ret < 0) {
            goto out;
        }
        const uint8_t *x = var;
        if (sn->extra_size >= 8) {
            sn->vm_state_size = qs_be64_load(x);
        }
        if (sn->extra_size >= 16) {
            sn->disk_size = qs_be64_load(x + 8);
        }
        if (sn->extra_size >= 24) {
            sn->icount = (int64_t)qs_be64_load(x + 16);
        }
        if (sn->extra_size > QS_SN_KNOWN_EXTRA) {
            sn->extra_unknown_len = sn->extra_size - QS_SN_KNOWN_EXTRA;
            sn->extra_unknown = malloc(sn->extra_unknown_len);
            if (!sn->extra_unknown) {
                ret = -ENOMEM;
                goto out;
            }
            memcpy(sn->extra_unknown, x + QS_SN_KNOWN_EXTRA,
                   sn->extra_unknown_len);
        }
        sn->id = dup_bytes(var + sn->extra_size, id_len);
        sn->name = dup_bytes(var + sn->extra_size + id_len, name_len);
        img->n_snapshots = i + 1;
        if (!sn->id || !sn->name) {
            ret = -ENOMEM;
            goto out;
        }

        const uint64_t l1_bytes = (uint64_t)sn->l1_size * 8;
        if (sn->l1_offset % cs || l1_bytes > QS_MAX_L1_BYTES ||
            (l1_bytes &&
             (sn->l1_offset < cs || sn->l1_offset > img->file_size ||
              l1_bytes > img->file_size - sn->l1_offset))) {
            ret = QS_CORRUPT(img,
                             "%s: snapshot %s (id %s): L1 table at 0x%" PRIx64
                             " with %u entries is unaligned, too large or "
                             "outside the file",
                             img->filename, sn->name, sn->id, sn->l1_offset,
                             sn->l1_size);
            goto out;
        }
        pos += entry_len;
    }
    img->snapshot_table_bytes = pos - h->snapshots_offset;

out:
    free(var);
    if (ret < 0) {
        qs_snapshot_table_free(img);
    }
    return ret;
}

/* ------------------------------------------------------------ helpers */

int qs_l1_load(struct qsnap_image *img, uint64_t off, uint32_t n,
               uint64_t **out)
{
    uint64_t *l1 = calloc(n ? n : 1, sizeof(*l1));
    if (!l1) {
        return -ENOMEM;
    }
    int ret = n ? qs_host_read(img, l1, (size_t)n * 8, off) : 0;
    if (ret < 0) {
        free(l1);
        return qs_error(img, ret,
                        "%s: reading an L1 table at 0x%" PRIx64 ": %s",
                        img->filename, off, qsnap_strerror(ret));
    }
    for (uint32_t i = 0; i < n; i++) {
        l1[i] = qs_be64_load(&l1[i]);
    }
    *out = l1;
    return 0;
}

static int find_snapshot(const struct qsnap_image *img, const char *key)
{
    for (uint32_t i = 0; i < img->n_snapshots; i++) {
        if (strcmp(img->snapshots[i].id, key) == 0) {
            return (int)i;
        }
    }
    for (uint32_t i = 0; i < img->n_snapshots; i++) {
        if (strcmp(img->snapshots[i].name, key) == 0) {
            return (int)i;
        }
    }
    return -1;
}

int qs_snapshot_lookup(struct qsnap_image *img, const char *key)
{
    if (!key) {
        return qs_error(img, -EINVAL, "%s: no snapshot name given",
                        img->filename);
    }
    int i = find_snapshot(img, key);
    if (i < 0) {
        return qs_error(img, -ENOENT, "%s: no snapshot with ID or name '%s'",
                        img->filename, key);
    }
    return i;
}

static int writable(struct qsnap_image *img)
{
    if (img->format != QSNAP_FMT_QCOW2) {
        return qs_error(img, -ENOTSUP,
                        "%s: only qcow2 images have "
                        "snapshots",
                        img->filename);
    }
    if (!img->rw) {
        return qs_error(img, -EROFS, "%s: image is open read-only",
                        img->filename);
    }
    if (img->corrupt) {
        return qs_error(img, -EROFS, "%s: %s; no further writes", img->filename,
                        qs_stop_reason(img));
    }
    return 0;
}

static uint64_t entry_len(const struct qs_snapshot *sn)
{
    const uint64_t extra = QS_SN_KNOWN_EXTRA + sn->extra_unknown_len;
    return (QS_SN_HEADER_LEN + extra + strlen(sn->id) + strlen(sn->name) + 7) &
           ~7ull;
}

static void encode_entry(const struct qs_snapshot *sn, uint8_t *p)
{
    const uint32_t extra = QS_SN_KNOWN_EXTRA + sn->extra_unknown_len;
    const size_t id_len = strlen(sn->id), name_len = strlen(sn->name);

    memset(p, 0, entry_len(sn));
    qs_be64_store(p, sn->l1_offset);
    qs_be32_store(p + 8, sn->l1_size);
    qs_be16_store(p + 12, (uint16_t)id_len);
    qs_be16_store(p + 14, (uint16_t)name_len);
    qs_be32_store(p + 16, sn->date_sec);
    qs_be32_store(p + 20, sn->date_nsec);
    qs_be64_store(p + 24, sn->vm_clock_ns);
    /* The legacy 32-bit field, as QEMU writes it (truncated). */
    qs_be32_store(p + 32, (uint32_t)sn->vm_state_size);
    qs_be32_store(p + 36, extra);
    qs_be64_store(p + 40, sn->vm_state_size);
    qs_be64_store(p + 48, sn->disk_size);
    qs_be64_store(p + 56, (uint64_t)sn->icount);
    if (sn->extra_unknown_len) {
        memcpy(p + 64, sn->extra_unknown, sn->extra_unknown_len);
    }
    memcpy(p + QS_SN_HEADER_LEN + extra, sn->id, id_len);
    memcpy(p + QS_SN_HEADER_LEN + extra + id_len, sn->name, name_len);
}

/*
 * Writes `list` as the new snapshot table: new clusters, flushed, then the
 * 12-byte header write (nb_snapshots, snapshots_offset) as the commit
 * point, then the old table is freed.  On success img owns `list`.
 */
static int table_commit(struct qsnap_image *img, struct qs_snapshot *list,
                        uint32_t n)
{
    const uint64_t cs = img->cluster_size;
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++) {
        bytes += entry_len(&list[i]);
    }
    if (bytes > QS_SN_MAX_TABLE) {
        return qs_error(img, -EFBIG,
                        "%s: the snapshot table would be %" PRIu64
                        " bytes, over the limit of %u",
                        img->filename, bytes, QS_SN_MAX_TABLE);
    }
    uint64_t off = 0;
    int ret = 0;
    if (n) {
        const uint64_t n_cl = QS_DIV_ROUND_UP(bytes, cs);
        uint8_t *buf = qs_alloc_buf(n_cl * cs);
        if (!buf) {
            return -ENOMEM;
        }
        memset(buf, 0, n_cl * cs);
        uint64_t pos = 0;
        for (uint32_t i = 0; i < n; i++) {
            encode_entry(&list[i], buf + pos);
            pos += entry_len(&list[i]);
        }
        ret = qs_alloc_clusters(img, n_cl, &off);
        /* The table's refcount and contents are durable before the
         * header points at them. */
        if (ret == 0) {
            ret = qs_host_write(img, buf, n_cl * cs, off);
        }
        free(buf);
        if (ret == 0) {
            ret = qs_meta_sync(img);
        }
        if (ret < 0) {
            return ret;
        }
    }
    uint8_t f[12];
    qs_be32_store(f, n);
    qs_be64_store(f + 4, off);
    ret = qs_header_switch(img, QS_HDR_OFF_SNAPSHOTS, f, sizeof(f));
    if (ret < 0) {
        return ret;
    }
    const uint64_t old_off = img->hdr.snapshots_offset;
    const uint64_t old_bytes = img->snapshot_table_bytes;
    const uint32_t had = img->n_snapshots;
    img->hdr.nb_snapshots = n;
    img->hdr.snapshots_offset = off;
    img->snapshot_table_bytes = bytes;
    if (had && old_bytes) {
        ret =
            qs_free_deferred(img, old_off, QS_DIV_ROUND_UP(old_bytes, cs) * cs);
    }
    return ret;
}

/* Frees the owned strings of entries not carried into a new list. */
static void snapshot_free_fields(struct qs_snapshot *sn)
{
    free(sn->id);
    free(sn->name);
    free(sn->extra_unknown);
}

/*
 * Adds `delta` (+1 now, or -1 deferred) to the L2 tables and data of the
 * tree under `l1`.  With `clear_copied`, also drops COPIED from the
 * active tables (they are about to be shared).
 */
int qs_tree_refcount(struct qsnap_image *img, const uint64_t *l1, uint32_t n,
                     int delta, bool clear_copied)
{
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
        void *l2;
        ret = qs_cache_get(img->l2_cache, l2_off, false, &l2);
        if (ret < 0) {
            return ret;
        }
        bool dirty = false;
        for (uint64_t j = 0; j < img->l2_entries && ret == 0; j++) {
            const uint64_t e = qs_l2_entry_get(img, l2, j, NULL);
            uint64_t off = 0, len = 0;
            switch (qs_l2_entry_type(img, e)) {
            case QS_C_NORMAL:
            case QS_C_ZERO_ALLOC:
                off = e & QS_L2E_OFFSET_MASK;
                len = cs;
                break;
            case QS_C_COMPRESSED:
                qs_compressed_range(img, e, &off, &len);
                break;
            default:
                break;
            }
            if (len) {
                ret = delta > 0 ? qs_refcount_update(img, off, len, delta)
                                : qs_free_deferred(img, off, len);
            }
            if (clear_copied && (e & QS_OFLAG_COPIED) && !img->ext_l2) {
                qs_be64_store((uint8_t *)l2 + j * 8, e & ~QS_OFLAG_COPIED);
                dirty = true;
            }
        }
        if (dirty) {
            qs_cache_mark_dirty(img->l2_cache, l2);
        }
        qs_cache_put(img->l2_cache, l2);
        if (ret == 0) {
            ret = delta > 0 ? qs_refcount_update(img, l2_off, cs, delta)
                            : qs_free_deferred(img, l2_off, cs);
        }
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

static void l1_mark_range(struct qsnap_image *img, uint32_t lo, uint32_t hi)
{
    if (!img->l1_dirty) {
        img->l1_dirty = true;
        img->l1_dirty_lo = lo;
        img->l1_dirty_hi = hi;
        return;
    }
    img->l1_dirty_lo = QS_MIN(img->l1_dirty_lo, lo);
    img->l1_dirty_hi = QS_MAX(img->l1_dirty_hi, hi);
}

int qs_refresh_copied(struct qsnap_image *img)
{
    const uint64_t cs = img->cluster_size;
    for (uint32_t i = 0; i < img->l1_size; i++) {
        uint64_t l2_off, rc;
        int ret = qs_l1_validate_entry(img, img->l1, i, &l2_off);
        if (ret < 0) {
            return ret;
        }
        if (!l2_off) {
            continue;
        }
        ret = qs_refcount_get(img, l2_off / cs, &rc);
        if (ret < 0) {
            return ret;
        }
        const uint64_t want = rc == 1 ? img->l1[i] | QS_OFLAG_COPIED
                                      : img->l1[i] & ~QS_OFLAG_COPIED;
        if (want != img->l1[i]) {
            img->l1[i] = want;
            l1_mark_range(img, i, i);
        }
        if (rc != 1 || img->ext_l2) {
            continue; /* shared tables are copied before any change */
        }
        void *l2;
        ret = qs_cache_get(img->l2_cache, l2_off, false, &l2);
        if (ret < 0) {
            return ret;
        }
        bool dirty = false;
        for (uint64_t j = 0; j < img->l2_entries && ret == 0; j++) {
            const uint64_t e = qs_l2_entry_get(img, l2, j, NULL);
            const enum qs_ctype t = qs_l2_entry_type(img, e);
            uint64_t ne = e & ~QS_OFLAG_COPIED;
            if (t == QS_C_NORMAL || t == QS_C_ZERO_ALLOC) {
                ret = qs_refcount_get(img, (e & QS_L2E_OFFSET_MASK) / cs, &rc);
                if (rc == 1) {
                    ne |= QS_OFLAG_COPIED;
                }
            } else if (t != QS_C_COMPRESSED) {
                ne = e; /* unallocated/zero entries carry no COPIED */
            }
            if (ret == 0 && ne != e) {
                qs_be64_store((uint8_t *)l2 + j * 8, ne);
                dirty = true;
            }
        }
        if (dirty) {
            qs_cache_mark_dirty(img->l2_cache, l2);
        }
        qs_cache_put(img->l2_cache, l2);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

/* Everything synced and every queued free applied: a clean base. */
int qs_settle(struct qsnap_image *img)
{
    int ret = qs_meta_sync(img);
    if (ret == 0) {
        ret = qs_refcount_drain(img);
    }
    return ret;
}

bool qs_view_open_on(const struct qsnap_image *img, uint64_t l1_offset)
{
    for (const struct qsnap_view *v = img->views; v; v = v->next) {
        if (v->l1_offset == l1_offset) {
            return true;
        }
    }
    return false;
}

/* ------------------------------------------------------------ public */

QSNAP_API void qsnap_snapshot_opts_init(struct qsnap_snapshot_opts *opts)
{
    memset(opts, 0, sizeof(*opts));
    opts->struct_size = sizeof(*opts);
    opts->icount = -1;
}

QSNAP_API int qsnap_snapshot_list(qsnap_image *img,
                                  struct qsnap_snapshot_info **list,
                                  uint32_t *count)
{
    if (!img || !list || !count) {
        return -EINVAL;
    }
    pthread_rwlock_rdlock(&img->lock);
    const uint32_t n = img->n_snapshots;
    struct qsnap_snapshot_info *l = calloc(n ? n : 1, sizeof(*l));
    int ret = l ? 0 : -ENOMEM;
    for (uint32_t i = 0; i < n && ret == 0; i++) {
        const struct qs_snapshot *sn = &img->snapshots[i];
        l[i].struct_size = sizeof(l[i]);
        l[i].id = strdup(sn->id);
        l[i].name = strdup(sn->name);
        if (!l[i].id || !l[i].name) {
            ret = -ENOMEM;
        }
        l[i].date_sec = sn->date_sec;
        l[i].date_nsec = sn->date_nsec;
        l[i].vm_clock_ns = sn->vm_clock_ns;
        l[i].vm_state_size = sn->vm_state_size;
        l[i].disk_size = sn->disk_size;
        l[i].icount = sn->icount;
        l[i].l1_size = sn->l1_size;
    }
    pthread_rwlock_unlock(&img->lock);
    if (ret < 0) {
        qsnap_snapshot_list_free(l, n);
        return ret;
    }
    *list = l;
    *count = n;
    return 0;
}

QSNAP_API void qsnap_snapshot_list_free(struct qsnap_snapshot_info *list,
                                        uint32_t count)
{
    if (!list) {
        return;
    }
    for (uint32_t i = 0; i < count; i++) {
        free(list[i].id);
        free(list[i].name);
    }
    free(list);
}

int qs_snapshot_check_name(struct qsnap_image *img, const char *name)
{
    if (!name || !name[0] || strlen(name) > 1023) {
        return qs_error(img, -EINVAL,
                        "%s: snapshot names must be 1 to 1023 bytes",
                        img->filename);
    }
    if (find_snapshot(img, name) >= 0) {
        return qs_error(img, -EEXIST,
                        "%s: a snapshot with ID or name '%s' already exists",
                        img->filename, name);
    }
    return 0;
}

/* Copies a snapshot entry's owned fields (for a new list). */
static int copy_entry(struct qs_snapshot *dst, const struct qs_snapshot *src)
{
    *dst = *src;
    dst->id = strdup(src->id);
    dst->name = strdup(src->name);
    dst->extra_unknown = NULL;
    if (src->extra_unknown_len) {
        dst->extra_unknown = malloc(src->extra_unknown_len);
        if (dst->extra_unknown) {
            memcpy(dst->extra_unknown, src->extra_unknown,
                   src->extra_unknown_len);
        }
    }
    if (!dst->id || !dst->name ||
        (src->extra_unknown_len && !dst->extra_unknown)) {
        snapshot_free_fields(dst);
        return -ENOMEM;
    }
    return 0;
}

static void free_list(struct qs_snapshot *list, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        snapshot_free_fields(&list[i]);
    }
    free(list);
}

/* A copy of the current table, optionally skipping one entry. */
static int clone_table(struct qsnap_image *img, int skip, uint32_t extra,
                       struct qs_snapshot **out, uint32_t *n_out)
{
    const uint32_t n = img->n_snapshots;
    struct qs_snapshot *l = calloc(n + extra + 1, sizeof(*l));
    if (!l) {
        return -ENOMEM;
    }
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++) {
        if ((int)i == skip) {
            continue;
        }
        if (copy_entry(&l[k], &img->snapshots[i]) < 0) {
            free_list(l, k);
            return -ENOMEM;
        }
        k++;
    }
    *out = l;
    *n_out = k;
    return 0;
}

static int commit_clone(struct qsnap_image *img, struct qs_snapshot *l,
                        uint32_t n)
{
    int ret = table_commit(img, l, n);
    if (ret < 0) {
        free_list(l, n);
        return ret;
    }
    free_list(img->snapshots, img->n_snapshots);
    img->snapshots = l;
    img->n_snapshots = n;
    return qs_refcount_drain(img);
}

int qs_snapshot_create_locked(struct qsnap_image *img, const char *name,
                              const struct qsnap_snapshot_opts *o,
                              uint64_t vm_state_size)
{
    const uint64_t cs = img->cluster_size;
    int ret = qs_snapshot_check_name(img, name);
    if (ret < 0) {
        return ret;
    }
    if (img->refcount_max < 2) {
        return qs_error(img, -EOVERFLOW,
                        "%s: refcount_bits=%u cannot count a second reference "
                        "to a cluster, so snapshots are impossible",
                        img->filename, 1u << img->refcount_order);
    }
    if (img->n_snapshots >= QS_MAX_SNAPSHOTS) {
        return qs_error(img, -EFBIG, "%s: already %u snapshots (the limit)",
                        img->filename, img->n_snapshots);
    }
    /* A damaged L1 entry is refused before any refcount changes. */
    for (uint32_t i = 0; i < img->l1_size; i++) {
        uint64_t l2_off;
        if ((ret = qs_l1_validate_entry(img, img->l1, i, &l2_off)) < 0) {
            return ret;
        }
    }
    if ((ret = qs_txn_begin(img)) < 0 || (ret = qs_settle(img)) < 0) {
        return ret;
    }

    /* The new entry. */
    uint64_t max_id = 0;
    for (uint32_t i = 0; i < img->n_snapshots; i++) {
        char *end;
        unsigned long long v = strtoull(img->snapshots[i].id, &end, 10);
        if (*end == '\0' && v > max_id) {
            max_id = v;
        }
    }
    struct qs_snapshot sn;
    memset(&sn, 0, sizeof(sn));
    char idbuf[32];
    snprintf(idbuf, sizeof(idbuf), "%" PRIu64, max_id + 1);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    sn.date_sec = o->date_sec ? (uint32_t)o->date_sec : (uint32_t)now.tv_sec;
    sn.date_nsec = o->date_sec ? o->date_nsec : (uint32_t)now.tv_nsec;
    sn.vm_clock_ns = o->vm_clock_ns;
    sn.icount = o->icount;
    sn.vm_state_size = vm_state_size;
    sn.disk_size = img->virtual_size;
    sn.l1_size = img->l1_size;

    /* 1. Every L2 table and data cluster gains a reference. */
    ret = qs_tree_refcount(img, img->l1, img->l1_size, 1, true);
    if (ret < 0) {
        return ret;
    }
    uint8_t *buf = NULL;
    if (img->l1_size) {
        for (uint32_t i = 0; i < img->l1_size; i++) {
            img->l1[i] &= ~QS_OFLAG_COPIED;
        }
        l1_mark_range(img, 0, img->l1_size - 1);
        /* 2. The L1 copy, in new clusters. */
        const uint64_t bytes = (uint64_t)img->l1_size * 8;
        const uint64_t n_cl = QS_DIV_ROUND_UP(bytes, cs);
        buf = qs_alloc_buf(n_cl * cs);
        if (!buf) {
            return -ENOMEM;
        }
        memset(buf, 0, n_cl * cs);
        for (uint32_t i = 0; i < img->l1_size; i++) {
            qs_be64_store(buf + 8 * i, img->l1[i]);
        }
        ret = qs_alloc_clusters(img, n_cl, &sn.l1_offset);
        if (ret == 0) {
            ret = qs_host_write(img, buf, n_cl * cs, sn.l1_offset);
        }
        free(buf);
        if (ret < 0) {
            return ret;
        }
    }
    /* 3. Refcounts, cleared COPIED flags and the copy are durable ... */
    ret = qs_meta_sync(img);
    if (ret < 0) {
        return ret;
    }
    /* 4. ... before the table entry that makes them a snapshot. */
    struct qs_snapshot *l;
    uint32_t n;
    ret = clone_table(img, -1, 1, &l, &n);
    if (ret < 0) {
        return ret;
    }
    sn.id = strdup(idbuf);
    sn.name = strdup(name);
    if (!sn.id || !sn.name) {
        snapshot_free_fields(&sn);
        free_list(l, n);
        return -ENOMEM;
    }
    l[n++] = sn;
    ret = commit_clone(img, l, n);
    return ret < 0 ? ret : qs_txn_end(img);
}

QSNAP_API int qsnap_snapshot_create(qsnap_image *img, const char *name,
                                    const struct qsnap_snapshot_opts *opts)
{
    struct qsnap_snapshot_opts o;
    qsnap_snapshot_opts_init(&o);
    if (!img) {
        return -EINVAL;
    }
    if (opts) {
        memcpy(&o, opts, QS_MIN(opts->struct_size, sizeof(o)));
    }
    qs_lock_exclusive(img);
    int ret = writable(img);
    if (ret == 0) {
        ret = qs_snapshot_create_locked(img, name, &o, 0);
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

static int snapshot_apply_locked(struct qsnap_image *img, int idx)
{
    const uint64_t cs = img->cluster_size;
    const struct qs_snapshot *sn = &img->snapshots[idx];
    int ret;
    if ((ret = qs_txn_begin(img)) < 0 || (ret = qs_settle(img)) < 0) {
        return ret;
    }
    uint64_t *sl1;
    ret = qs_l1_load(img, sn->l1_offset, sn->l1_size, &sl1);
    if (ret < 0) {
        return ret;
    }
    const uint32_t n = QS_MAX(sn->l1_size, img->l1_size);
    uint64_t *nl1 = calloc(n ? n : 1, sizeof(*nl1));
    const uint64_t n_cl = QS_DIV_ROUND_UP((uint64_t)n * 8, cs);
    uint8_t *buf = qs_alloc_buf(n_cl ? n_cl * cs : cs);
    if (!nl1 || !buf) {
        ret = -ENOMEM;
        goto out;
    }
    memset(buf, 0, n_cl * cs);
    for (uint32_t i = 0; i < sn->l1_size; i++) {
        nl1[i] = sl1[i] & ~QS_OFLAG_COPIED;
        qs_be64_store(buf + 8 * i, nl1[i]);
    }
    /* 1. The snapshot's tree gains the active reference. */
    ret = qs_tree_refcount(img, sl1, sn->l1_size, 1, false);
    uint64_t new_off = 0;
    if (ret == 0 && n) {
        ret = qs_alloc_clusters(img, n_cl, &new_off);
    }
    if (ret == 0 && n) {
        ret = qs_host_write(img, buf, n_cl * cs, new_off);
    }
    /* 2. All of that durable before the header switches. */
    if (ret == 0) {
        ret = qs_meta_sync(img);
    }
    if (ret < 0) {
        goto out;
    }
    /* 3. Commit point: size, L1 size and offset in one 24-byte write. */
    uint8_t f[24];
    qs_be64_store(f, sn->disk_size);
    qs_be32_store(f + 8, img->hdr.crypt_method);
    qs_be32_store(f + 12, n);
    qs_be64_store(f + 16, new_off);
    ret = qs_header_switch(img, QS_HDR_OFF_SIZE, f, sizeof(f));
    if (ret < 0) {
        goto out;
    }
    uint64_t *old = img->l1;
    const uint32_t old_n = img->l1_size;
    const uint64_t old_off = img->hdr.l1_table_offset;
    img->l1 = nl1;
    nl1 = NULL;
    img->l1_size = n;
    img->l1_dirty = false;
    img->hdr.l1_size = n;
    img->hdr.l1_table_offset = new_off;
    img->hdr.size = sn->disk_size;
    img->virtual_size = sn->disk_size;

    /* 4. The old tree loses the active reference (frees what only it
     *    used); then COPIED is recomputed for the new active tree. */
    ret = qs_tree_refcount(img, old, old_n, -1, false);
    if (ret == 0 && old_n) {
        ret = qs_free_deferred(img, old_off,
                               QS_DIV_ROUND_UP((uint64_t)old_n * 8, cs) * cs);
    }
    free(old);
    if (ret == 0) {
        ret = qs_refcount_drain(img);
    }
    if (ret == 0) {
        ret = qs_refresh_copied(img);
    }
    if (ret == 0) {
        ret = qs_txn_end(img);
    }
out:
    free(sl1);
    free(nl1);
    free(buf);
    return ret;
}

QSNAP_API int qsnap_snapshot_apply(qsnap_image *img, const char *id_or_name)
{
    if (!img) {
        return -EINVAL;
    }
    qs_lock_exclusive(img);
    int ret = writable(img);
    if (ret == 0 && img->ckpt) {
        ret = qs_error(img, -EBUSY,
                       "%s: cannot apply a snapshot while a checkpoint is "
                       "open",
                       img->filename);
    }
    int idx = ret == 0 ? qs_snapshot_lookup(img, id_or_name) : ret;
    if (idx >= 0) {
        ret = snapshot_apply_locked(img, idx);
    } else {
        ret = idx;
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

static int snapshot_delete_locked(struct qsnap_image *img, int idx)
{
    const uint64_t cs = img->cluster_size;
    const struct qs_snapshot *sn = &img->snapshots[idx];
    if (qs_view_open_on(img, sn->l1_offset)) {
        return qs_error(img, -EBUSY,
                        "%s: snapshot '%s' (ID %s) is open for reading",
                        img->filename, sn->name, sn->id);
    }
    int ret;
    if ((ret = qs_txn_begin(img)) < 0 || (ret = qs_settle(img)) < 0) {
        return ret;
    }
    uint64_t *sl1;
    const uint64_t l1_off = sn->l1_offset;
    const uint32_t l1_n = sn->l1_size;
    ret = qs_l1_load(img, l1_off, l1_n, &sl1);
    if (ret < 0) {
        return ret;
    }
    /* 1. Commit point: the table without the entry. */
    struct qs_snapshot *l;
    uint32_t n;
    ret = clone_table(img, idx, 0, &l, &n);
    if (ret == 0) {
        ret = commit_clone(img, l, n);
    }
    /* 2. From here a crash only leaks: release the snapshot's tree. */
    if (ret == 0) {
        ret = qs_tree_refcount(img, sl1, l1_n, -1, false);
    }
    if (ret == 0 && l1_n) {
        ret = qs_free_deferred(img, l1_off,
                               QS_DIV_ROUND_UP((uint64_t)l1_n * 8, cs) * cs);
    }
    free(sl1);
    if (ret == 0) {
        ret = qs_refcount_drain(img);
    }
    /* 3. Clusters now used by the active disk alone become writable. */
    if (ret == 0) {
        ret = qs_refresh_copied(img);
    }
    if (ret == 0) {
        ret = qs_txn_end(img);
    }
    return ret;
}

QSNAP_API int qsnap_snapshot_delete(qsnap_image *img, const char *id_or_name)
{
    if (!img) {
        return -EINVAL;
    }
    qs_lock_exclusive(img);
    int ret = writable(img);
    int idx = ret == 0 ? qs_snapshot_lookup(img, id_or_name) : ret;
    ret = idx >= 0 ? snapshot_delete_locked(img, idx) : idx;
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

int qs_snapshot_table_rewrite(struct qsnap_image *img)
{
    struct qs_snapshot *l;
    uint32_t n;
    int ret = clone_table(img, -1, 0, &l, &n);
    return ret < 0 ? ret : commit_clone(img, l, n);
}

QSNAP_API int qsnap_snapshot_rename(qsnap_image *img, const char *id_or_name,
                                    const char *new_name)
{
    if (!img) {
        return -EINVAL;
    }
    qs_lock_exclusive(img);
    int ret = writable(img);
    int idx = ret == 0 ? qs_snapshot_lookup(img, id_or_name) : ret;
    if (idx >= 0) {
        ret = qs_snapshot_check_name(img, new_name);
    } else {
        ret = idx;
    }
    if (ret == 0) {
        ret = qs_settle(img);
    }
    struct qs_snapshot *l = NULL;
    uint32_t n = 0;
    if (ret == 0) {
        ret = clone_table(img, -1, 0, &l, &n);
    }
    if (ret == 0) {
        char *nn = strdup(new_name);
        if (!nn) {
            free_list(l, n);
            ret = -ENOMEM;
        } else {
            free(l[idx].name);
            l[idx].name = nn;
            ret = commit_clone(img, l, n);
        }
    }
    if (ret == 0) {
        ret = qs_meta_sync(img);
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

/* Counts the references the tree under `l1` holds, per host cluster. */
static int count_tree(struct qsnap_image *img, const uint64_t *l1, uint32_t n,
                      uint64_t l1_off, uint32_t *cnt, uint64_t n_cnt)
{
    const uint64_t cs = img->cluster_size;
#define BUMP(off, len)                                                         \
    do {                                                                       \
        for (uint64_t c_ = (off) / cs; c_ <= ((off) + (len)-1) / cs; c_++) {   \
            if (c_ < n_cnt && cnt[c_] != UINT32_MAX) {                         \
                cnt[c_]++;                                                     \
            }                                                                  \
        }                                                                      \
    } while (0)
    if (n) {
        BUMP(l1_off, (uint64_t)n * 8);
    }
    for (uint32_t i = 0; i < n; i++) {
        uint64_t l2_off;
        int ret = qs_l1_validate_entry(img, l1, i, &l2_off);
        if (ret < 0) {
            return ret;
        }
        if (!l2_off) {
            continue;
        }
        BUMP(l2_off, cs);
        void *l2;
        ret = qs_cache_get(img->l2_cache, l2_off, false, &l2);
        if (ret < 0) {
            return ret;
        }
        for (uint64_t j = 0; j < img->l2_entries; j++) {
            const uint64_t e = qs_l2_entry_get(img, l2, j, NULL);
            uint64_t off, len;
            switch (qs_l2_entry_type(img, e)) {
            case QS_C_NORMAL:
            case QS_C_ZERO_ALLOC:
                BUMP(e & QS_L2E_OFFSET_MASK, cs);
                break;
            case QS_C_COMPRESSED:
                qs_compressed_range(img, e, &off, &len);
                BUMP(off, len);
                break;
            default:
                break;
            }
        }
        qs_cache_put(img->l2_cache, l2);
    }
#undef BUMP
    return 0;
}

QSNAP_API int qsnap_snapshot_exclusive_size(qsnap_image *img,
                                            const char *id_or_name,
                                            uint64_t *bytes)
{
    if (!img || !bytes) {
        return -EINVAL;
    }
    qs_lock_exclusive(img);
    int idx = qs_snapshot_lookup(img, id_or_name);
    int ret = idx < 0 ? idx : 0;
    uint64_t *sl1 = NULL;
    uint32_t *cnt = NULL;
    const uint64_t cs = img->cluster_size;
    const uint64_t n_cnt = QS_DIV_ROUND_UP(img->file_size, cs);
    if (ret == 0 && img->rw) {
        ret = qs_settle(img);
    }
    if (ret == 0) {
        const struct qs_snapshot *sn = &img->snapshots[idx];
        ret = qs_l1_load(img, sn->l1_offset, sn->l1_size, &sl1);
        cnt = calloc(n_cnt ? n_cnt : 1, sizeof(*cnt));
        if (ret == 0 && !cnt) {
            ret = -ENOMEM;
        }
        if (ret == 0) {
            ret = count_tree(img, sl1, sn->l1_size, sn->l1_offset, cnt, n_cnt);
        }
    }
    uint64_t total = 0;
    for (uint64_t c = 0; ret == 0 && c < n_cnt; c++) {
        if (!cnt[c]) {
            continue;
        }
        uint64_t rc;
        ret = qs_refcount_get(img, c, &rc);
        if (ret == 0 && rc == cnt[c]) {
            total += cs;
        }
    }
    pthread_rwlock_unlock(&img->lock);
    free(sl1);
    free(cnt);
    if (ret == 0) {
        *bytes = total;
    }
    return ret;
}

/* ------------------------------------------------------------ views */

QSNAP_API int qsnap_view_open(qsnap_image *img, const char *id_or_name,
                              qsnap_view **out)
{
    if (!img || !out) {
        return -EINVAL;
    }
    struct qsnap_view *v = calloc(1, sizeof(*v));
    if (!v) {
        return -ENOMEM;
    }
    /* Snapshot tables and the view list only: writes in flight touch
     * neither, so they need not end first. */
    pthread_rwlock_wrlock(&img->lock);
    int idx = img->format == QSNAP_FMT_QCOW2
                  ? qs_snapshot_lookup(img, id_or_name)
                  : -ENOENT;
    int ret = idx < 0 ? idx : 0;
    if (ret == 0) {
        const struct qs_snapshot *sn = &img->snapshots[idx];
        ret = qs_l1_load(img, sn->l1_offset, sn->l1_size, &v->l1);
        v->img = img;
        v->l1_offset = sn->l1_offset;
        v->l1_size = sn->l1_size;
        v->size = sn->disk_size;
    }
    if (ret == 0) {
        v->next = img->views;
        img->views = v;
        *out = v;
    } else {
        free(v);
    }
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

QSNAP_API uint64_t qsnap_view_size(const qsnap_view *view)
{
    return view ? view->size : 0;
}

QSNAP_API int qsnap_view_preadv(qsnap_view *view, const struct iovec *iov,
                                int iovcnt, uint64_t offset)
{
    if (!view || iovcnt < 0 || (iovcnt && !iov)) {
        return -EINVAL;
    }
    uint64_t len = 0;
    for (int i = 0; i < iovcnt; i++) {
        len += iov[i].iov_len;
    }
    struct qsnap_image *img = view->img;
    if (offset > view->size || len > view->size - offset) {
        return qs_error(img, -EINVAL,
                        "%s: snapshot read at %" PRIu64 " length %" PRIu64
                        " is beyond its size %" PRIu64,
                        img->filename, offset, len, view->size);
    }
    if (!len) {
        return 0;
    }
    pthread_rwlock_rdlock(&img->lock);
    int ret =
        qs_read_l1(img, view->l1, view->l1_size, iov, iovcnt, offset, len);
    pthread_rwlock_unlock(&img->lock);
    return ret;
}

QSNAP_API int qsnap_view_pread(qsnap_view *view, void *buf, size_t len,
                               uint64_t offset)
{
    struct iovec v = {buf, len};
    return qsnap_view_preadv(view, &v, 1, offset);
}

QSNAP_API int qsnap_view_block_status(qsnap_view *view, uint64_t offset,
                                      uint64_t len, uint64_t *pnum,
                                      unsigned *flags)
{
    if (!view || !pnum || !flags || offset > view->size ||
        len > view->size - offset) {
        return -EINVAL;
    }
    struct qsnap_image *img = view->img;
    struct qs_mapping m;
    pthread_rwlock_rdlock(&img->lock);
    int ret = qs_map_l1(img, view->l1, view->l1_size, offset, len, &m);
    pthread_rwlock_unlock(&img->lock);
    if (ret < 0) {
        return ret;
    }
    *pnum = m.len;
    switch (m.type) {
    case QS_C_UNALLOC:
        *flags = img->backing ? 0 : QSNAP_BS_ZERO;
        break;
    case QS_C_ZERO_PLAIN:
    case QS_C_ZERO_ALLOC:
        *flags = QSNAP_BS_ZERO | QSNAP_BS_ALLOCATED;
        break;
    case QS_C_NORMAL:
        *flags = QSNAP_BS_DATA | QSNAP_BS_ALLOCATED | QSNAP_BS_OFFSET;
        break;
    case QS_C_COMPRESSED:
        *flags = QSNAP_BS_DATA | QSNAP_BS_ALLOCATED | QSNAP_BS_COMPRESSED;
        break;
    }
    return 0;
}

QSNAP_API void qsnap_view_close(qsnap_view *view)
{
    if (!view) {
        return;
    }
    struct qsnap_image *img = view->img;
    /* Snapshot tables and the view list only: writes in flight touch
     * neither, so they need not end first. */
    pthread_rwlock_wrlock(&img->lock);
    for (struct qsnap_view **pp = &img->views; *pp; pp = &(*pp)->next) {
        if (*pp == view) {
            *pp = view->next;
            break;
        }
    }
    pthread_rwlock_unlock(&img->lock);
    free(view->l1);
    free(view);
}
