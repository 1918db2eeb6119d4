/*
 * check_cluster.c - guest to host mapping (cluster.c): entry types on
 * hand-built L2 entries, read-modify-write of partial clusters,
 * copy-on-write of shared tables and clusters, zeroing and discard,
 * compressed cluster descriptors, and refusal of entries past the file.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "unit_util.h"

#define CS 65536u

static qsnap_image *img;
static qs_io *mem;
static uint64_t cs; /* the open image's cluster size */

static void open_image(uint64_t size, uint32_t cluster, int version)
{
    char err[512] = "";
    ck_assert_int_eq(unit_make_simple(size, cluster, version, 16, &mem), 0);
    memio_ref(mem);
    ck_assert_msg(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)) == 0,
                  "%s", err);
    cs = img->cluster_size;
}

static void setup(void)
{
    open_image(16u << 20, CS, 3);
}

static void teardown(void)
{
    qsnap_close(img);
    img = NULL;
    qs_io_close(mem);
    mem = NULL;
}

static void reopen(void)
{
    char err[512] = "";
    ck_assert_int_eq(qsnap_close(img), 0);
    memio_ref(mem);
    ck_assert_msg(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)) == 0,
                  "%s", err);
}

/* Pinned L2 table of L1 entry `l1_idx` (which must be allocated). */
static uint8_t *l2_get(uint64_t l1_idx)
{
    const uint64_t off = img->l1[l1_idx] & QS_L1E_OFFSET_MASK;
    ck_assert_uint_ne(off, 0);
    void *p = NULL;
    ck_assert_int_eq(qs_cache_get(img->l2_cache, off, false, &p), 0);
    return p;
}

static uint64_t l2e(const uint8_t *l2, uint64_t idx)
{
    return qs_be64_load(l2 + 8 * idx);
}

static void l2e_set(uint8_t *l2, uint64_t idx, uint64_t e)
{
    qs_be64_store(l2 + 8 * idx, e);
}

static void write_pattern(uint64_t off, uint64_t len, uint64_t seed)
{
    uint8_t *b = malloc(len);
    ck_assert_ptr_nonnull(b);
    unit_fill(b, len, seed, off);
    ck_assert_int_eq(qsnap_pwrite(img, b, len, off), 0);
    free(b);
}

/* Asserts guest [off, off+len) holds the pattern, or zeros if seed 0. */
static void expect(uint64_t off, uint64_t len, uint64_t seed)
{
    uint8_t *b = malloc(len), *w = malloc(len);
    ck_assert_ptr_nonnull(b);
    ck_assert_ptr_nonnull(w);
    ck_assert_int_eq(qsnap_pread(img, b, len, off), 0);
    if (seed) {
        unit_fill(w, len, seed, off);
    } else {
        memset(w, 0, len);
    }
    ck_assert_msg(memcmp(b, w, len) == 0,
                  "guest 0x%" PRIx64 "+%" PRIu64 " differs (seed %" PRIu64 ")",
                  off, len, seed);
    free(b);
    free(w);
}

static void check_result(uint64_t corruptions, uint64_t leaks)
{
    struct qsnap_check_result r;
    ck_assert_int_eq(unit_check(img, &r), 0);
    ck_assert_uint_eq(r.corruptions, corruptions);
    ck_assert_uint_eq(r.leaks, leaks);
    ck_assert_uint_eq(r.check_errors, 0);
}

static struct qs_mapping map_at(uint64_t off, uint64_t len)
{
    struct qs_mapping m;
    ck_assert_int_eq(qs_map(img, off, len, &m), 0);
    return m;
}

/* ------------------------------------------------------------ mapping */

START_TEST(test_mapping_types)
{
    /* Clusters 0-3 are metadata, the L2 table lands at 4, data at 5. */
    write_pattern(3 * cs, cs, 7);
    write_pattern(10 * cs, 4 * cs, 8); /* data at 6..9 */
    ck_assert_int_eq(qsnap_flush(img), 0);

    uint8_t *l2 = l2_get(0);
    const uint64_t h = l2e(l2, 3) & QS_L2E_OFFSET_MASK;
    ck_assert_uint_eq(h, 5 * cs);
    ck_assert_uint_eq(l2e(l2, 3), h | QS_OFLAG_COPIED);
    ck_assert_uint_eq(l2e(l2, 10), 6 * cs | QS_OFLAG_COPIED);

    l2e_set(l2, 0, 0);
    l2e_set(l2, 1, QS_OFLAG_ZERO);
    l2e_set(l2, 2, h | QS_OFLAG_ZERO | QS_OFLAG_COPIED);
    l2e_set(l2, 4, h); /* shared: no COPIED */
    l2e_set(l2, 5,
            QS_OFLAG_COMPRESSED | (UINT64_C(1) << img->csize_shift) |
                (h + 100));
    l2e_set(l2, 6, 6 * cs | QS_OFLAG_COPIED);
    l2e_set(l2, 7, 7 * cs | QS_OFLAG_COPIED);
    l2e_set(l2, 8, 9 * cs | QS_OFLAG_COPIED);

    ck_assert_int_eq(qs_l2_entry_type(img, l2e(l2, 0)), QS_C_UNALLOC);
    ck_assert_int_eq(qs_l2_entry_type(img, l2e(l2, 1)), QS_C_ZERO_PLAIN);
    ck_assert_int_eq(qs_l2_entry_type(img, l2e(l2, 2)), QS_C_ZERO_ALLOC);
    ck_assert_int_eq(qs_l2_entry_type(img, l2e(l2, 3)), QS_C_NORMAL);
    ck_assert_int_eq(qs_l2_entry_type(img, l2e(l2, 4)), QS_C_NORMAL);
    ck_assert_int_eq(qs_l2_entry_type(img, l2e(l2, 5)), QS_C_COMPRESSED);

    struct qs_mapping m = map_at(0, 100 * cs);
    ck_assert_int_eq(m.type, QS_C_UNALLOC);
    ck_assert_uint_eq(m.len, cs);
    m = map_at(cs + 1, cs);
    ck_assert_int_eq(m.type, QS_C_ZERO_PLAIN);
    ck_assert_uint_eq(m.len, cs - 1);
    m = map_at(2 * cs, cs);
    ck_assert_int_eq(m.type, QS_C_ZERO_ALLOC);
    ck_assert_uint_eq(m.host_off, h);
    m = map_at(3 * cs + 123, 10 * cs);
    ck_assert_int_eq(m.type, QS_C_NORMAL);
    ck_assert(m.copied);
    ck_assert_uint_eq(m.host_off, h + 123);
    ck_assert_uint_eq(m.len, cs - 123); /* entry 4 is not contiguous */
    m = map_at(4 * cs, cs);
    ck_assert_int_eq(m.type, QS_C_NORMAL);
    ck_assert(!m.copied);
    m = map_at(5 * cs + 9, cs);
    ck_assert_int_eq(m.type, QS_C_COMPRESSED);
    ck_assert_uint_eq(m.host_off, h + 100);
    ck_assert_uint_eq(m.csize, 2 * 512 - 100);
    ck_assert_uint_eq(m.len, cs - 9);
    /* Contiguous entries merge into one run; a gap ends it. */
    m = map_at(6 * cs, 10 * cs);
    ck_assert_int_eq(m.type, QS_C_NORMAL);
    ck_assert_uint_eq(m.host_off, 6 * cs);
    ck_assert_uint_eq(m.len, 2 * cs);
    m = map_at(6 * cs, cs / 2);
    ck_assert_uint_eq(m.len, cs / 2);
    /* Past the L1 table's allocated entries. */
    m = map_at(600u << 20, cs);
    ck_assert_int_eq(m.type, QS_C_UNALLOC);

    /* Reads follow the entries (the compressed one is not valid data). */
    l2e_set(l2, 5, 0);
    expect(0, 3 * cs, 0); /* unallocated, zero, zero with a cluster */
    uint8_t *b = malloc(cs), *w = malloc(cs);
    ck_assert_ptr_nonnull(b);
    ck_assert_ptr_nonnull(w);
    unit_fill(w, cs, 7, 3 * cs);
    ck_assert_int_eq(qsnap_pread(img, b, cs, 3 * cs), 0);
    ck_assert_mem_eq(b, w, cs);
    ck_assert_int_eq(qsnap_pread(img, b, cs, 4 * cs), 0); /* same host */
    ck_assert_mem_eq(b, w, cs);
    free(b);
    free(w);

    /* Forget the hand edits (never marked dirty). */
    qs_cache_put(img->l2_cache, l2);
    qs_cache_drop(img->l2_cache, img->l1[0] & QS_L1E_OFFSET_MASK);
    expect(3 * cs, cs, 7);
    check_result(0, 0);
}
END_TEST

/* ------------------------------------------------------------ RMW */

/* The one write covering host cluster `host` since the log started. */
static const struct unit_op_rec *write_of(uint64_t host)
{
    const struct unit_op_rec *found = NULL;
    for (size_t i = 0; i < memio_log_count(mem); i++) {
        const struct unit_op_rec *r = memio_log_get(mem, i);
        if (r->op == UNIT_OP_WRITE && r->off < host + cs &&
            host < r->off + r->len) {
            ck_assert_msg(found == NULL,
                          "host cluster 0x%" PRIx64 " written more than once",
                          host);
            found = r;
        }
    }
    ck_assert_ptr_nonnull(found);
    return found;
}

/*
 * A write into part of an unallocated cluster.  `reserved`: the image
 * grows into space reserved ahead, which reads as zeros, so only the new
 * bytes are written; otherwise one write fills the whole cluster, zeros
 * around the new bytes.
 */
static void partial_unallocated(bool reserved)
{
    img->reserve_off = !reserved;
    memio_log_start(mem);
    write_pattern(20 * cs + 3000, 1000, 3);
    const struct qs_mapping m = map_at(20 * cs, cs);
    ck_assert_int_eq(m.type, QS_C_NORMAL);
    ck_assert(m.copied);
    const struct unit_op_rec *w = write_of(m.host_off);
    ck_assert_uint_eq(w->off, reserved ? m.host_off + 3000 : m.host_off);
    ck_assert_uint_eq(w->len, reserved ? 1000 : cs);
    ck_assert_uint_eq(memio_size(mem) > img->file_size, reserved);
    const uint8_t *raw = memio_data(mem, NULL) + m.host_off;
    ck_assert(unit_all(raw, 3000, 0));
    ck_assert(unit_all(raw + 4000, cs - 4000, 0));
    uint8_t want[1000];
    unit_fill(want, sizeof(want), 3, 20 * cs + 3000);
    ck_assert_mem_eq(raw + 3000, want, sizeof(want));
    expect(20 * cs, 3000, 0);
    expect(20 * cs + 3000, 1000, 3);
    expect(20 * cs + 4000, cs - 4000, 0);

    /* Across a cluster boundary: both clusters are filled in. */
    memio_log_start(mem);
    write_pattern(31 * cs - 10, 20, 4);
    const struct qs_mapping a = map_at(30 * cs, cs);
    const struct qs_mapping b = map_at(31 * cs, cs);
    ck_assert_int_eq(a.type, QS_C_NORMAL);
    ck_assert_int_eq(b.type, QS_C_NORMAL);
    ck_assert(unit_all(memio_data(mem, NULL) + a.host_off, cs - 10, 0));
    ck_assert(unit_all(memio_data(mem, NULL) + b.host_off + 10, cs - 10, 0));
    expect(31 * cs - 10, 20, 4);
    check_result(0, 0);
}

START_TEST(test_partial_write_unallocated)
{
    partial_unallocated(false);
}
END_TEST

START_TEST(test_partial_write_reserved)
{
    partial_unallocated(true);
}
END_TEST

START_TEST(test_partial_write_compressed)
{
    uint8_t *c = malloc(cs);
    ck_assert_ptr_nonnull(c);
    for (uint64_t i = 0; i < cs; i++) {
        c[i] = (uint8_t)("compressible "[i % 13]);
    }
    ck_assert_int_eq(qsnap_write_compressed(img, c, cs, 40 * cs), 0);
    ck_assert_int_eq(qsnap_flush(img), 0);
    struct qs_mapping m = map_at(40 * cs, cs);
    ck_assert_int_eq(m.type, QS_C_COMPRESSED);

    memio_log_start(mem);
    uint8_t patch[100];
    memset(patch, 0xfe, sizeof(patch));
    ck_assert_int_eq(qsnap_pwrite(img, patch, sizeof(patch), 40 * cs + 5000),
                     0);
    memcpy(c + 5000, patch, sizeof(patch));
    m = map_at(40 * cs, cs);
    ck_assert_int_eq(m.type, QS_C_NORMAL);
    ck_assert(m.copied);
    const struct unit_op_rec *w = write_of(m.host_off);
    ck_assert_uint_eq(w->off, m.host_off);
    ck_assert_uint_eq(w->len, cs);
    ck_assert_mem_eq(memio_data(mem, NULL) + m.host_off, c, cs);
    uint8_t *r = malloc(cs);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(qsnap_pread(img, r, cs, 40 * cs), 0);
    ck_assert_mem_eq(r, c, cs);
    /* The compressed bytes were released. */
    ck_assert_int_eq(qsnap_flush(img), 0);
    check_result(0, 0);
    free(r);
    free(c);
}
END_TEST

/* ------------------------------------------------------------ COW */

/*
 * What taking an internal snapshot does to the active tables of L1 entry
 * 0, without the snapshot table: one more reference to the L2 table and
 * to every data cluster, COPIED cleared.  The extra references belong to
 * nobody the checker can see, so they count as leaks.  Returns the number
 * of clusters shared.
 */
static uint64_t fake_share(void)
{
    uint64_t n = 1;
    const uint64_t t = img->l1[0] & QS_L1E_OFFSET_MASK;
    ck_assert_int_eq(qs_refcount_update(img, t, cs, 1), 0);
    uint8_t *l2 = l2_get(0);
    for (uint64_t i = 0; i < img->l2_entries; i++) {
        const uint64_t e = l2e(l2, i);
        if (qs_l2_entry_type(img, e) != QS_C_NORMAL) {
            continue;
        }
        ck_assert_int_eq(qs_refcount_update(img, e & QS_L2E_OFFSET_MASK, cs, 1),
                         0);
        l2e_set(l2, i, e & ~QS_OFLAG_COPIED);
        n++;
    }
    qs_cache_mark_dirty(img->l2_cache, l2);
    qs_cache_put(img->l2_cache, l2);
    img->l1[0] &= ~QS_OFLAG_COPIED;
    if (!img->l1_dirty) {
        img->l1_dirty_hi = 0;
    }
    img->l1_dirty = true;
    img->l1_dirty_lo = 0;
    ck_assert_int_eq(qs_meta_sync(img), 0);
    return n;
}

START_TEST(test_cow_shared)
{
    write_pattern(0, 4 * cs, 11);
    ck_assert_int_eq(qsnap_flush(img), 0);
    const uint64_t n = fake_share();
    ck_assert_uint_eq(n, 5);
    check_result(0, n); /* the setup is consistent */

    const uint64_t t_old = img->l1[0] & QS_L1E_OFFSET_MASK;
    const struct qs_mapping before = map_at(cs, cs);
    ck_assert_int_eq(before.type, QS_C_NORMAL);
    ck_assert(!before.copied);
    uint8_t *old_table = malloc(cs), *old_data = malloc(cs);
    ck_assert_ptr_nonnull(old_table);
    ck_assert_ptr_nonnull(old_data);
    memcpy(old_table, memio_data(mem, NULL) + t_old, cs);
    memcpy(old_data, memio_data(mem, NULL) + before.host_off, cs);

    memio_log_start(mem);
    write_pattern(cs + 50, 100, 12);

    /* New table and new cluster, both owned; the old ones untouched. */
    const uint64_t t_new = img->l1[0] & QS_L1E_OFFSET_MASK;
    ck_assert_uint_ne(t_new, t_old);
    ck_assert(img->l1[0] & QS_OFLAG_COPIED);
    const struct qs_mapping after = map_at(cs, cs);
    ck_assert_int_eq(after.type, QS_C_NORMAL);
    ck_assert(after.copied);
    ck_assert_uint_ne(after.host_off, before.host_off);
    ck_assert_int_lt(memio_log_find(mem, 0, UNIT_OP_WRITE, t_old, cs), 0);
    ck_assert_int_lt(memio_log_find(mem, 0, UNIT_OP_WRITE, before.host_off, cs),
                     0);
    /* Other clusters stay shared. */
    const struct qs_mapping other = map_at(2 * cs, cs);
    ck_assert(!other.copied);

    ck_assert_int_eq(qsnap_flush(img), 0);
    ck_assert_mem_eq(memio_data(mem, NULL) + t_old, old_table, cs);
    ck_assert_mem_eq(memio_data(mem, NULL) + before.host_off, old_data, cs);

    /* Guest view: old data with the new bytes. */
    expect(0, cs + 50, 11);
    expect(cs + 50, 100, 12);
    expect(cs + 150, 3 * cs - 150, 11);
    /* The old table and cluster keep their phantom reference only. */
    uint64_t rc;
    ck_assert_int_eq(qs_refcount_get(img, t_old / cs, &rc), 0);
    ck_assert_uint_eq(rc, 1);
    ck_assert_int_eq(qs_refcount_get(img, before.host_off / cs, &rc), 0);
    ck_assert_uint_eq(rc, 1);
    check_result(0, n);
    free(old_table);
    free(old_data);
}
END_TEST

/*
 * Write order of a sync (spec ordering, DESIGN.md section 3): the new
 * data and the refcount block counting it must be flushed before the L2
 * table pointing to them is written.
 */
START_TEST(test_sync_order)
{
    write_pattern(0, cs, 1);
    ck_assert_int_eq(qsnap_flush(img), 0);
    memio_log_start(mem);
    write_pattern(5 * cs, 2 * cs, 2); /* new clusters, same L2 table */
    const struct qs_mapping m = map_at(5 * cs, cs);
    ck_assert_int_eq(m.type, QS_C_NORMAL);
    ck_assert_int_eq(qsnap_flush(img), 0);

    const uint64_t l2off = img->l1[0] & QS_L1E_OFFSET_MASK;
    const uint64_t rb = img->rt[0] & QS_RT_OFFSET_MASK;
    const long wd = memio_log_find(mem, 0, UNIT_OP_WRITE, m.host_off, cs);
    const long wr = memio_log_find(mem, 0, UNIT_OP_WRITE, rb, cs);
    const long wl = memio_log_find(mem, 0, UNIT_OP_WRITE, l2off, cs);
    ck_assert_int_ge(wd, 0);
    ck_assert_int_ge(wr, 0);
    ck_assert_int_ge(wl, 0);
    ck_assert_int_gt(wl, wd);
    ck_assert_int_gt(wl, wr);
    const long fl =
        memio_log_find(mem, (size_t)QS_MAX(wd, wr) + 1, UNIT_OP_FLUSH, 0, 0);
    ck_assert_msg(fl >= 0 && fl < wl,
                  "no flush between the refcount block write (#%ld) and "
                  "the L2 table write (#%ld)",
                  wr, wl);
}
END_TEST

/* ------------------------------------------------------------ zeroing */

START_TEST(test_zero_and_discard)
{
    const int version = _i ? 2 : 3;
    if (version == 2) {
        teardown();
        open_image(16u << 20, CS, 2);
    }
    write_pattern(0, 10 * cs, 21);
    ck_assert_int_eq(qsnap_flush(img), 0);

    ck_assert_int_eq(qsnap_write_zeroes(img, cs + 1000, 3 * cs, 0), 0);
    expect(0, cs + 1000, 21);
    expect(cs + 1000, 3 * cs, 0);
    expect(4 * cs + 1000, cs - 1000, 21);
    if (version == 3) {
        /* Whole clusters become zero clusters that keep their space. */
        ck_assert_int_eq(map_at(2 * cs, cs).type, QS_C_ZERO_ALLOC);
    }

    ck_assert_int_eq(qsnap_write_zeroes(img, 5 * cs, cs, QSNAP_ZERO_MAY_UNMAP),
                     0);
    expect(5 * cs, cs, 0);
    if (version == 3) {
        ck_assert_int_eq(map_at(5 * cs, cs).type, QS_C_ZERO_PLAIN);
    }

    ck_assert_int_eq(qsnap_discard(img, 6 * cs + 7, 2 * cs), 0);
    expect(5 * cs, cs, 0);
    expect(6 * cs, 7, 21);
    expect(6 * cs + 7, 2 * cs, 0);
    expect(8 * cs + 7, 2 * cs - 7, 21);
    if (version == 3) {
        ck_assert_int_eq(map_at(7 * cs, cs).type, QS_C_UNALLOC);
    }

    /* Zeroing what is already unallocated changes nothing. */
    ck_assert_int_eq(qsnap_write_zeroes(img, 100 * cs, 4 * cs, 0), 0);
    expect(100 * cs, 4 * cs, 0);

    ck_assert_int_eq(qsnap_flush(img), 0);
    check_result(0, 0);
    reopen();
    expect(0, cs + 1000, 21);
    expect(cs + 1000, 3 * cs, 0);
    expect(4 * cs + 1000, cs - 1000, 21);
    expect(5 * cs, cs, 0);
    expect(6 * cs, 7, 21);
    expect(6 * cs + 7, 2 * cs, 0);
    expect(8 * cs + 7, 2 * cs - 7, 21);
    check_result(0, 0);

    /* Writing over a zero cluster brings data back. */
    write_pattern(2 * cs + 10, 10, 22);
    expect(2 * cs, 10, 0);
    expect(2 * cs + 10, 10, 22);
    expect(2 * cs + 20, cs - 20, 0);
    ck_assert_int_eq(qsnap_flush(img), 0);
    check_result(0, 0);
}
END_TEST

/* ------------------------------------------------------------ compressed */

static const uint32_t csizes[] = {512, 65536, 2u << 20};

START_TEST(test_descriptor_layout)
{
    const uint32_t c = csizes[_i];
    teardown();
    open_image(8u << 20, c, 3);
    const uint32_t bits = img->cluster_bits;
    const uint32_t x = 62 - (bits - 8);
    ck_assert_uint_eq(img->csize_shift, x);
    ck_assert_uint_eq(img->csize_mask, (UINT64_C(1) << (bits - 8)) - 1);
    ck_assert_uint_eq(img->coffset_mask, (UINT64_C(1) << x) - 1);

    /* The largest sector count and an offset using every offset bit. */
    const uint64_t field = img->csize_mask;
    const uint64_t off = ((UINT64_C(1) << x) - 1) & ~UINT64_C(0x3f);
    const uint64_t e = QS_OFLAG_COMPRESSED | (field << x) | off;
    uint64_t host, len;
    qs_compressed_range(img, e, &host, &len);
    ck_assert_uint_eq(host, off & ~UINT64_C(511));
    ck_assert_uint_eq(len, (field + 1) * 512);
    /* Sector count 1 at offset 0x1234. */
    qs_compressed_range(img, QS_OFLAG_COMPRESSED | 0x1234, &host, &len);
    ck_assert_uint_eq(host, 0x1200);
    ck_assert_uint_eq(len, 512);
    ck_assert_int_eq(qs_l2_entry_type(img, e), QS_C_COMPRESSED);
}
END_TEST

START_TEST(test_compressed_write_descriptor)
{
    const uint32_t c = csizes[_i];
    teardown();
    open_image(8u << 20, c, 3);
    const uint32_t bits = img->cluster_bits;
    const uint32_t x = 62 - (bits - 8);

    uint8_t *data = malloc(c), *cbuf = malloc(c), *out = malloc(c);
    ck_assert_ptr_nonnull(data);
    ck_assert_ptr_nonnull(cbuf);
    ck_assert_ptr_nonnull(out);
    uint64_t prev_end = 0;
    for (uint64_t k = 0; k < 2; k++) {
        for (uint64_t i = 0; i < c; i++) {
            data[i] = (uint8_t)("abcdefgh"[(i / 3 + k) % 8]);
        }
        const ssize_t clen =
            qs_compress(QSNAP_COMPRESSION_ZLIB, cbuf, c - 1, data, c);
        ck_assert_int_gt(clen, 0);
        ck_assert_int_eq(qsnap_write_compressed(img, data, c, k * c), 0);

        const uint64_t l2off = img->l1[0] & QS_L1E_OFFSET_MASK;
        void *l2;
        ck_assert_int_eq(qs_cache_get(img->l2_cache, l2off, false, &l2), 0);
        const uint64_t e = l2e(l2, k);
        qs_cache_put(img->l2_cache, l2);

        /* Decode by hand, per the spec. */
        ck_assert(e & QS_OFLAG_COMPRESSED);
        ck_assert(!(e & QS_OFLAG_COPIED));
        const uint64_t off = e & ((UINT64_C(1) << x) - 1);
        const uint64_t nsec =
            ((e >> x) & ((UINT64_C(1) << (bits - 8)) - 1)) + 1;
        ck_assert_uint_eq(nsec,
                          ((off + (uint64_t)clen - 1) >> 9) - (off >> 9) + 1);
        if (k == 1 && (prev_end & (c - 1)) &&
            (uint64_t)clen <= c - (prev_end & (c - 1))) {
            /* Packed right after the previous compressed cluster. */
            ck_assert_uint_eq(off, prev_end);
        }
        prev_end = off + (uint64_t)clen;

        ck_assert_int_eq(qsnap_flush(img), 0);
        ck_assert_uint_le(off + (uint64_t)clen, memio_size(mem));
        const uint8_t *raw = memio_data(mem, NULL) + off;
        ck_assert_mem_eq(raw, cbuf, (size_t)clen);
        ck_assert_int_eq(
            qs_decompress(QSNAP_COMPRESSION_ZLIB, out, c, raw, (size_t)clen),
            0);
        ck_assert_mem_eq(out, data, c);
        ck_assert_int_eq(qsnap_pread(img, out, c, k * c), 0);
        ck_assert_mem_eq(out, data, c);
    }
    check_result(0, 0);
    free(data);
    free(cbuf);
    free(out);
}
END_TEST

/* ------------------------------------------------------------ bad entries */

START_TEST(test_entry_past_eof)
{
    write_pattern(0, cs, 31);
    ck_assert_int_eq(qsnap_flush(img), 0);
    uint8_t *l2 = l2_get(0);
    const uint64_t bad = (img->file_size / cs + 100) * cs;
    l2e_set(l2, 7, bad | QS_OFLAG_COPIED);
    qs_cache_put(img->l2_cache, l2);

    struct qs_mapping m;
    ck_assert_int_eq(qs_map(img, 7 * cs, cs, &m), -EUCLEAN);
    char hex[32];
    snprintf(hex, sizeof(hex), "0x%" PRIx64, bad);
    const char *msg = qsnap_errmsg(img);
    ck_assert_ptr_nonnull(strstr(msg, UNIT_IMAGE_NAME));
    ck_assert_msg(strstr(msg, hex) != NULL, "'%s' lacks %s", msg, hex);
    ck_assert(img->corrupt);

    uint8_t b[100];
    ck_assert_int_eq(qsnap_pread(img, b, sizeof(b), 7 * cs + 5), -EUCLEAN);
    /* A run that reaches the bad entry fails too. */
    ck_assert_int_eq(qsnap_pread(img, b, sizeof(b), 7 * cs - 50), -EUCLEAN);
    /* Good clusters still read; writes are refused from now on. */
    expect(0, cs, 31);
    ck_assert_int_eq(qsnap_pwrite(img, b, sizeof(b), 0), -EROFS);
}
END_TEST

START_TEST(test_entry_unaligned)
{
    write_pattern(0, cs, 32);
    ck_assert_int_eq(qsnap_flush(img), 0);
    uint8_t *l2 = l2_get(0);
    l2e_set(l2, 0, (4 * cs + 512) | QS_OFLAG_COPIED);
    qs_cache_put(img->l2_cache, l2);
    uint8_t b[16];
    ck_assert_int_eq(qsnap_pread(img, b, sizeof(b), 0), -EUCLEAN);
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), UNIT_IMAGE_NAME));
}
END_TEST

START_TEST(test_l1_entry_past_eof)
{
    write_pattern(0, cs, 33);
    ck_assert_int_eq(qsnap_flush(img), 0);
    img->l1[0] = (img->file_size + 50 * cs) | QS_OFLAG_COPIED;
    struct qs_mapping m;
    ck_assert_int_eq(qs_map(img, 0, cs, &m), -EUCLEAN);
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), UNIT_IMAGE_NAME));
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), "L1 entry 0"));
}
END_TEST

static Suite *cluster_suite(void)
{
    Suite *s = suite_create("cluster");
    TCase *tc = tcase_create("mapping");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_mapping_types);
    tcase_add_test(tc, test_partial_write_unallocated);
    tcase_add_test(tc, test_partial_write_reserved);
    tcase_add_test(tc, test_partial_write_compressed);
    tcase_add_test(tc, test_cow_shared);
    tcase_add_test(tc, test_sync_order);
    tcase_add_loop_test(tc, test_zero_and_discard, 0, 2);
    tcase_add_loop_test(tc, test_descriptor_layout, 0, 3);
    tcase_add_loop_test(tc, test_compressed_write_descriptor, 0, 3);
    tcase_add_test(tc, test_entry_past_eof);
    tcase_add_test(tc, test_entry_unaligned);
    tcase_add_test(tc, test_l1_entry_past_eof);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(cluster_suite());
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
