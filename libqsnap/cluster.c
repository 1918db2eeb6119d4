/*
 * cluster.c - guest offsets to host clusters: lookup, allocation on write,
 * copy-on-write, zero clusters, discard, compressed clusters.
 *
 * Spec: docs/interop/qcow2.txt, "Cluster mapping", "Compressed Clusters
 * Descriptor", "Extended L2 Entries".
 *
 * Invariants:
 *   1. A cluster is written in place only when both its L1 and L2 entries
 *      carry COPIED (refcount exactly 1); anything else is copied to a new
 *      cluster first, whose refcount is raised before the L2 entry that
 *      points to it is written (cache dependency, refcount.c).
 *   2. The L2 table an entry lives in is owned by the active L1 alone
 *      (COPIED) before the entry is changed; a shared table is copied and
 *      the L1 entry switched to the copy.
 *   3. Dirty L2 tables reach the disk (and are flushed) before the L1
 *      entries that point to them (qs_meta_sync).
 *   4. Every host offset read from an L1 or L2 entry is checked (alignment,
 *      reserved bits, inside the file, not metadata) before use.
 *   5. A dropped reference is released through qs_free_deferred, never
 *      directly, so the space is not reused before the drop is durable.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qs_int.h"

/* ------------------------------------------------------------ iovecs */

/* Describes bytes [skip, skip+len) of an iovec array as a new array. */
struct iov_slice {
    struct iovec *v;
    int n;
    struct iovec local[16];
};

static int slice_iov(const struct iovec *iov, int n, uint64_t skip,
                     uint64_t len, struct iov_slice *s)
{
    int count = 0;
    uint64_t sk = skip, left = len;
    for (int i = 0; i < n && left; i++) {
        if (sk >= iov[i].iov_len) {
            sk -= iov[i].iov_len;
            continue;
        }
        uint64_t take = QS_MIN(iov[i].iov_len - sk, left);
        left -= take;
        sk = 0;
        count++;
    }
    s->v = count <= 16 ? s->local : malloc(sizeof(*s->v) * (size_t)count);
    if (!s->v) {
        return -ENOMEM;
    }
    s->n = 0;
    sk = skip;
    left = len;
    for (int i = 0; i < n && left; i++) {
        if (sk >= iov[i].iov_len) {
            sk -= iov[i].iov_len;
            continue;
        }
        uint64_t take = QS_MIN(iov[i].iov_len - sk, left);
        s->v[s->n].iov_base = (char *)iov[i].iov_base + sk;
        s->v[s->n].iov_len = take;
        s->n++;
        left -= take;
        sk = 0;
    }
    return 0;
}

static void slice_free(struct iov_slice *s)
{
    if (s->v != s->local) {
        free(s->v);
    }
}

static void iov_fill(const struct iovec *iov, int n, uint64_t skip,
                     const uint8_t *src, uint64_t len)
{
    for (int i = 0; i < n && len; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        uint64_t take = QS_MIN(iov[i].iov_len - skip, len);
        if (src) {
            memcpy((char *)iov[i].iov_base + skip, src, take);
            src += take;
        } else {
            memset((char *)iov[i].iov_base + skip, 0, take);
        }
        len -= take;
        skip = 0;
    }
}

/* ------------------------------------------------------------ entries */

uint64_t qs_l2_entry_get(const struct qsnap_image *img, const void *l2,
                         uint64_t idx, uint64_t *bitmap)
{
    const uint8_t *p = l2;
    if (img->ext_l2) {
        if (bitmap) {
            *bitmap = qs_be64_load(p + idx * 16 + 8);
        }
        return qs_be64_load(p + idx * 16);
    }
    if (bitmap) {
        *bitmap = 0;
    }
    return qs_be64_load(p + idx * 8);
}

static void l2_entry_set(const struct qsnap_image *img, void *l2, uint64_t idx,
                         uint64_t e)
{
    uint8_t *p = l2;
    qs_be64_store(p + idx * (img->ext_l2 ? 16 : 8), e);
}

enum qs_ctype qs_l2_entry_type(const struct qsnap_image *img, uint64_t e)
{
    if (e & QS_OFLAG_COMPRESSED) {
        return QS_C_COMPRESSED;
    }
    if ((e & QS_OFLAG_ZERO) && !img->ext_l2) {
        return (e & QS_L2E_OFFSET_MASK) ? QS_C_ZERO_ALLOC : QS_C_ZERO_PLAIN;
    }
    if (!(e & QS_L2E_OFFSET_MASK)) {
        return QS_C_UNALLOC;
    }
    return QS_C_NORMAL;
}

void qs_compressed_range(const struct qsnap_image *img, uint64_t e,
                         uint64_t *host_off, uint64_t *len)
{
    const uint64_t off = e & img->coffset_mask;
    const uint64_t sectors = ((e >> img->csize_shift) & img->csize_mask) + 1;
    *host_off = off & ~511ull;
    *len = sectors * 512;
}

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

bool qs_overlaps_metadata(const struct qsnap_image *img, uint64_t host_off,
                          uint64_t len)
{
    const uint64_t cs = img->cluster_size;
    const struct qs_header *h = &img->hdr;

    if (host_off < cs) {
        return true;
    }
    if (overlaps(host_off, len, h->l1_table_offset,
                 QS_DIV_ROUND_UP((uint64_t)img->l1_size * 8, cs) * cs)) {
        return true;
    }
    if (overlaps(host_off, len, h->refcount_table_offset,
                 (uint64_t)h->refcount_table_clusters * cs)) {
        return true;
    }
    if (img->n_snapshots &&
        overlaps(host_off, len, h->snapshots_offset,
                 QS_DIV_ROUND_UP(img->snapshot_table_bytes, cs) * cs)) {
        return true;
    }
    return false;
}

int qs_l1_validate_entry(struct qsnap_image *img, const uint64_t *l1,
                         uint32_t idx, uint64_t *l2_off)
{
    const uint64_t e = l1[idx];
    const uint64_t off = e & QS_L1E_OFFSET_MASK;

    *l2_off = 0;
    if (e & QS_L1E_RESERVED) {
        return QS_CORRUPT(
            img, "%s: L1 entry %u (0x%016" PRIx64 ") has reserved bits set",
            img->filename, idx, e);
    }
    if (!off) {
        return 0;
    }
    if (off & (img->cluster_size - 1)) {
        return QS_CORRUPT(img,
                          "%s: L1 entry %u: L2 table offset 0x%" PRIx64
                          " is not cluster-aligned",
                          img->filename, idx, off);
    }
    if (off >= img->file_size) {
        return QS_CORRUPT(img,
                          "%s: L1 entry %u: L2 table offset 0x%" PRIx64
                          " is past the end of the file (%" PRIu64 " bytes)",
                          img->filename, idx, off, img->file_size);
    }
    if (qs_overlaps_metadata(img, off, img->cluster_size)) {
        return QS_CORRUPT(img,
                          "%s: L1 entry %u: L2 table offset 0x%" PRIx64
                          " overlaps the header, L1 or refcount table",
                          img->filename, idx, off);
    }
    *l2_off = off;
    return 0;
}

static int check_data_entry(struct qsnap_image *img, uint64_t guest_off,
                            uint64_t e, enum qs_ctype t)
{
    if (t == QS_C_COMPRESSED) {
        const uint64_t off = e & img->coffset_mask;
        if (off < img->cluster_size || off >= img->file_size) {
            return QS_CORRUPT(
                img,
                "%s: compressed cluster at guest offset 0x%" PRIx64
                ": data offset 0x%" PRIx64 " is outside the file (%" PRIu64
                " bytes)",
                img->filename, guest_off, off, img->file_size);
        }
        return 0;
    }
    if (t != QS_C_NORMAL && t != QS_C_ZERO_ALLOC) {
        if (t == QS_C_UNALLOC && (e & QS_OFLAG_COPIED) && !img->ext_l2) {
            return QS_CORRUPT(img,
                              "%s: L2 entry for guest offset 0x%" PRIx64
                              " (0x%016" PRIx64
                              ") has COPIED set but no cluster offset",
                              img->filename, guest_off, e);
        }
        return 0;
    }
    const uint64_t off = e & QS_L2E_OFFSET_MASK;
    if ((e & QS_L2E_RESERVED) || (off & (img->cluster_size - 1))) {
        return QS_CORRUPT(img,
                          "%s: L2 entry for guest offset 0x%" PRIx64
                          " (0x%016" PRIx64
                          ") is unaligned or has reserved bits set",
                          img->filename, guest_off, e);
    }
    if (off >= img->file_size) {
        return QS_CORRUPT(img,
                          "%s: L2 entry for guest offset 0x%" PRIx64
                          ": cluster offset 0x%" PRIx64
                          " is past the end of the file (%" PRIu64 " bytes)",
                          img->filename, guest_off, off, img->file_size);
    }
    return 0;
}

/* ------------------------------------------------------------ lookup */

/* Type of subcluster `sc` of an extended L2 entry. */
static enum qs_ctype sub_type(const struct qsnap_image *img, uint64_t e,
                              uint64_t bitmap, uint32_t sc)
{
    if (e & QS_OFLAG_COMPRESSED) {
        return QS_C_COMPRESSED;
    }
    if (bitmap & (1ull << sc)) {
        return (e & QS_L2E_OFFSET_MASK) ? QS_C_NORMAL : QS_C_UNALLOC;
    }
    if (bitmap & (1ull << (32 + sc))) {
        return QS_C_ZERO_PLAIN;
    }
    (void)img;
    return QS_C_UNALLOC;
}

int qs_map(struct qsnap_image *img, uint64_t guest_off, uint64_t len,
           struct qs_mapping *m)
{
    return qs_map_l1(img, img->l1, img->l1_size, guest_off, len, m);
}

int qs_map_l1(struct qsnap_image *img, const uint64_t *l1, uint32_t l1_size,
              uint64_t guest_off, uint64_t len, struct qs_mapping *m)
{
    const uint64_t cs = img->cluster_size;
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    const uint64_t l1_idx = guest_off >> span_bits;
    uint64_t l2_idx = (guest_off >> img->cluster_bits) & (img->l2_entries - 1);
    const uint64_t span_end = (l1_idx + 1) << span_bits;

    memset(m, 0, sizeof(*m));
    m->type = QS_C_UNALLOC;
    m->len = QS_MIN(len, span_end - guest_off);
    if (l1_idx >= l1_size) {
        return 0;
    }
    uint64_t l2_off;
    int ret = qs_l1_validate_entry(img, l1, (uint32_t)l1_idx, &l2_off);
    if (ret < 0 || !l2_off) {
        return ret;
    }
    const bool l1_copied = l1 == img->l1 && (l1[l1_idx] & QS_OFLAG_COPIED);

    void *l2;
    ret = qs_cache_get(img->l2_cache, l2_off, false, &l2);
    if (ret < 0) {
        return ret;
    }
    uint64_t bitmap;
    uint64_t e = qs_l2_entry_get(img, l2, l2_idx, &bitmap);
    enum qs_ctype t = qs_l2_entry_type(img, e);
    uint64_t in_cl = guest_off & (cs - 1);

    if (img->ext_l2) {
        const uint32_t sc_bits = img->sc_bits;
        uint32_t sc = (uint32_t)(in_cl >> sc_bits);
        t = sub_type(img, e, bitmap, sc);
        ret = check_data_entry(img, guest_off, e, t);
        if (ret < 0) {
            goto out;
        }
        uint64_t run = ((uint64_t)(sc + 1) << sc_bits) - in_cl;
        if (t != QS_C_COMPRESSED) {
            while (sc + 1 < 32 && sub_type(img, e, bitmap, sc + 1) == t) {
                sc++;
                run += 1ull << sc_bits;
            }
        } else {
            run = cs - in_cl;
        }
        m->type = t;
        m->len = QS_MIN(len, run);
        if (t == QS_C_NORMAL) {
            m->host_off = (e & QS_L2E_OFFSET_MASK) + in_cl;
        } else if (t == QS_C_COMPRESSED) {
            m->host_off = e & img->coffset_mask;
            m->csize = (((e >> img->csize_shift) & img->csize_mask) + 1) * 512 -
                       (m->host_off & 511);
        }
        goto out;
    }

    ret = check_data_entry(img, guest_off, e, t);
    if (ret < 0) {
        goto out;
    }
    m->type = t;
    m->copied = t == QS_C_NORMAL && l1_copied && (e & QS_OFLAG_COPIED);
    if (t == QS_C_COMPRESSED) {
        m->host_off = e & img->coffset_mask;
        m->csize = (((e >> img->csize_shift) & img->csize_mask) + 1) * 512 -
                   (m->host_off & 511);
        m->len = QS_MIN(len, cs - in_cl);
        goto out;
    }
    const uint64_t first_host = e & QS_L2E_OFFSET_MASK;
    if (t == QS_C_NORMAL || t == QS_C_ZERO_ALLOC) {
        m->host_off = first_host + in_cl;
    }

    /* Extend over following entries of the same kind. */
    uint64_t run = cs - in_cl;
    uint64_t idx = l2_idx + 1;
    while (run < len && idx < img->l2_entries) {
        const uint64_t e2 = qs_l2_entry_get(img, l2, idx, NULL);
        const enum qs_ctype t2 = qs_l2_entry_type(img, e2);
        if (t2 != t) {
            break;
        }
        if (t == QS_C_NORMAL || t == QS_C_ZERO_ALLOC) {
            const bool c2 = t == QS_C_NORMAL && l1_copied &&
                            (e2 & QS_OFLAG_COPIED);
            if ((e2 & QS_L2E_OFFSET_MASK) != first_host + (idx - l2_idx) * cs ||
                c2 != m->copied) {
                break;
            }
            ret = check_data_entry(img, guest_off + run, e2, t2);
            if (ret < 0) {
                goto out;
            }
        }
        run += cs;
        idx++;
    }
    m->len = QS_MIN(len, run);

out:
    qs_cache_put(img->l2_cache, l2);
    return ret;
}

/* ------------------------------------------------------------ reading */

static int read_compressed(struct qsnap_image *img, const struct qs_mapping *m,
                           uint8_t *out)
{
    const uint64_t cs = img->cluster_size;
    uint64_t avail = QS_MIN(m->csize, img->file_size - m->host_off);
    uint8_t *in = malloc(avail ? avail : 1);
    if (!in) {
        return -ENOMEM;
    }
    int ret = qs_host_read(img, in, avail, m->host_off);
    if (ret == 0) {
        ret = qs_decompress(img->hdr.compression_type, out, cs, in, avail);
        if (ret < 0) {
            ret = QS_CORRUPT(img,
                             "%s: compressed cluster at host offset 0x%" PRIx64
                             " (%" PRIu64 " bytes, %s) does not decompress",
                             img->filename, m->host_off, avail,
                             img->hdr.compression_type ? "zstd" : "zlib");
        }
    }
    free(in);
    return ret;
}

/* Reads the backing file (or zeros) for an unallocated range. */
static int read_unallocated(struct qsnap_image *img, const struct iovec *iov,
                            int n, uint64_t skip, uint64_t guest_off,
                            uint64_t len)
{
    struct qsnap_image *bk = img->backing;
    uint64_t from_backing = 0;
    if (bk && guest_off < bk->virtual_size) {
        from_backing = QS_MIN(len, bk->virtual_size - guest_off);
    }
    if (from_backing) {
        struct iov_slice s;
        int ret = slice_iov(iov, n, skip, from_backing, &s);
        if (ret < 0) {
            return ret;
        }
        ret = qsnap_preadv(bk, s.v, s.n, guest_off);
        slice_free(&s);
        if (ret < 0) {
            return qs_error(img, ret, "%s: reading backing file %s: %s",
                            img->filename, bk->filename, qsnap_errmsg(bk));
        }
    }
    iov_fill(iov, n, skip + from_backing, NULL, len - from_backing);
    return 0;
}

int qs_read(struct qsnap_image *img, const struct iovec *iov, int n,
            uint64_t guest_off, uint64_t len)
{
    return qs_read_l1(img, img->l1, img->l1_size, iov, n, guest_off, len);
}

int qs_read_l1(struct qsnap_image *img, const uint64_t *l1, uint32_t l1_size,
               const struct iovec *iov, int n, uint64_t guest_off, uint64_t len)
{
    uint8_t *cbuf = NULL;
    uint64_t pos = 0;
    int ret = 0;

    while (pos < len && ret == 0) {
        struct qs_mapping m;
        ret = qs_map_l1(img, l1, l1_size, guest_off + pos, len - pos, &m);
        if (ret < 0) {
            break;
        }
        switch (m.type) {
        case QS_C_UNALLOC:
            ret = read_unallocated(img, iov, n, pos, guest_off + pos, m.len);
            break;
        case QS_C_ZERO_PLAIN:
        case QS_C_ZERO_ALLOC:
            iov_fill(iov, n, pos, NULL, m.len);
            break;
        case QS_C_NORMAL: {
            struct iov_slice s;
            ret = slice_iov(iov, n, pos, m.len, &s);
            if (ret == 0) {
                ret = qs_io_preadv(img->io, s.v, s.n, m.host_off);
                slice_free(&s);
                if (ret < 0) {
                    ret = qs_error(img, ret,
                                   "%s: reading %" PRIu64
                                   " bytes at host offset 0x%" PRIx64 ": %s",
                                   img->filename, m.len, m.host_off,
                                   qsnap_strerror(ret));
                }
            }
            break;
        }
        case QS_C_COMPRESSED:
            if (!cbuf) {
                cbuf = malloc(img->cluster_size);
                if (!cbuf) {
                    ret = -ENOMEM;
                    break;
                }
            }
            ret = read_compressed(img, &m, cbuf);
            if (ret == 0) {
                const uint64_t in_cl =
                    (guest_off + pos) & (img->cluster_size - 1);
                iov_fill(iov, n, pos, cbuf + in_cl, m.len);
            }
            break;
        }
        pos += m.len;
    }
    free(cbuf);
    return ret;
}

/* ------------------------------------------------------------ L1 / L2 */

static void l1_mark(struct qsnap_image *img, uint32_t idx)
{
    if (!img->l1_dirty) {
        img->l1_dirty = true;
        img->l1_dirty_lo = idx;
        img->l1_dirty_hi = idx;
        return;
    }
    img->l1_dirty_lo = QS_MIN(img->l1_dirty_lo, idx);
    img->l1_dirty_hi = QS_MAX(img->l1_dirty_hi, idx);
}


int qs_dirty_bit_write(struct qsnap_image *img, bool on)
{
    const uint64_t incompat = on ? img->hdr.incompat | QS_INCOMPAT_DIRTY
                                 : img->hdr.incompat & ~QS_INCOMPAT_DIRTY;
    uint8_t field[8];
    qs_be64_store(field, incompat);
    int ret = qs_header_switch(img, QS_HDR_OFF_INCOMPAT, field, 8);
    if (ret == 0) {
        img->hdr.incompat = incompat;
    }
    return ret;
}

/* Lazy refcounts: the dirty bit goes on disk before the first change
 * whose refcounts it lets lag, and stays until a clean close. */
int qs_mark_dirty(struct qsnap_image *img)
{
    if (!(img->hdr.compat & QS_COMPAT_LAZY_REFCOUNTS) || img->dirty_marked) {
        return 0;
    }
    const int ret = qs_dirty_bit_write(img, true);
    if (ret == 0) {
        img->dirty_marked = true;
    }
    return ret;
}

/*
 * Snapshot operations change a cluster's refcount and the COPIED flag of
 * the table entry pointing at it, in different clusters: no write order
 * keeps the two in step across a crash, and a reader checking them (as
 * qemu-img check does) would see a mismatch in between.  So the change is
 * bracketed by the format's own dirty bit (v3 images): set and flushed
 * first, cleared once everything is durable.  A crash in between leaves a
 * dirty image, whose refcounts and COPIED flags the next read-write open
 * rebuilds (qsnap and QEMU alike).  Lazy-refcount images are dirty until
 * close anyway.  v2 images have no dirty bit: the window stays open there
 * (as it does in QEMU), repairable by check -r all.
 */
int qs_txn_begin(struct qsnap_image *img)
{
    if (img->hdr.compat & QS_COMPAT_LAZY_REFCOUNTS) {
        return qs_mark_dirty(img);
    }
    if (img->hdr.version < 3 || img->txn_dirty) {
        return 0;
    }
    const int ret = qs_dirty_bit_write(img, true);
    if (ret == 0) {
        img->txn_dirty = true;
    }
    return ret;
}

int qs_txn_end(struct qsnap_image *img)
{
    if (!img->txn_dirty) {
        return 0;
    }
    int ret = qs_meta_sync(img);
    if (ret == 0) {
        ret = qs_dirty_bit_write(img, false);
    }
    if (ret == 0) {
        img->txn_dirty = false;
    }
    return ret;
}

int qs_l1_grow(struct qsnap_image *img, uint32_t min_size)
{
    const uint64_t cs = img->cluster_size;

    if (min_size <= img->l1_size) {
        return 0;
    }
    if ((uint64_t)min_size * 8 > QS_MAX_L1_BYTES) {
        return qs_error(img, -EFBIG,
                        "%s: the L1 table would need %u entries, over the "
                        "limit of %u",
                        img->filename, min_size, QS_MAX_L1_BYTES / 8);
    }
    /* Everything the old L1 points to must be on disk first. */
    int ret = qs_meta_sync(img);
    if (ret < 0) {
        return ret;
    }
    const uint64_t bytes = (uint64_t)min_size * 8;
    const uint64_t n_cl = QS_DIV_ROUND_UP(bytes, cs);
    uint64_t *nl1 = calloc(min_size, sizeof(*nl1));
    uint8_t *buf = qs_alloc_buf(n_cl * cs);
    if (!nl1 || !buf) {
        free(nl1);
        free(buf);
        return -ENOMEM;
    }
    memset(buf, 0, n_cl * cs);
    for (uint32_t i = 0; i < img->l1_size; i++) {
        nl1[i] = img->l1[i];
        qs_be64_store(buf + 8 * i, img->l1[i]);
    }
    uint64_t new_off;
    ret = qs_alloc_clusters(img, n_cl, &new_off);
    if (ret < 0) {
        goto out;
    }
    /* The new table's refcount must be durable before the header. */
    ret = qs_cache_writeback(img->rb_cache);
    if (ret == 0) {
        ret = qs_host_write(img, buf, n_cl * cs, new_off);
    }
    if (ret == 0) {
        ret = qs_io_flush(img->io);
    }
    if (ret < 0) {
        goto out;
    }
    /* Commit point: l1_size and l1_table_offset in one 12-byte write. */
    uint8_t field[12];
    qs_be32_store(field, min_size);
    qs_be64_store(field + 4, new_off);
    ret = qs_header_switch(img, QS_HDR_OFF_L1, field, sizeof(field));
    if (ret < 0) {
        goto out;
    }
    const uint64_t old_off = img->hdr.l1_table_offset;
    const uint64_t old_bytes = (uint64_t)img->l1_size * 8;
    free(img->l1);
    img->l1 = nl1;
    nl1 = NULL;
    img->l1_size = min_size;
    img->hdr.l1_size = min_size;
    img->hdr.l1_table_offset = new_off;
    if (old_bytes) {
        /* The header no longer points to it, durably. */
        ret = qs_refcount_update(img, old_off,
                                 QS_DIV_ROUND_UP(old_bytes, cs) * cs, -1);
    }
out:
    free(nl1);
    free(buf);
    return ret;
}

/*
 * Returns the L2 table for l1_idx pinned and owned by the active L1 alone
 * (invariant 2), allocating or copying it as needed.
 */
static int l2_prepare(struct qsnap_image *img, uint64_t l1_idx, void **l2)
{
    const uint64_t cs = img->cluster_size;
    int ret;

    if (l1_idx >= img->l1_size) {
        if (l1_idx >= QS_MAX_L1_BYTES / 8) {
            return -EFBIG;
        }
        ret = qs_l1_grow(img, (uint32_t)l1_idx + 1);
        if (ret < 0) {
            return ret;
        }
    }
    uint64_t old_off;
    ret = qs_l1_validate_entry(img, img->l1, (uint32_t)l1_idx, &old_off);
    if (ret < 0) {
        return ret;
    }
    if (old_off && (img->l1[l1_idx] & QS_OFLAG_COPIED)) {
        return qs_cache_get(img->l2_cache, old_off, false, l2);
    }

    uint64_t new_off;
    ret = qs_alloc_clusters(img, 1, &new_off);
    if (ret < 0) {
        return ret;
    }
    void *fresh;
    ret = qs_cache_get(img->l2_cache, new_off, true, &fresh);
    if (ret < 0) {
        return ret;
    }
    if (old_off) {
        /* Shared with a snapshot: copy, entries stay shared (no COPIED). */
        void *old;
        ret = qs_cache_get(img->l2_cache, old_off, false, &old);
        if (ret < 0) {
            qs_cache_put(img->l2_cache, fresh);
            return ret;
        }
        memcpy(fresh, old, cs);
        qs_cache_put(img->l2_cache, old);
        for (uint64_t i = 0; i < img->l2_entries; i++) {
            uint64_t e = qs_l2_entry_get(img, fresh, i, NULL);
            l2_entry_set(img, fresh, i, e & ~QS_OFLAG_COPIED);
        }
        ret = qs_free_deferred(img, old_off, cs);
        if (ret < 0) {
            qs_cache_put(img->l2_cache, fresh);
            return ret;
        }
    }
    img->l1[l1_idx] = new_off | QS_OFLAG_COPIED;
    l1_mark(img, (uint32_t)l1_idx);
    *l2 = fresh;
    return 0;
}

/* Releases the host space an L2 entry held (deferred, invariant 5). */
static int release_entry(struct qsnap_image *img, uint64_t e)
{
    switch (qs_l2_entry_type(img, e)) {
    case QS_C_NORMAL:
    case QS_C_ZERO_ALLOC:
        return qs_free_deferred(img, e & QS_L2E_OFFSET_MASK, img->cluster_size);
    case QS_C_COMPRESSED: {
        uint64_t off, len;
        qs_compressed_range(img, e, &off, &len);
        return qs_free_deferred(img, off, len);
    }
    default:
        return 0;
    }
}

/* Whether guest cluster `guest_cl_off`, mapped by `e`, reads as zeros
 * without anything being read. */
static bool reads_as_zeros(const struct qsnap_image *img, uint64_t e,
                           uint64_t guest_cl_off)
{
    switch (qs_l2_entry_type(img, e)) {
    case QS_C_UNALLOC:
        return !img->backing || guest_cl_off >= img->backing->virtual_size;
    case QS_C_ZERO_PLAIN:
    case QS_C_ZERO_ALLOC:
        return true;
    default:
        return false;
    }
}

/* The current content of one guest cluster, for copy-on-write. */
static int cluster_content(struct qsnap_image *img, uint64_t guest_cl_off,
                           uint64_t e, uint8_t *buf)
{
    const uint64_t cs = img->cluster_size;
    struct qs_mapping m = {.len = cs};

    switch (qs_l2_entry_type(img, e)) {
    case QS_C_NORMAL: {
        int ret = qs_host_read(img, buf, cs, e & QS_L2E_OFFSET_MASK);
        return ret < 0
                   ? qs_error(img, ret, "%s: reading cluster 0x%" PRIx64 ": %s",
                              img->filename, e & QS_L2E_OFFSET_MASK,
                              qsnap_strerror(ret))
                   : 0;
    }
    case QS_C_COMPRESSED:
        m.host_off = e & img->coffset_mask;
        m.csize = (((e >> img->csize_shift) & img->csize_mask) + 1) * 512 -
                  (m.host_off & 511);
        return read_compressed(img, &m, buf);
    case QS_C_UNALLOC: {
        struct iovec iov = {.iov_base = buf, .iov_len = cs};
        return read_unallocated(img, &iov, 1, 0, guest_cl_off, cs);
    }
    default:
        memset(buf, 0, cs);
        return 0;
    }
}

/* ------------------------------------------------------------ writing */

/*
 * Writes to clusters the image owns (COPIED) change no metadata: the
 * mapping is looked up under the shared lock and the data written after
 * the lock is dropped, so that no lock is held while the disk works.  Until
 * qs_inplace_end, img->inplace_inflight counts the write; a cluster it may
 * target cannot be freed and reused meanwhile (qs_refcount_drain waits for
 * the count to fall to 0), nor shared by a snapshot or moved by compaction
 * (qs_lock_exclusive waits the same way).
 */
int qs_inplace_begin(struct qsnap_image *img, uint64_t guest_off, uint64_t len,
                     struct qs_inplace_plan *p)
{
    size_t cap = sizeof(p->local) / sizeof(p->local[0]);
    uint64_t pos = 0;
    int ret = 1;

    p->n = 0;
    p->ext = p->local;
    while (pos < len) {
        struct qs_mapping m;
        ret = qs_map(img, guest_off + pos, len - pos, &m);
        if (ret < 0) {
            break;
        }
        if (!m.copied) {
            ret = 0;
            break;
        }
        if (qs_overlaps_metadata(img, m.host_off, m.len)) {
            ret = QS_CORRUPT(img,
                             "%s: data cluster at host offset 0x%" PRIx64
                             " overlaps metadata; refusing to write",
                             img->filename, m.host_off);
            break;
        }
        if (p->n == cap) {
            struct qs_extent *bigger = malloc(sizeof(*bigger) * cap * 2);
            if (!bigger) {
                ret = -ENOMEM;
                break;
            }
            memcpy(bigger, p->ext, sizeof(*bigger) * cap);
            if (p->ext != p->local) {
                free(p->ext);
            }
            p->ext = bigger;
            cap *= 2;
        }
        p->ext[p->n++] = (struct qs_extent){m.host_off, pos, m.len};
        pos += m.len;
        ret = 1;
    }
    if (ret <= 0) {
        if (p->ext != p->local) {
            free(p->ext);
        }
        return ret;
    }
    pthread_mutex_lock(&img->job_mtx);
    img->inplace_inflight++;
    pthread_mutex_unlock(&img->job_mtx);
    return 1;
}

int qs_inplace_data(struct qsnap_image *img, const struct qs_inplace_plan *p,
                    const struct iovec *iov, int n)
{
    for (size_t i = 0; i < p->n; i++) {
        const struct qs_extent *e = &p->ext[i];
        struct iov_slice s;
        int ret = slice_iov(iov, n, e->pos, e->len, &s);
        if (ret == 0) {
            /* Inside the file: img->file_size needs no update. */
            ret = qs_io_pwritev(img->io, s.v, s.n, e->host_off);
            slice_free(&s);
        }
        if (ret < 0) {
            return qs_error(img, ret,
                            "%s: writing at host offset 0x%" PRIx64 ": %s",
                            img->filename, e->host_off, qsnap_strerror(ret));
        }
    }
    return 0;
}

void qs_inplace_end(struct qsnap_image *img, struct qs_inplace_plan *p)
{
    pthread_mutex_lock(&img->job_mtx);
    if (--img->inplace_inflight == 0) {
        pthread_cond_broadcast(&img->job_cond);
    }
    pthread_mutex_unlock(&img->job_mtx);
    if (p->ext != p->local) {
        free(p->ext);
    }
}

/*
 * An allocating write of guest clusters that all need new space, in three
 * steps, so that the data can reach the disk without the image lock (see
 * qs_write_begin):
 *   run_prepare (exclusive lock) allocates a contiguous host run, possibly
 *               shorter than asked, and reads the old content at the edges
 *               of the request;
 *   run_write   (no lock needed) writes the whole run with one call: the
 *               space is allocated but nothing points at it yet;
 *   run_commit  (exclusive lock) points the entries at it and releases
 *               what they pointed at.
 * The refcounts raised in step 1 reach the disk before the L2 table
 * changed in step 3 (cache ordering), so a crash in between leaks at worst.
 */
static int run_prepare(struct qsnap_image *img, const void *l2,
                       uint64_t l2_idx, uint64_t k, uint64_t cl_guest_off,
                       const struct iovec *iov, int n, uint64_t req_off,
                       uint64_t req_len, struct qs_alloc_run *r)
{
    const uint64_t cs = img->cluster_size;
    const uint64_t first_e = qs_l2_entry_get(img, l2, l2_idx, NULL);

    memset(r, 0, sizeof(*r));
    r->l2_idx = l2_idx;
    /* A preallocated zero cluster we own is rewritten where it is. */
    if (qs_l2_entry_type(img, first_e) == QS_C_ZERO_ALLOC &&
        (first_e & QS_OFLAG_COPIED)) {
        r->host = first_e & QS_L2E_OFFSET_MASK;
        r->got = 1;
    } else {
        int ret = qs_alloc_run(img, k, &r->host, &r->got, &r->zeroed);
        if (ret < 0) {
            return ret;
        }
        r->fresh = true;
    }

    const uint64_t run_start = cl_guest_off;
    const uint64_t run_end = cl_guest_off + r->got * cs;
    const uint64_t w_start = QS_MAX(run_start, req_off);
    const uint64_t w_end = QS_MIN(run_end, req_off + req_len);
    uint64_t head = w_start - run_start;
    uint64_t tail = run_end - w_end;
    int ret = 0;

    /* Zeros need not be written over space that reads as zeros. */
    if (r->zeroed && head && reads_as_zeros(img, first_e, run_start)) {
        r->skip = head;
        head = 0;
    }
    if (r->zeroed && tail &&
        reads_as_zeros(img, qs_l2_entry_get(img, l2, l2_idx + r->got - 1, NULL),
                       run_end - cs)) {
        tail = 0;
    }
    if (head) {
        r->head_buf = qs_alloc_buf(cs);
        ret = r->head_buf ? cluster_content(img, run_start, first_e,
                                            r->head_buf)
                          : -ENOMEM;
    }
    if (ret == 0 && tail) {
        const uint64_t last_e =
            qs_l2_entry_get(img, l2, l2_idx + r->got - 1, NULL);
        if (r->got == 1 && r->head_buf) {
            r->tail_buf = r->head_buf; /* same cluster */
        } else {
            r->tail_buf = qs_alloc_buf(cs);
            ret = r->tail_buf
                      ? cluster_content(img, run_end - cs, last_e, r->tail_buf)
                      : -ENOMEM;
        }
    }

    struct iov_slice sl = {0};
    if (ret == 0) {
        ret = slice_iov(iov, n, w_start - req_off, w_end - w_start, &sl);
    }
    if (ret == 0) {
        r->iov = malloc(sizeof(*r->iov) * (size_t)(sl.n + 2));
        if (!r->iov) {
            ret = -ENOMEM;
        } else {
            if (head) {
                r->iov[r->iovcnt++] = (struct iovec){r->head_buf, head};
            }
            for (int i = 0; i < sl.n; i++) {
                r->iov[r->iovcnt++] = sl.v[i];
            }
            if (tail) {
                r->iov[r->iovcnt++] =
                    (struct iovec){r->tail_buf + (cs - tail), tail};
            }
        }
        slice_free(&sl);
    }
    return ret;
}

static int run_write(struct qsnap_image *img, const struct qs_alloc_run *r)
{
    /* The allocation already counted the run into img->file_size. */
    const uint64_t at = r->host + r->skip;
    int ret = r->bulk ? qs_io_pwritev_bulk(img->io, r->iov, r->iovcnt, at)
                      : qs_io_pwritev(img->io, r->iov, r->iovcnt, at);
    if (ret < 0) {
        return qs_error(img, ret,
                        "%s: writing %" PRIu64 " bytes at host offset 0x%" PRIx64
                        ": %s",
                        img->filename, r->got * img->cluster_size, r->host,
                        qsnap_strerror(ret));
    }
    return 0;
}

static int run_commit(struct qsnap_image *img, void *l2,
                      const struct qs_alloc_run *r)
{
    const uint64_t cs = img->cluster_size;
    for (uint64_t j = 0; j < r->got; j++) {
        const uint64_t old = qs_l2_entry_get(img, l2, r->l2_idx + j, NULL);
        const uint64_t new_e = (r->host + j * cs) | QS_OFLAG_COPIED;
        const enum qs_ctype ot = qs_l2_entry_type(img, old);
        const bool same = (ot == QS_C_NORMAL || ot == QS_C_ZERO_ALLOC) &&
                          (old & QS_L2E_OFFSET_MASK) == r->host + j * cs;
        if (!same) {
            int ret = release_entry(img, old);
            if (ret < 0) {
                return ret;
            }
        }
        l2_entry_set(img, l2, r->l2_idx + j, new_e);
    }
    qs_cache_mark_dirty(img->l2_cache, l2);
    return 0;
}

/* Frees a run's buffers and, after a failure, the space it allocated. */
static void run_end(struct qsnap_image *img, struct qs_alloc_run *r,
                    bool failed)
{
    if (failed && r->fresh && r->got) {
        /* Nothing points at the run: hand it back (errors leave a leak). */
        qs_free_deferred(img, r->host, r->got * img->cluster_size);
    }
    if (r->tail_buf != r->head_buf) {
        free(r->tail_buf);
    }
    free(r->head_buf);
    free(r->iov);
    memset(r, 0, sizeof(*r));
}

/*
 * Writes guest clusters [first, first + k) of one L2 table that all need
 * new space, all three steps under the exclusive lock.  Returns the number
 * of clusters done.
 */
static int64_t write_alloc_run(struct qsnap_image *img, void *l2,
                               uint64_t l2_idx, uint64_t k,
                               uint64_t cl_guest_off, const struct iovec *iov,
                               int n, uint64_t req_off, uint64_t req_len,
                               unsigned wflags)
{
    struct qs_alloc_run r;
    int ret = run_prepare(img, l2, l2_idx, k, cl_guest_off, iov, n, req_off,
                          req_len, &r);
    r.bulk = wflags & QS_WRITE_BULK;
    if (ret == 0) {
        ret = run_write(img, &r);
    }
    /* Once entries may point at the run, a failure must not free it. */
    const bool pointed = ret == 0;
    if (ret == 0) {
        ret = run_commit(img, l2, &r);
    }
    const int64_t got = (int64_t)r.got;
    run_end(img, &r, ret < 0 && !pointed);
    return ret < 0 ? ret : got;
}

static bool needs_new_cluster(const struct qsnap_image *img, uint64_t l1e,
                              uint64_t e)
{
    return !(qs_l2_entry_type(img, e) == QS_C_NORMAL && (e & QS_OFLAG_COPIED) &&
             (l1e & QS_OFLAG_COPIED));
}

int qs_write(struct qsnap_image *img, const struct iovec *iov, int n,
             uint64_t guest_off, uint64_t len, unsigned wflags)
{
    const uint64_t cs = img->cluster_size;
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    int ret = qs_mark_dirty(img);
    if (ret < 0) {
        return ret;
    }

    uint64_t pos = 0;
    while (pos < len) {
        const uint64_t cur = guest_off + pos;
        const uint64_t l1_idx = cur >> span_bits;
        void *l2;
        ret = l2_prepare(img, l1_idx, &l2);
        if (ret < 0) {
            return ret;
        }
        const uint64_t span_end =
            QS_MIN((l1_idx + 1) << span_bits, guest_off + len);
        uint64_t cl_off = cur & ~(cs - 1);
        while (cl_off < span_end && ret >= 0) {
            const uint64_t idx =
                (cl_off >> img->cluster_bits) & (img->l2_entries - 1);
            const uint64_t e = qs_l2_entry_get(img, l2, idx, NULL);
            uint64_t k = 1;
            const bool alloc = needs_new_cluster(img, img->l1[l1_idx], e);
            while (cl_off + k * cs < span_end &&
                   needs_new_cluster(img, img->l1[l1_idx],
                                     qs_l2_entry_get(img, l2, idx + k, NULL)) ==
                       alloc) {
                k++;
            }
            if (alloc) {
                int64_t done = write_alloc_run(img, l2, idx, k, cl_off, iov, n,
                                               guest_off, len, wflags);
                if (done < 0) {
                    ret = (int)done;
                    break;
                }
                k = (uint64_t)done;
            } else {
                const uint64_t a = QS_MAX(cl_off, guest_off);
                const uint64_t b = QS_MIN(cl_off + k * cs, span_end);
                struct iov_slice s;
                ret = slice_iov(iov, n, a - guest_off, b - a, &s);
                if (ret < 0) {
                    break;
                }
                /* Contiguous host runs within these k clusters. */
                uint64_t done_b = 0;
                for (uint64_t j = 0; j < k && ret >= 0;) {
                    const uint64_t h0 =
                        qs_l2_entry_get(img, l2, idx + j, NULL) &
                        QS_L2E_OFFSET_MASK;
                    uint64_t m = 1;
                    while (j + m < k &&
                           (qs_l2_entry_get(img, l2, idx + j + m, NULL) &
                            QS_L2E_OFFSET_MASK) == h0 + m * cs) {
                        m++;
                    }
                    const uint64_t ga = QS_MAX(cl_off + j * cs, a);
                    const uint64_t gb = QS_MIN(cl_off + (j + m) * cs, b);
                    const uint64_t host = h0 + (ga & (cs - 1));
                    if (qs_overlaps_metadata(img, host, gb - ga)) {
                        ret = QS_CORRUPT(img,
                                         "%s: data cluster at host offset "
                                         "0x%" PRIx64 " overlaps metadata",
                                         img->filename, h0);
                        break;
                    }
                    struct iov_slice s2;
                    ret = slice_iov(s.v, s.n, done_b, gb - ga, &s2);
                    if (ret == 0) {
                        ret = qs_host_writev(img, s2.v, s2.n, host, wflags);
                        slice_free(&s2);
                    }
                    done_b += gb - ga;
                    j += m;
                }
                slice_free(&s);
            }
            cl_off += k * cs;
        }
        qs_cache_put(img->l2_cache, l2);
        if (ret < 0) {
            return ret;
        }
        pos = QS_MIN(cl_off, guest_off + len) - guest_off;
    }
    return 0;
}

/* ------------------------------------------------ unlocked allocation */

/*
 * Allocating writes whose data goes to disk outside the exclusive lock.
 * qs_write_begin does the first step of every run under the lock and
 * registers the request in img->jobs; the caller drops the lock, writes
 * the data with qs_write_job_data, takes the lock again and calls
 * qs_write_end.  While a job is registered:
 *   - its guest clusters keep their old entries, so reads see the old
 *     content, and every other write, zeroing or discard that touches
 *     them waits for the job (qs_jobs_wait_range);
 *   - its host clusters are allocated but unreferenced, so nothing else
 *     reads, moves or frees them;
 *   - whole-image operations (snapshots, resize, compaction, commit, ...)
 *     take the lock with qs_lock_exclusive, which first waits for every
 *     job to end and keeps new ones from starting.
 */

static bool job_eligible(struct qsnap_image *img, uint64_t guest_off,
                         uint64_t len)
{
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    const uint64_t first = guest_off >> img->cluster_bits;
    const uint64_t last = (guest_off + len - 1) >> img->cluster_bits;
    return img->drainers == 0 && len > 0 &&
           guest_off >> span_bits == (guest_off + len - 1) >> span_bits &&
           last - first < QS_JOB_MAX_CLUSTERS;
}

int qs_write_begin(struct qsnap_image *img, const struct iovec *iov, int n,
                   uint64_t guest_off, uint64_t len, struct qs_write_job *job)
{
    const uint64_t cs = img->cluster_size;
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;

    if (!job_eligible(img, guest_off, len)) {
        return 0;
    }
    memset(job, 0, sizeof(*job));
    job->l1_idx = guest_off >> span_bits;
    job->guest_lo = guest_off & ~(cs - 1);
    job->guest_hi = (guest_off + len + cs - 1) & ~(cs - 1);

    int ret = qs_mark_dirty(img);
    if (ret < 0) {
        return ret;
    }
    void *l2;
    ret = l2_prepare(img, job->l1_idx, &l2);
    if (ret < 0) {
        return ret;
    }
    const uint64_t idx0 = (job->guest_lo >> img->cluster_bits) &
                          (img->l2_entries - 1);
    const uint64_t k = (job->guest_hi - job->guest_lo) >> img->cluster_bits;
    for (uint64_t i = 0; i < k; i++) {
        const uint64_t e = qs_l2_entry_get(img, l2, idx0 + i, NULL);
        if (!needs_new_cluster(img, img->l1[job->l1_idx], e) ||
            (qs_l2_entry_type(img, e) == QS_C_ZERO_ALLOC &&
             (e & QS_OFLAG_COPIED))) {
            qs_cache_put(img->l2_cache, l2);
            return 0; /* the locked path handles mixed requests */
        }
    }
    for (uint64_t done = 0; done < k && ret == 0;) {
        struct qs_alloc_run *r = &job->runs[job->n_runs];
        ret = run_prepare(img, l2, idx0 + done, k - done,
                          job->guest_lo + done * cs, iov, n, guest_off, len,
                          r);
        job->n_runs++;
        done += r->got;
    }
    qs_cache_put(img->l2_cache, l2);
    if (ret < 0) {
        for (int i = 0; i < job->n_runs; i++) {
            run_end(img, &job->runs[i], true);
        }
        return ret;
    }
    job->next = img->jobs;
    img->jobs = job;
    return 1;
}

int qs_write_job_data(struct qsnap_image *img, const struct qs_write_job *job)
{
    for (int i = 0; i < job->n_runs; i++) {
        int ret = run_write(img, &job->runs[i]);
        if (ret < 0) {
            return ret;
        }
    }
    return 0;
}

static void jobs_changed(struct qsnap_image *img)
{
    pthread_mutex_lock(&img->job_mtx);
    img->job_gen++;
    pthread_cond_broadcast(&img->job_cond);
    pthread_mutex_unlock(&img->job_mtx);
}

int qs_write_end(struct qsnap_image *img, struct qs_write_job *job, int ret)
{
    struct qs_write_job **p = &img->jobs;
    while (*p != job) {
        p = &(*p)->next;
    }
    *p = job->next;

    if (ret == 0 && img->corrupt) {
        ret = qs_error(img, -EROFS,
                       "%s: %s during the write; its data is not linked in",
                       img->filename, qs_stop_reason(img));
    }
    void *l2 = NULL;
    if (ret == 0) {
        /* Still the table qs_write_begin prepared: nothing could share or
         * replace it while the job was registered. */
        ret = l2_prepare(img, job->l1_idx, &l2);
    }
    bool pointed = false;
    for (int i = 0; i < job->n_runs && ret == 0; i++) {
        pointed = true;
        ret = run_commit(img, l2, &job->runs[i]);
    }
    if (l2) {
        qs_cache_put(img->l2_cache, l2);
    }
    for (int i = 0; i < job->n_runs; i++) {
        run_end(img, &job->runs[i], ret < 0 && !pointed);
    }
    jobs_changed(img);
    return ret;
}

/* Drops the exclusive lock until the set of jobs changes, then retakes it. */
static void wait_jobs_changed(struct qsnap_image *img)
{
    pthread_mutex_lock(&img->job_mtx);
    const uint64_t gen = img->job_gen;
    pthread_rwlock_unlock(&img->lock);
    while (img->job_gen == gen) {
        pthread_cond_wait(&img->job_cond, &img->job_mtx);
    }
    pthread_mutex_unlock(&img->job_mtx);
    pthread_rwlock_wrlock(&img->lock);
}

bool qs_jobs_wait_range(struct qsnap_image *img, uint64_t guest_off,
                        uint64_t len)
{
    const uint64_t cs = img->cluster_size;
    const uint64_t lo = guest_off & ~(cs - 1);
    const uint64_t hi = guest_off + len;
    for (const struct qs_write_job *j = img->jobs; j; j = j->next) {
        if (j->guest_lo < hi && lo < j->guest_hi) {
            wait_jobs_changed(img);
            return true;
        }
    }
    return false;
}

void qs_lock_exclusive(struct qsnap_image *img)
{
    pthread_rwlock_wrlock(&img->lock);
    if (img->jobs) {
        img->drainers++;
        while (img->jobs) {
            wait_jobs_changed(img);
        }
        img->drainers--;
    }
    /* In-place writes end without the lock; none can start while held. */
    qs_inplace_wait_idle(img);
}

/* ------------------------------------------------------------ zeroing */

/* True if [off, off+len) already reads as zeros without a backing file. */
static int reads_zero(struct qsnap_image *img, uint64_t off, uint64_t len,
                      bool *zero)
{
    struct qs_mapping m;
    int ret = qs_map(img, off, len, &m);
    if (ret < 0) {
        return ret;
    }
    *zero = m.len >= len &&
            (m.type == QS_C_ZERO_PLAIN || m.type == QS_C_ZERO_ALLOC ||
             (m.type == QS_C_UNALLOC && !img->backing));
    return 0;
}

static int write_zero_bytes(struct qsnap_image *img, uint64_t off, uint64_t len)
{
    if (!len) {
        return 0;
    }
    bool zero;
    int ret = reads_zero(img, off, len, &zero);
    if (ret < 0 || zero) {
        return ret;
    }
    uint8_t *buf = calloc(1, len);
    if (!buf) {
        return -ENOMEM;
    }
    struct iovec v = {buf, len};
    ret = qs_write(img, &v, 1, off, len, 0);
    free(buf);
    return ret;
}

int qs_zero(struct qsnap_image *img, uint64_t off, uint64_t len,
            enum qs_zero_mode mode, bool may_unmap)
{
    const bool discard = mode != QS_ZERO_WRITE;
    const bool unallocate = mode == QS_ZERO_UNALLOCATE;
    const uint64_t cs = img->cluster_size;
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    const bool v3 = img->hdr.version >= 3;
    const bool backing = img->backing != NULL;
    int ret = qs_mark_dirty(img);
    if (ret < 0) {
        return ret;
    }

    uint64_t a = (off + cs - 1) & ~(cs - 1);
    uint64_t b = (off + len) & ~(cs - 1);
    /* The disk's last partial cluster counts as whole. */
    if (off + len == img->virtual_size && b < off + len) {
        b = (off + len + cs - 1) & ~(cs - 1);
    }
    if (unallocate) {
        /* Only whole clusters can fall through; partial ones stay. */
        if (a >= b) {
            return 0;
        }
    } else if (a >= b) {
        return write_zero_bytes(img, off, len);
    }
    ret = unallocate ? 0 : write_zero_bytes(img, off, a - off);
    if (ret == 0 && !unallocate) {
        ret = write_zero_bytes(img, QS_MIN(b, off + len),
                               off + len - QS_MIN(b, off + len));
    }
    if (ret < 0) {
        return ret;
    }

    /* Whole clusters: change entries, collect those that need real zeros. */
    uint64_t cl = a;
    while (cl < b) {
        const uint64_t l1_idx = cl >> span_bits;
        const uint64_t span_end = QS_MIN((l1_idx + 1) << span_bits, b);
        if (!backing && (l1_idx >= img->l1_size ||
                         !(img->l1[l1_idx] & QS_L1E_OFFSET_MASK))) {
            cl = span_end; /* nothing allocated: already zeros */
            continue;
        }
        void *l2;
        ret = l2_prepare(img, l1_idx, &l2);
        if (ret < 0) {
            return ret;
        }
        bool changed = false;
        for (; cl < span_end; cl += cs) {
            const uint64_t idx =
                (cl >> img->cluster_bits) & (img->l2_entries - 1);
            const uint64_t e = qs_l2_entry_get(img, l2, idx, NULL);
            const enum qs_ctype t = qs_l2_entry_type(img, e);
            const bool owned = (t == QS_C_NORMAL || t == QS_C_ZERO_ALLOC) &&
                               (e & QS_OFLAG_COPIED);
            uint64_t new_e;
            bool keep = false;
            if (unallocate) {
                new_e = 0;
            } else if (!v3 && backing) {
                continue; /* needs real zeros: done below */
            } else if (!v3) {
                if (!discard && !may_unmap && owned) {
                    continue; /* zeros written in place below */
                }
                new_e = 0;
            } else if (discard) {
                new_e = backing ? QS_OFLAG_ZERO : 0;
            } else if (!may_unmap && owned) {
                new_e =
                    (e & QS_L2E_OFFSET_MASK) | QS_OFLAG_COPIED | QS_OFLAG_ZERO;
                keep = true;
            } else {
                new_e = QS_OFLAG_ZERO;
            }
            if (new_e == e) {
                continue;
            }
            if (!keep) {
                ret = release_entry(img, e);
                if (ret < 0) {
                    break;
                }
            }
            l2_entry_set(img, l2, idx, new_e);
            changed = true;
        }
        if (changed) {
            qs_cache_mark_dirty(img->l2_cache, l2);
        }
        qs_cache_put(img->l2_cache, l2);
        if (ret < 0) {
            return ret;
        }
    }

    if (!v3 && !unallocate) {
        /* v2 has no zero flag: whatever still is not zero gets zeros. */
        for (cl = a; cl < b && ret == 0; cl += cs) {
            /* Bounded by the request, which may lie past the current
             * virtual size (growing resize). */
            const uint64_t end = QS_MIN(cl + cs, off + len);
            ret = write_zero_bytes(img, cl, end - cl);
        }
    }
    return ret;
}

/* ------------------------------------------------------------ compressed */

int qs_write_compressed(struct qsnap_image *img, const void *cbuf, size_t clen,
                        const void *raw, uint64_t guest_off)
{
    const uint64_t cs = img->cluster_size;
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    int ret = qs_mark_dirty(img);
    if (ret < 0) {
        return ret;
    }
    if (!cbuf) {
        /* Did not compress: an ordinary write of the whole cluster. */
        struct iovec v = {(void *)raw, cs};
        return qs_write(img, &v, 1, guest_off, cs, 0);
    }

    void *l2;
    const uint64_t l1_idx = guest_off >> span_bits;
    ret = l2_prepare(img, l1_idx, &l2);
    if (ret < 0) {
        return ret;
    }
    const uint64_t idx =
        (guest_off >> img->cluster_bits) & (img->l2_entries - 1);
    const uint64_t old = qs_l2_entry_get(img, l2, idx, NULL);
    uint64_t host;
    ret = qs_alloc_bytes(img, clen, &host);
    if (ret == 0 && (host & img->coffset_mask) != host) {
        ret = qs_error(img, -EFBIG,
                       "%s: compressed data offset 0x%" PRIx64
                       " does not fit the descriptor",
                       img->filename, host);
    }
    if (ret == 0) {
        ret = qs_host_write(img, cbuf, clen, host);
    }
    if (ret == 0) {
        ret = release_entry(img, old);
    }
    if (ret == 0) {
        const uint64_t sectors = ((host + clen - 1) >> 9) - (host >> 9);
        l2_entry_set(img, l2, idx,
                     QS_OFLAG_COMPRESSED | (sectors << img->csize_shift) |
                         host);
        qs_cache_mark_dirty(img->l2_cache, l2);
    }
    qs_cache_put(img->l2_cache, l2);
    return ret;
}

/* ------------------------------------------------------------ sync */

int qs_meta_sync(struct qsnap_image *img)
{
    /* Refcounts, then L2 tables (the cache dependency orders the two). */
    int ret = qs_cache_writeback(img->rb_cache);
    if (ret == 0) {
        ret = qs_cache_writeback(img->l2_cache);
    }
    if (ret < 0) {
        return ret;
    }
    if (img->l1_dirty) {
        /* L2 tables durable before the L1 entries pointing at them. */
        ret = qs_io_flush(img->io);
        if (ret < 0) {
            return ret;
        }
        const uint32_t lo = img->l1_dirty_lo, hi = img->l1_dirty_hi;
        const size_t n = (size_t)(hi - lo + 1);
        uint8_t *buf = malloc(n * 8);
        if (!buf) {
            return -ENOMEM;
        }
        for (size_t i = 0; i < n; i++) {
            qs_be64_store(buf + 8 * i, img->l1[lo + i]);
        }
        ret = qs_host_write(img, buf, n * 8,
                            img->hdr.l1_table_offset + (uint64_t)lo * 8);
        free(buf);
        if (ret < 0) {
            return qs_error(img, ret, "%s: writing the L1 table: %s",
                            img->filename, qsnap_strerror(ret));
        }
        img->l1_dirty = false;
    }
    return qs_io_flush(img->io);
}

/* ------------------------------------------------------------ prealloc */

static int fill_zeros(struct qsnap_image *img, uint64_t off, uint64_t len)
{
    const size_t chunk = 1u << 20;
    uint8_t *z = calloc(1, chunk);
    if (!z) {
        return -ENOMEM;
    }
    int ret = 0;
    while (len && ret == 0) {
        const size_t n = (size_t)QS_MIN(len, chunk);
        ret = qs_host_write(img, z, n, off);
        off += n;
        len -= n;
    }
    free(z);
    return ret;
}

int qs_preallocate(struct qsnap_image *img, int mode)
{
    const uint64_t cs = img->cluster_size;
    const uint32_t span_bits = img->cluster_bits + img->l2_bits;
    const uint64_t n_clusters = QS_DIV_ROUND_UP(img->virtual_size, cs);
    uint64_t end = img->file_size;
    int ret = 0;

    for (uint64_t c = 0; c < n_clusters && ret == 0;) {
        const uint64_t l1_idx = (c << img->cluster_bits) >> span_bits;
        void *l2;
        ret = l2_prepare(img, l1_idx, &l2);
        if (ret < 0) {
            break;
        }
        const uint64_t span_last =
            QS_MIN(n_clusters, (l1_idx + 1) << img->l2_bits);
        while (c < span_last && ret == 0) {
            const uint64_t idx = c & (img->l2_entries - 1);
            if (qs_l2_entry_get(img, l2, idx, NULL) != 0) {
                c++;
                continue;
            }
            uint64_t host, got;
            ret = qs_alloc_run(img, span_last - c, &host, &got, NULL);
            if (ret < 0) {
                break;
            }
            for (uint64_t j = 0; j < got; j++) {
                l2_entry_set(img, l2, idx + j,
                             (host + j * cs) | QS_OFLAG_COPIED);
            }
            if (mode == QSNAP_PREALLOC_FALLOC) {
                ret = qs_io_falloc(img->io, host, got * cs);
            } else if (mode == QSNAP_PREALLOC_FULL) {
                ret = fill_zeros(img, host, got * cs);
            }
            end = QS_MAX(end, host + got * cs);
            c += got;
        }
        qs_cache_mark_dirty(img->l2_cache, l2);
        qs_cache_put(img->l2_cache, l2);
    }
    /* The file must cover every cluster now referenced. */
    uint64_t real = 0;
    if (ret == 0) {
        ret = qs_io_size(img->io, &real);
    }
    if (ret == 0 && end > real) {
        ret = qs_io_truncate(img->io, end);
        if (ret == 0) {
            img->file_size = QS_MAX(img->file_size, end);
        }
    }
    if (ret < 0) {
        return qs_error(img, ret, "%s: preallocation failed: %s", img->filename,
                        qsnap_strerror(ret));
    }
    return qs_meta_sync(img);
}
