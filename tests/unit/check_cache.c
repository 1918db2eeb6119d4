/*
 * check_cache.c - metadata caches (cache.c): hits and misses, CLOCK
 * replacement, pinning, write-back on eviction and on request, the
 * refcount-before-L2 dependency, drop and reset.
 *
 * The caches under test are made on a real (in-memory) image, whose
 * geometry and lock they use; they work on clusters far past the image's
 * own metadata, observed through the memory file's operation log.
 */
#include "config.h"

#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "unit_util.h"

#define CS 512u
#define AREA (64u * CS) /* first cluster used by these tests */
#define OFF(i) ((uint64_t)AREA + (uint64_t)(i)*CS)

static qsnap_image *img;
static qs_io *mem;   /* the memory file under the image */
static qs_io *fio;   /* the fault wrapper the image owns */
static qs_cache *ca; /* "L2" cache, depends on cb */
static qs_cache *cb; /* "refcount" cache */

/* Cluster i of the test area holds bytes 0x10 + i. */
static void setup(void)
{
    char err[512] = "";
    ck_assert_int_eq(unit_make_simple(1 << 20, CS, 3, 16, &mem), 0);
    uint8_t b[CS];
    for (int i = 0; i < 32; i++) {
        memset(b, 0x10 + i, CS);
        ck_assert_int_eq(qs_io_pwrite(mem, b, CS, OFF(i)), 0);
    }
    fio = qs_faultio_new(mem);
    ck_assert_ptr_nonnull(fio);
    ck_assert_int_eq(unit_open(fio, QSNAP_OPEN_RDWR, &img, err, sizeof(err)),
                     0);
    ca = qs_cache_new(img, 4, "test table");
    cb = qs_cache_new(img, 4, "test block");
    ck_assert_ptr_nonnull(ca);
    ck_assert_ptr_nonnull(cb);
    memio_log_start(mem);
}

static void teardown(void)
{
    qs_cache_free(ca);
    qs_cache_free(cb);
    qsnap_close(img);
    img = NULL;
}

static unsigned count_ops(enum unit_op op, uint64_t off)
{
    unsigned n = 0;
    for (size_t i = 0; i < memio_log_count(mem); i++) {
        const struct unit_op_rec *r = memio_log_get(mem, i);
        if (r->op == op && r->off <= off && off < r->off + r->len) {
            n++;
        }
    }
    return n;
}

static unsigned count_all(enum unit_op op)
{
    unsigned n = 0;
    for (size_t i = 0; i < memio_log_count(mem); i++) {
        if (memio_log_get(mem, i)->op == op) {
            n++;
        }
    }
    return n;
}

/* get + put; returns the data pointer (valid until evicted). */
static uint8_t *touch(qs_cache *c, uint64_t off)
{
    void *d = NULL;
    ck_assert_int_eq(qs_cache_get(c, off, false, &d), 0);
    qs_cache_put(c, d);
    return d;
}

static const uint8_t *disk(uint64_t off)
{
    return memio_data(mem, NULL) + off;
}

START_TEST(test_get_put_hit)
{
    void *d1, *d2;
    ck_assert_int_eq(qs_cache_get(ca, OFF(0), false, &d1), 0);
    ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(0)), 1);
    ck_assert(unit_all(d1, CS, 0x10));
    qs_cache_put(ca, d1);
    ck_assert_int_eq(qs_cache_get(ca, OFF(0), false, &d2), 0);
    ck_assert_ptr_eq(d1, d2);
    ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(0)), 1); /* a hit */
    qs_cache_put(ca, d2);
    ck_assert(!qs_cache_has_dirty(ca));
    ck_assert_uint_eq(count_all(UNIT_OP_WRITE), 0);
}
END_TEST

START_TEST(test_fresh)
{
    void *d;
    ck_assert_int_eq(qs_cache_get(ca, OFF(1), true, &d), 0);
    ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(1)), 0);
    ck_assert(unit_all(d, CS, 0));
    ck_assert(qs_cache_has_dirty(ca));
    memset(d, 0x77, 16);
    qs_cache_put(ca, d);
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    ck_assert_uint_eq(count_ops(UNIT_OP_WRITE, OFF(1)), 1);
    ck_assert(unit_all(disk(OFF(1)), 16, 0x77));
    ck_assert(unit_all(disk(OFF(1)) + 16, CS - 16, 0));
    ck_assert(!qs_cache_has_dirty(ca));
}
END_TEST

START_TEST(test_clock_second_chance)
{
    for (int i = 0; i < 4; i++) {
        touch(ca, OFF(i));
    }
    ck_assert_uint_eq(count_all(UNIT_OP_READ), 4);
    /* Full: all four are hits. */
    for (int i = 0; i < 4; i++) {
        touch(ca, OFF(i));
    }
    ck_assert_uint_eq(count_all(UNIT_OP_READ), 4);

    touch(ca, OFF(4)); /* evicts one */
    ck_assert_uint_eq(count_all(UNIT_OP_READ), 5);
    /* Use 1 again, then bring in 5: 1 was used since the last sweep and
     * must survive; 2 was not and is the one to go. */
    touch(ca, OFF(1));
    touch(ca, OFF(5));
    ck_assert_uint_eq(count_all(UNIT_OP_READ), 6);
    touch(ca, OFF(1));
    ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(1)), 1);
    touch(ca, OFF(5));
    ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(5)), 1);
    touch(ca, OFF(2));
    ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(2)), 2);
    /* Nothing was dirty, so nothing was written. */
    ck_assert_uint_eq(count_all(UNIT_OP_WRITE), 0);
}
END_TEST

START_TEST(test_pinned_not_evicted)
{
    void *p[3];
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(qs_cache_get(ca, OFF(i), false, &p[i]), 0);
    }
    /* Many other clusters pass through the one free slot. */
    for (int i = 3; i < 20; i++) {
        const uint8_t *d = touch(ca, OFF(i));
        ck_assert(unit_all(d, CS, (uint8_t)(0x10 + i)));
        for (int k = 0; k < 3; k++) {
            ck_assert_ptr_ne(d, p[k]);
        }
    }
    for (int i = 0; i < 3; i++) {
        ck_assert(unit_all(p[i], CS, (uint8_t)(0x10 + i)));
        void *again;
        ck_assert_int_eq(qs_cache_get(ca, OFF(i), false, &again), 0);
        ck_assert_ptr_eq(again, p[i]);
        ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(i)), 1);
        qs_cache_put(ca, again);
    }

    /* With every slot pinned there is nothing to evict. */
    void *q;
    ck_assert_int_eq(qs_cache_get(ca, OFF(25), false, &q), 0);
    void *r = NULL;
    ck_assert_int_lt(qs_cache_get(ca, OFF(26), false, &r), 0);
    qs_cache_put(ca, q);
    for (int i = 0; i < 3; i++) {
        qs_cache_put(ca, p[i]);
    }
    /* Unpinned again: room is made. */
    r = touch(ca, OFF(26));
    ck_assert(unit_all(r, CS, 0x10 + 26));
}
END_TEST

START_TEST(test_dirty_written_on_eviction)
{
    void *d;
    ck_assert_int_eq(qs_cache_get(ca, OFF(0), false, &d), 0);
    memset(d, 0xab, CS);
    qs_cache_mark_dirty(ca, d);
    qs_cache_put(ca, d);
    ck_assert(qs_cache_has_dirty(ca));
    ck_assert_uint_eq(count_ops(UNIT_OP_WRITE, OFF(0)), 0);
    ck_assert(unit_all(disk(OFF(0)), CS, 0x10));

    for (int i = 1; i < 12; i++) {
        touch(ca, OFF(i));
    }
    /* Evicted: written exactly once, whole cluster, new content. */
    ck_assert_uint_eq(count_ops(UNIT_OP_WRITE, OFF(0)), 1);
    const long w = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(0), 1);
    ck_assert_int_ge(w, 0);
    ck_assert_uint_eq(memio_log_get(mem, (size_t)w)->off, OFF(0));
    ck_assert_uint_eq(memio_log_get(mem, (size_t)w)->len, CS);
    ck_assert(unit_all(disk(OFF(0)), CS, 0xab));
    ck_assert(!qs_cache_has_dirty(ca));
    /* Clean entries were not written. */
    ck_assert_uint_eq(count_all(UNIT_OP_WRITE), 1);
    /* Reading it back comes from the disk and has the new bytes. */
    ck_assert(unit_all(touch(ca, OFF(0)), CS, 0xab));
}
END_TEST

START_TEST(test_writeback_all_sorted)
{
    static const int order[] = {3, 0, 2};
    for (int k = 0; k < 3; k++) {
        void *d;
        ck_assert_int_eq(qs_cache_get(ca, OFF(order[k]), false, &d), 0);
        memset(d, 0xc0 + order[k], CS);
        qs_cache_mark_dirty(ca, d);
        qs_cache_put(ca, d);
    }
    touch(ca, OFF(1)); /* clean */
    memio_log_start(mem);
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    ck_assert_uint_eq(memio_log_count(mem), 3);
    ck_assert_uint_eq(memio_log_get(mem, 0)->off, OFF(0));
    ck_assert_uint_eq(memio_log_get(mem, 1)->off, OFF(2));
    ck_assert_uint_eq(memio_log_get(mem, 2)->off, OFF(3));
    for (size_t i = 0; i < 3; i++) {
        ck_assert_int_eq(memio_log_get(mem, i)->op, UNIT_OP_WRITE);
    }
    ck_assert(unit_all(disk(OFF(0)), CS, 0xc0));
    ck_assert(unit_all(disk(OFF(1)), CS, 0x11));
    ck_assert(unit_all(disk(OFF(2)), CS, 0xc2));
    ck_assert(unit_all(disk(OFF(3)), CS, 0xc3));
    ck_assert(!qs_cache_has_dirty(ca));
    /* Nothing left to do. */
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    ck_assert_uint_eq(memio_log_count(mem), 3);
}
END_TEST

/* Dirties one entry in each cache: B at cluster 10, A at cluster 20. */
static void dirty_pair(void)
{
    void *d;
    ck_assert_int_eq(qs_cache_get(cb, OFF(10), false, &d), 0);
    memset(d, 0xbb, CS);
    qs_cache_mark_dirty(cb, d);
    qs_cache_put(cb, d);
    ck_assert_int_eq(qs_cache_get(ca, OFF(20), false, &d), 0);
    memset(d, 0xaa, CS);
    qs_cache_mark_dirty(ca, d);
    qs_cache_put(ca, d);
    memio_log_start(mem);
}

START_TEST(test_dependency_order)
{
    qs_cache_set_dependency(ca, cb);
    dirty_pair();
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    const long wb = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(10), CS);
    const long fl = memio_log_find(mem, 0, UNIT_OP_FLUSH, 0, 0);
    const long wa = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(20), CS);
    ck_assert_int_ge(wb, 0);
    ck_assert_int_gt(fl, wb); /* dependency durable ... */
    ck_assert_int_gt(wa, fl); /* ... before the dependent entry */
    ck_assert(!qs_cache_has_dirty(cb));
    ck_assert(!qs_cache_has_dirty(ca));
    ck_assert(unit_all(disk(OFF(10)), CS, 0xbb));
    ck_assert(unit_all(disk(OFF(20)), CS, 0xaa));
}
END_TEST

START_TEST(test_dependency_on_eviction)
{
    qs_cache_set_dependency(ca, cb);
    dirty_pair();
    for (int i = 0; i < 8; i++) {
        touch(ca, OFF(i));
    }
    const long wb = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(10), CS);
    const long fl = memio_log_find(mem, 0, UNIT_OP_FLUSH, 0, 0);
    const long wa = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(20), CS);
    ck_assert_int_ge(wb, 0);
    ck_assert_int_gt(fl, wb);
    ck_assert_int_gt(wa, fl);
}
END_TEST

START_TEST(test_dependency_lazy)
{
    /* Lazy refcounts relax nothing here: an entry must never point at
     * blocks (or data) a power loss could still drop. */
    img->hdr.compat |= QS_COMPAT_LAZY_REFCOUNTS;
    qs_cache_set_dependency(ca, cb);
    dirty_pair();
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    const long wb = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(10), CS);
    const long fl = memio_log_find(mem, 0, UNIT_OP_FLUSH, 0, 0);
    const long wa = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(20), CS);
    ck_assert_int_ge(wb, 0);
    ck_assert_int_gt(fl, wb);
    ck_assert_int_gt(wa, fl);
    img->hdr.compat &= ~QS_COMPAT_LAZY_REFCOUNTS;
}
END_TEST

START_TEST(test_dependency_written_earlier)
{
    /* The dependency was written on its own (as a sync does first): it
     * is clean but not yet flushed, so the dependent write still waits
     * for a flush. */
    qs_cache_set_dependency(ca, cb);
    dirty_pair();
    ck_assert_int_eq(qs_cache_writeback(cb), 0);
    ck_assert(!qs_cache_has_dirty(cb));
    const long wb = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(10), CS);
    ck_assert_int_ge(wb, 0);
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    const long fl = memio_log_find(mem, (size_t)wb, UNIT_OP_FLUSH, 0, 0);
    const long wa = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(20), CS);
    ck_assert_int_gt(fl, wb);
    ck_assert_int_gt(wa, fl);
    /* Once flushed, the next dependent write needs no other flush. */
    void *d;
    ck_assert_int_eq(qs_cache_get(ca, OFF(21), false, &d), 0);
    qs_cache_mark_dirty(ca, d);
    qs_cache_put(ca, d);
    memio_log_start(mem);
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    ck_assert_uint_eq(count_all(UNIT_OP_FLUSH), 0);
    ck_assert_uint_eq(count_ops(UNIT_OP_WRITE, OFF(21)), 1);
}
END_TEST

START_TEST(test_mark_unflushed)
{
    /* Writes outside the cache (data, new blocks) can be declared too. */
    qs_cache_set_dependency(ca, cb);
    void *d;
    ck_assert_int_eq(qs_cache_get(ca, OFF(3), false, &d), 0);
    qs_cache_mark_dirty(ca, d);
    qs_cache_put(ca, d);
    qs_cache_mark_unflushed(cb);
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    const long fl = memio_log_find(mem, 0, UNIT_OP_FLUSH, 0, 0);
    const long wa = memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(3), CS);
    ck_assert_int_ge(fl, 0);
    ck_assert_int_gt(wa, fl);
}
END_TEST

START_TEST(test_no_dependency_no_flush)
{
    dirty_pair();
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    /* Without a dependency only A is written. */
    ck_assert_int_ge(memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(20), CS), 0);
    ck_assert_int_lt(memio_log_find(mem, 0, UNIT_OP_WRITE, OFF(10), CS), 0);
    ck_assert_uint_eq(count_all(UNIT_OP_FLUSH), 0);
    ck_assert(qs_cache_has_dirty(cb));
}
END_TEST

START_TEST(test_drop_does_not_write)
{
    void *d;
    ck_assert_int_eq(qs_cache_get(ca, OFF(5), false, &d), 0);
    memset(d, 0xdd, CS);
    qs_cache_mark_dirty(ca, d);
    qs_cache_put(ca, d);
    qs_cache_drop(ca, OFF(5));
    ck_assert(!qs_cache_has_dirty(ca));
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    for (int i = 6; i < 14; i++) {
        touch(ca, OFF(i));
    }
    ck_assert_uint_eq(count_all(UNIT_OP_WRITE), 0);
    ck_assert(unit_all(disk(OFF(5)), CS, 0x15));
    /* The next get reads the disk again. */
    ck_assert(unit_all(touch(ca, OFF(5)), CS, 0x15));
    ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(5)), 2);
    /* Dropping what is not cached is harmless. */
    qs_cache_drop(ca, OFF(30));
}
END_TEST

START_TEST(test_reset_forgets)
{
    for (int i = 0; i < 3; i++) {
        void *d;
        ck_assert_int_eq(qs_cache_get(ca, OFF(i), false, &d), 0);
        memset(d, 0xee, CS);
        qs_cache_mark_dirty(ca, d);
        qs_cache_put(ca, d);
    }
    ck_assert_int_eq(qs_cache_reset(ca), 0);
    ck_assert(!qs_cache_has_dirty(ca));
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    ck_assert_uint_eq(count_all(UNIT_OP_WRITE), 0);
    ck_assert(unit_all(touch(ca, OFF(1)), CS, 0x11));
    ck_assert_uint_eq(count_ops(UNIT_OP_READ, OFF(1)), 2);
}
END_TEST

START_TEST(test_write_error_keeps_dirty)
{
    void *d;
    ck_assert_int_eq(qs_cache_get(ca, OFF(7), false, &d), 0);
    memset(d, 0x99, CS);
    qs_cache_mark_dirty(ca, d);
    qs_cache_put(ca, d);
    qs_faultio_fail_nth(fio, QS_FAULT_WRITE, 1, EIO, false);
    ck_assert_int_eq(qs_cache_writeback(ca), -EIO);
    ck_assert(qs_cache_has_dirty(ca));
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), UNIT_IMAGE_NAME));
    ck_assert(unit_all(disk(OFF(7)), CS, 0x17));
    /* The next attempt succeeds and nothing was lost. */
    ck_assert_int_eq(qs_cache_writeback(ca), 0);
    ck_assert(!qs_cache_has_dirty(ca));
    ck_assert(unit_all(disk(OFF(7)), CS, 0x99));
}
END_TEST

START_TEST(test_refuses_metadata_overlap)
{
    /* Cluster 1 is the image's refcount table. */
    void *d;
    ck_assert_int_eq(qs_cache_get(ca, CS, true, &d), 0);
    qs_cache_put(ca, d);
    ck_assert_int_eq(qs_cache_writeback(ca), -EUCLEAN);
    ck_assert(img->corrupt);
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), UNIT_IMAGE_NAME));
    ck_assert_uint_eq(count_all(UNIT_OP_WRITE), 0);
    qs_cache_drop(ca, CS);
}
END_TEST

static Suite *cache_suite(void)
{
    Suite *s = suite_create("cache");
    TCase *tc = tcase_create("core");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_get_put_hit);
    tcase_add_test(tc, test_fresh);
    tcase_add_test(tc, test_clock_second_chance);
    tcase_add_test(tc, test_pinned_not_evicted);
    tcase_add_test(tc, test_dirty_written_on_eviction);
    tcase_add_test(tc, test_writeback_all_sorted);
    tcase_add_test(tc, test_drop_does_not_write);
    tcase_add_test(tc, test_reset_forgets);
    tcase_add_test(tc, test_write_error_keeps_dirty);
    tcase_add_test(tc, test_refuses_metadata_overlap);
    suite_add_tcase(s, tc);

    tc = tcase_create("dependency");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_dependency_order);
    tcase_add_test(tc, test_dependency_on_eviction);
    tcase_add_test(tc, test_dependency_lazy);
    tcase_add_test(tc, test_dependency_written_earlier);
    tcase_add_test(tc, test_mark_unflushed);
    tcase_add_test(tc, test_no_dependency_no_flush);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(cache_suite());
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
