/*
 * check_refcount.c - reference counts (refcount.c): every refcount width
 * and its on-disk packing, overflow and underflow, allocation order,
 * deferred frees, refcount table growth and tail truncation.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "unit_util.h"

#define CS 512u

static qsnap_image *img;
static qs_io *mem;

static void open_fresh(uint64_t size, int refcount_bits)
{
    char err[512] = "";
    ck_assert_int_eq(unit_make_simple(size, CS, 3, refcount_bits, &mem), 0);
    memio_ref(mem); /* outlives the image */
    ck_assert_msg(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)) == 0,
                  "%s", err);
    /* Host sizes are exact below: no space reserved ahead of the image's
     * end (but in test_reserve_ahead). */
    img->reserve_off = true;
}

static void reopen(void)
{
    char err[512] = "";
    qsnap_close(img);
    memio_ref(mem);
    ck_assert_msg(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)) == 0,
                  "%s", err);
    img->reserve_off = true;
}

static void teardown(void)
{
    qsnap_close(img);
    img = NULL;
    qs_io_close(mem);
    mem = NULL;
}

static uint64_t rc_of(uint64_t idx)
{
    uint64_t rc = UINT64_MAX;
    ck_assert_int_eq(qs_refcount_get(img, idx, &rc), 0);
    return rc;
}

static void assert_clean(void)
{
    struct qsnap_check_result r;
    ck_assert_int_eq(unit_check(img, &r), 0);
    ck_assert_uint_eq(r.corruptions, 0);
    ck_assert_uint_eq(r.leaks, 0);
    ck_assert_uint_eq(r.check_errors, 0);
}

/* ------------------------------------------------------------ widths */

/* Value stored in cluster 5 for each refcount_order. */
static const uint64_t probe[7] = {
    1, 3, 0xa, 0xc5, 0x1234, 0x12345678, UINT64_C(0x0102030405060708),
};

/*
 * First bytes of refcount block 0 with clusters 0-3 (header, refcount
 * table, refcount block, L1) at 1, cluster 5 at probe[order] and cluster 6
 * at 1: sub-byte widths pack LSB first, wider ones are big-endian.
 */
/* clang-format off */
static const uint8_t expect[7][64] = {
    {0x6f},
    {0x55, 0x1c},
    {0x11, 0x11, 0xa0, 0x01},
    {1, 1, 1, 1, 0, 0xc5, 1},
    {0, 1,  0, 1,  0, 1,  0, 1,  0, 0,  0x12, 0x34,  0, 1},
    {0, 0, 0, 1,  0, 0, 0, 1,  0, 0, 0, 1,  0, 0, 0, 1,  0, 0, 0, 0,
     0x12, 0x34, 0x56, 0x78,  0, 0, 0, 1},
    {0, 0, 0, 0, 0, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 1,
     0, 0, 0, 0, 0, 0, 0, 1,  0, 0, 0, 0, 0, 0, 0, 1,
     0, 0, 0, 0, 0, 0, 0, 0,  1, 2, 3, 4, 5, 6, 7, 8,
     0, 0, 0, 0, 0, 0, 0, 1},
};
/* clang-format on */

START_TEST(test_width_packing)
{
    const int order = _i;
    open_fresh(1 << 20, 1 << order);
    ck_assert_uint_eq(img->refcount_order, (unsigned)order);
    ck_assert_uint_eq(img->refcount_max,
                      order == 6 ? UINT64_MAX
                                 : (UINT64_C(1) << (1 << order)) - 1);
    ck_assert_uint_eq(img->rb_bits, 9 + 3 - (unsigned)order);
    for (uint64_t c = 0; c < 4; c++) {
        ck_assert_uint_eq(rc_of(c), 1);
    }
    ck_assert_uint_eq(rc_of(4), 0);

    ck_assert_int_eq(qs_refcount_set(img, 5, probe[order]), 0);
    ck_assert_int_eq(qs_refcount_set(img, 6, 1), 0);
    ck_assert_uint_eq(rc_of(5), probe[order]);
    ck_assert_uint_eq(rc_of(6), 1);
    ck_assert_uint_eq(rc_of(4), 0); /* neighbours untouched */
    ck_assert_uint_eq(rc_of(7), 0);
    ck_assert_uint_eq(rc_of(3), 1);

    ck_assert_int_eq(qs_cache_writeback(img->rb_cache), 0);
    const uint64_t blk = img->rt[0] & QS_RT_OFFSET_MASK;
    ck_assert_uint_eq(blk, 2 * CS);
    const uint8_t *raw = memio_data(mem, NULL) + blk;
    ck_assert_mem_eq(raw, expect[order], 64);
    ck_assert(unit_all(raw + 64, CS - 64, 0));

    /* Values survive a reopen (read back from those bytes). */
    reopen();
    ck_assert_uint_eq(rc_of(5), probe[order]);
    ck_assert_uint_eq(rc_of(6), 1);
    ck_assert_uint_eq(rc_of(4), 0);

    /* Back to zero: the bytes go back too. */
    ck_assert_int_eq(qs_refcount_set(img, 5, 0), 0);
    ck_assert_int_eq(qs_refcount_set(img, 6, 0), 0);
    ck_assert_int_eq(qs_cache_writeback(img->rb_cache), 0);
    uint8_t base[64];
    memcpy(base, expect[order], 64);
    const unsigned bits = 1u << order;
    for (unsigned c = 5; c <= 6; c++) {
        for (unsigned b = c * bits; b < (c + 1) * bits; b++) {
            base[b / 8] &= (uint8_t) ~(1u << (b % 8));
        }
    }
    raw = memio_data(mem, NULL) + blk;
    ck_assert_mem_eq(raw, base, 64);
}
END_TEST

START_TEST(test_overflow)
{
    const int order = _i;
    open_fresh(1 << 20, 1 << order);
    const uint64_t max = img->refcount_max;

    if (order == 0) {
        /* A 1-bit refcount goes 0 -> 1 and no further. */
        ck_assert_int_eq(qs_refcount_update(img, 5 * CS, CS, 1), 0);
        ck_assert_int_eq(qs_refcount_update(img, 5 * CS, CS, 1), -EOVERFLOW);
        ck_assert_uint_eq(rc_of(5), 1);
    }
    if (order < 6) {
        ck_assert_int_eq(qs_refcount_set(img, 6, max), 0);
    } else {
        /* Reach 2^64-1 in steps an int64_t delta can express (setting it
         * in one go is test_set_64bit_high). */
        ck_assert_int_eq(qs_refcount_update(img, 6 * CS, CS, INT64_MAX), 0);
        ck_assert_int_eq(qs_refcount_update(img, 6 * CS, CS, INT64_MAX), 0);
        ck_assert_int_eq(qs_refcount_update(img, 6 * CS, CS, 1), 0);
    }
    ck_assert_uint_eq(rc_of(6), max);
    ck_assert_int_eq(qs_refcount_update(img, 6 * CS, CS, 1), -EOVERFLOW);
    ck_assert_uint_eq(rc_of(6), max); /* not wrapped */
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), UNIT_IMAGE_NAME));
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), "0xc00"));
    ck_assert(!img->corrupt);
    if (order < 6) {
        ck_assert_int_eq(qs_refcount_set(img, 7, max + 1), -EOVERFLOW);
        ck_assert_uint_eq(rc_of(7), 0);
    }
    /* A range update stops at the first overflow, leaving none wrapped. */
    ck_assert_int_eq(qs_refcount_update(img, 5 * CS, 3 * CS, 1), -EOVERFLOW);
    ck_assert_uint_eq(rc_of(6), max);
}
END_TEST

/*
 * 64-bit refcounts can hold values of 2^63 and more; qs_refcount_set must
 * store them (and lower them again) without turning the difference into a
 * negative delta.
 */
START_TEST(test_set_64bit_high)
{
    open_fresh(1 << 20, 64);
    const uint64_t big = (UINT64_C(1) << 63) + 5;
    ck_assert_int_eq(qs_refcount_set(img, 6, UINT64_MAX), 0);
    ck_assert_uint_eq(rc_of(6), UINT64_MAX);
    ck_assert_int_eq(qs_refcount_set(img, 7, big), 0);
    ck_assert_uint_eq(rc_of(7), big);
    /* Down from there to 0, as leak repair does. */
    ck_assert_int_eq(qs_refcount_set(img, 7, 0), 0);
    ck_assert_uint_eq(rc_of(7), 0);
    ck_assert(!img->corrupt);
}
END_TEST

START_TEST(test_underflow)
{
    open_fresh(1 << 20, 16);
    ck_assert_uint_eq(rc_of(9), 0);
    ck_assert_int_eq(qs_refcount_update(img, 9 * CS, CS, -1), -EUCLEAN);
    ck_assert_uint_eq(rc_of(9), 0);
    ck_assert(img->corrupt);
    const char *m = qsnap_errmsg(img);
    ck_assert_ptr_nonnull(strstr(m, UNIT_IMAGE_NAME));
    ck_assert_ptr_nonnull(strstr(m, "0x1200"));

    /* Past the refcount table's coverage: nothing to decrement either. */
    const uint64_t far = qs_refcount_covered_clusters(img) + 10;
    ck_assert_int_eq(qs_refcount_update(img, far * CS, CS, -1), -EUCLEAN);
    ck_assert_uint_eq(rc_of(far), 0);
}
END_TEST

START_TEST(test_decrement_to_zero)
{
    open_fresh(1 << 20, 4);
    ck_assert_int_eq(qs_refcount_set(img, 10, 3), 0);
    ck_assert_int_eq(qs_refcount_update(img, 10 * CS, CS, -2), 0);
    ck_assert_uint_eq(rc_of(10), 1);
    ck_assert_int_eq(qs_refcount_update(img, 10 * CS, CS, -1), 0);
    ck_assert_uint_eq(rc_of(10), 0);
    ck_assert_int_eq(qs_refcount_update(img, 10 * CS, CS, -1), -EUCLEAN);
}
END_TEST

/* ------------------------------------------------------------ allocation */

START_TEST(test_alloc_lowest_first)
{
    open_fresh(1 << 20, 16);
    /* A larger file, so allocations stay inside it. */
    uint8_t z[CS];
    memset(z, 0, sizeof(z));
    ck_assert_int_eq(qs_host_write(img, z, CS, 63 * CS), 0);

    uint64_t off;
    ck_assert_int_eq(qs_alloc_clusters(img, 1, &off), 0);
    ck_assert_uint_eq(off, 4 * CS);
    ck_assert_int_eq(qs_alloc_clusters(img, 1, &off), 0);
    ck_assert_uint_eq(off, 5 * CS);
    ck_assert_int_eq(qs_alloc_clusters(img, 3, &off), 0);
    ck_assert_uint_eq(off, 6 * CS);
    for (uint64_t c = 4; c < 9; c++) {
        ck_assert_uint_eq(rc_of(c), 1);
    }
    ck_assert_uint_eq(rc_of(9), 0);

    /* A deferred free is not reused until drained. */
    ck_assert_int_eq(qs_free_deferred(img, 5 * CS, CS), 0);
    ck_assert_uint_eq(rc_of(5), 1);
    ck_assert_int_eq(qs_alloc_clusters(img, 1, &off), 0);
    ck_assert_uint_eq(off, 9 * CS);
    ck_assert_int_eq(qs_refcount_drain(img), 0);
    ck_assert_uint_eq(rc_of(5), 0);
    ck_assert_int_eq(qs_alloc_clusters(img, 1, &off), 0);
    ck_assert_uint_eq(off, 5 * CS);

    /* A single free cluster does not satisfy a request for two. */
    ck_assert_int_eq(qs_free_deferred(img, 7 * CS, CS), 0);
    ck_assert_int_eq(qs_refcount_drain(img), 0);
    ck_assert_int_eq(qs_alloc_clusters(img, 2, &off), 0);
    ck_assert_uint_eq(off, 10 * CS);
    ck_assert_int_eq(qs_alloc_clusters(img, 1, &off), 0);
    ck_assert_uint_eq(off, 7 * CS);

    /* qs_alloc_run takes the first free run, even if short. */
    ck_assert_int_eq(qs_free_deferred(img, 4 * CS, CS), 0);
    ck_assert_int_eq(qs_refcount_drain(img), 0);
    uint64_t got = 0;
    ck_assert_int_eq(qs_alloc_run(img, 8, &off, &got, NULL), 0);
    ck_assert_uint_eq(off, 4 * CS);
    ck_assert_uint_eq(got, 1);
    ck_assert_int_eq(qs_alloc_run(img, 8, &off, &got, NULL), 0);
    ck_assert_uint_eq(off, 12 * CS);
    ck_assert_uint_eq(got, 8);
    for (uint64_t c = 12; c < 20; c++) {
        ck_assert_uint_eq(rc_of(c), 1);
    }
    ck_assert_int_eq(qs_alloc_clusters(img, 0, &off), -EINVAL);
}
END_TEST

START_TEST(test_drain_punches)
{
    open_fresh(1 << 20, 16);
    uint8_t d[CS];
    memset(d, 0x5c, sizeof(d));
    uint64_t off;
    ck_assert_int_eq(qs_alloc_clusters(img, 4, &off), 0);
    ck_assert_uint_eq(off, 4 * CS);
    for (uint64_t c = 4; c < 8; c++) {
        ck_assert_int_eq(qs_host_write(img, d, CS, c * CS), 0);
    }
    /* A freed cluster in the middle is punched but the file keeps size. */
    memio_log_start(mem);
    ck_assert_int_eq(qs_free_deferred(img, 5 * CS, CS), 0);
    ck_assert_int_eq(qs_refcount_drain(img), 0);
    ck_assert_int_ge(memio_log_find(mem, 0, UNIT_OP_PUNCH, 5 * CS, CS), 0);
    ck_assert(unit_all(memio_data(mem, NULL) + 5 * CS, CS, 0));
    ck_assert(unit_all(memio_data(mem, NULL) + 6 * CS, CS, 0x5c));
    ck_assert_uint_eq(memio_size(mem), 8 * CS);
    ck_assert_uint_eq(img->file_size, 8 * CS);
}
END_TEST

START_TEST(test_reserve_ahead)
{
    open_fresh(1 << 20, 16);
    img->reserve_off = false;
    const uint64_t mib = 1u << 20;
    uint64_t off, got;
    bool zeroed = true;

    /* Growing past the end reserves to a MiB boundary at least 1 MiB on. */
    ck_assert_int_eq(qs_alloc_run(img, 4, &off, &got, &zeroed), 0);
    ck_assert_uint_eq(off, 4 * CS);
    ck_assert_uint_eq(got, 4);
    ck_assert(zeroed); /* past the old end: new space */
    ck_assert_uint_eq(img->file_size, 8 * CS);
    ck_assert_uint_eq(img->reserved_end, 2 * mib);
    ck_assert_uint_eq(memio_size(mem), 2 * mib);

    /* Clusters handed out from the reserved space read as zeros. */
    ck_assert_int_eq(qs_alloc_run(img, 2, &off, &got, &zeroed), 0);
    ck_assert_uint_eq(off, 8 * CS);
    ck_assert(zeroed);
    ck_assert_uint_eq(memio_size(mem), 2 * mib);

    /* A metadata write past the allocator's cursor takes space out of the
     * window: what lies below its end is no longer known zero. */
    uint8_t d[CS];
    memset(d, 0x6b, sizeof(d));
    ck_assert_int_eq(qs_host_write(img, d, CS, 12 * CS), 0);
    ck_assert_int_eq(qs_alloc_run(img, 2, &off, &got, &zeroed), 0);
    ck_assert_uint_eq(off, 10 * CS);
    ck_assert(!zeroed);
    ck_assert_int_eq(qs_alloc_run(img, 1, &off, &got, &zeroed), 0);
    ck_assert_uint_eq(off, 12 * CS); /* (its refcount was 0) */
    ck_assert(!zeroed);
    ck_assert_int_eq(qs_alloc_run(img, 1, &off, &got, &zeroed), 0);
    ck_assert_uint_eq(off, 13 * CS);
    ck_assert(zeroed);

    /* A reused cluster is not fresh. */
    ck_assert_int_eq(qs_free_deferred(img, 5 * CS, CS), 0);
    ck_assert_int_eq(qs_refcount_drain(img), 0);
    ck_assert_int_eq(qs_alloc_run(img, 1, &off, &got, &zeroed), 0);
    ck_assert_uint_eq(off, 5 * CS);
    ck_assert(!zeroed);

    /* Freeing the tail truncates the reservation away with it ... */
    ck_assert_int_eq(qs_free_deferred(img, 8 * CS, 6 * CS), 0);
    ck_assert_int_eq(qs_refcount_drain(img), 0);
    ck_assert_uint_eq(memio_size(mem), 8 * CS);
    ck_assert_uint_eq(img->reserved_end, 0);
    /* ... and growing again reserves anew, zeroed. */
    ck_assert_int_eq(qs_alloc_run(img, 3, &off, &got, &zeroed), 0);
    ck_assert_uint_eq(off, 8 * CS);
    ck_assert(zeroed);
    ck_assert_uint_eq(memio_size(mem), 2 * mib);

    /* Release (at close) cuts the file back to the image's end. */
    ck_assert_int_eq(qs_reserve_release(img), 0);
    ck_assert_uint_eq(memio_size(mem), 11 * CS);
    ck_assert_uint_eq(img->file_size, 11 * CS);
    ck_assert_int_eq(qs_reserve_release(img), 0);
    ck_assert_uint_eq(memio_size(mem), 11 * CS);

    /* A host file that cannot reserve is written as before. */
    memio_set_max_size(mem, 16 * CS);
    ck_assert_int_eq(qs_alloc_run(img, 2, &off, &got, &zeroed), 0);
    ck_assert_uint_eq(off, 11 * CS);
    ck_assert(!zeroed);
    ck_assert_uint_eq(img->reserved_end, 0);
    ck_assert_uint_eq(memio_size(mem), 11 * CS);
    memio_set_max_size(mem, 0);
}
END_TEST

START_TEST(test_tail_truncated)
{
    open_fresh(1 << 20, 16);
    uint8_t d[10 * CS];
    unit_fill(d, sizeof(d), 1, 0);
    ck_assert_int_eq(qsnap_pwrite(img, d, sizeof(d), 0), 0);
    ck_assert_int_eq(qsnap_flush(img), 0);
    /* L2 table at cluster 4, data at 5..14. */
    ck_assert_uint_eq(memio_size(mem), 15 * CS);
    ck_assert_uint_eq(rc_of(14), 1);

    ck_assert_int_eq(qsnap_discard(img, 5 * CS, 5 * CS), 0);
    ck_assert_int_eq(qsnap_flush(img), 0);
    ck_assert_uint_eq(memio_size(mem), 10 * CS);
    ck_assert_uint_eq(img->file_size, 10 * CS);
    for (uint64_t c = 10; c < 15; c++) {
        ck_assert_uint_eq(rc_of(c), 0);
    }
    /* A hole in the middle leaves the size alone. */
    ck_assert_int_eq(qsnap_discard(img, 2 * CS, CS), 0);
    ck_assert_int_eq(qsnap_flush(img), 0);
    ck_assert_uint_eq(memio_size(mem), 10 * CS);
    assert_clean();

    uint8_t r[10 * CS];
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), 0), 0);
    ck_assert_mem_eq(r, d, 2 * CS);
    ck_assert(unit_all(r + 2 * CS, CS, 0));
    ck_assert_mem_eq(r + 3 * CS, d + 3 * CS, 2 * CS);
    ck_assert(unit_all(r + 5 * CS, 5 * CS, 0));

    /* The freed space is used again before the file grows. */
    ck_assert_int_eq(qsnap_pwrite(img, d, 2 * CS, 100 * CS), 0);
    ck_assert_int_eq(qsnap_flush(img), 0);
    ck_assert_uint_le(memio_size(mem), 12 * CS);
    assert_clean();
}
END_TEST

/* ------------------------------------------------------------ growth */

START_TEST(test_table_growth)
{
    /* 64-bit refcounts in 512-byte clusters: a block covers 64 clusters,
     * the one-cluster table 4096 clusters (2 MiB). */
    const uint64_t size = 4u << 20;
    open_fresh(size, 64);
    ck_assert_uint_eq(qs_refcount_covered_clusters(img), 4096);

    const size_t chunk = 32 * 1024;
    uint8_t *buf = malloc(chunk);
    uint64_t *before = calloc(16384, sizeof(*before));
    ck_assert_ptr_nonnull(buf);
    ck_assert_ptr_nonnull(before);
    int growths = 0;

    for (uint64_t off = 0; off < size; off += chunk) {
        const uint64_t old_rt = img->rt_size;
        const uint64_t old_t_off = img->hdr.refcount_table_offset;
        const uint64_t old_t_n = img->hdr.refcount_table_clusters;
        const uint64_t n_cl = img->file_size / CS;
        ck_assert_uint_le(n_cl, 16384);
        for (uint64_t c = 0; c < n_cl; c++) {
            before[c] = rc_of(c);
        }
        unit_fill(buf, chunk, 42, off);
        ck_assert_int_eq(qsnap_pwrite(img, buf, chunk, off), 0);
        if (img->rt_size == old_rt) {
            continue;
        }
        growths++;
        ck_assert_uint_gt(img->rt_size, old_rt);
        ck_assert_uint_ne(img->hdr.refcount_table_offset, old_t_off);
        for (uint64_t c = 0; c < n_cl; c++) {
            const bool old_table =
                c >= old_t_off / CS && c < old_t_off / CS + old_t_n;
            if (before[c] && !old_table) {
                ck_assert_msg(rc_of(c) == before[c],
                              "cluster %llu: refcount %llu, was %llu",
                              (unsigned long long)c,
                              (unsigned long long)rc_of(c),
                              (unsigned long long)before[c]);
            }
        }
        /* The new table's own clusters are counted. */
        const uint64_t t = img->hdr.refcount_table_offset / CS;
        for (uint64_t c = t; c < t + img->hdr.refcount_table_clusters; c++) {
            ck_assert_uint_eq(rc_of(c), 1);
        }
    }
    ck_assert_int_ge(growths, 1);
    ck_assert_uint_ge(qs_refcount_covered_clusters(img), img->file_size / CS);
    assert_clean();

    /* Every byte reads back, before and after a reopen. */
    for (int pass = 0; pass < 2; pass++) {
        uint8_t *want = malloc(chunk);
        ck_assert_ptr_nonnull(want);
        for (uint64_t off = 0; off < size; off += chunk) {
            ck_assert_int_eq(qsnap_pread(img, buf, chunk, off), 0);
            unit_fill(want, chunk, 42, off);
            ck_assert_mem_eq(buf, want, chunk);
        }
        free(want);
        reopen();
        assert_clean();
    }
    free(buf);
    free(before);
}
END_TEST

/* Every width works end to end: writes, discards, rewrites, check. */
START_TEST(test_width_end_to_end)
{
    const int order = _i;
    open_fresh(1 << 20, 1 << order);
    uint8_t d[40 * CS];
    unit_fill(d, sizeof(d), (uint64_t)order, 0);
    ck_assert_int_eq(qsnap_pwrite(img, d, sizeof(d), 0), 0);
    ck_assert_int_eq(qsnap_discard(img, 8 * CS, 16 * CS), 0);
    ck_assert_int_eq(qsnap_flush(img), 0);
    ck_assert_int_eq(qsnap_pwrite(img, d, 4 * CS, 200 * CS + 7), 0);
    ck_assert_int_eq(qsnap_write_zeroes(img, 30 * CS, 2 * CS, 0), 0);
    assert_clean();
    reopen();
    assert_clean();
    uint8_t r[4 * CS];
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), 200 * CS + 7), 0);
    ck_assert_mem_eq(r, d, sizeof(r));
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), 8 * CS), 0);
    ck_assert(unit_all(r, sizeof(r), 0));
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), 0), 0);
    ck_assert_mem_eq(r, d, sizeof(r));
}
END_TEST

static Suite *refcount_suite(void)
{
    Suite *s = suite_create("refcount");
    TCase *tc = tcase_create("widths");
    tcase_add_checked_fixture(tc, NULL, teardown);
    tcase_add_loop_test(tc, test_width_packing, 0, 7);
    tcase_add_loop_test(tc, test_overflow, 0, 7);
    tcase_add_test(tc, test_set_64bit_high);
    tcase_add_test(tc, test_underflow);
    tcase_add_test(tc, test_decrement_to_zero);
    tcase_add_loop_test(tc, test_width_end_to_end, 0, 7);
    suite_add_tcase(s, tc);

    tc = tcase_create("allocation");
    tcase_add_checked_fixture(tc, NULL, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_alloc_lowest_first);
    tcase_add_test(tc, test_drain_punches);
    tcase_add_test(tc, test_tail_truncated);
    tcase_add_test(tc, test_reserve_ahead);
    tcase_add_test(tc, test_table_growth);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(refcount_suite());
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
