/*
 * check_endian.c - big-endian loads and stores (qs_endian.h).
 */
#include "config.h"

#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qs_endian.h"

START_TEST(test_load_known_bytes)
{
    static const uint8_t b[8] = {0x01, 0x23, 0x45, 0x67,
                                 0x89, 0xab, 0xcd, 0xef};
    ck_assert_uint_eq(qs_be16_load(b), 0x0123);
    ck_assert_uint_eq(qs_be32_load(b), 0x01234567u);
    ck_assert_uint_eq(qs_be64_load(b), UINT64_C(0x0123456789abcdef));
    /* Unaligned addresses work too. */
    ck_assert_uint_eq(qs_be16_load(b + 1), 0x2345);
    ck_assert_uint_eq(qs_be32_load(b + 3), 0x6789abcdu);
}
END_TEST

START_TEST(test_load_high_bits)
{
    /* No sign extension from the top byte. */
    static const uint8_t ff[8] = {0xff, 0xfe, 0xfd, 0xfc,
                                  0xfb, 0xfa, 0xf9, 0xf8};
    ck_assert_uint_eq(qs_be16_load(ff), 0xfffe);
    ck_assert_uint_eq(qs_be32_load(ff), 0xfffefdfcu);
    ck_assert_uint_eq(qs_be64_load(ff), UINT64_C(0xfffefdfcfbfaf9f8));
    static const uint8_t top[8] = {0x80, 0, 0, 0, 0, 0, 0, 0};
    ck_assert_uint_eq(qs_be16_load(top), 0x8000);
    ck_assert_uint_eq(qs_be32_load(top), 0x80000000u);
    ck_assert_uint_eq(qs_be64_load(top), UINT64_C(1) << 63);
}
END_TEST

START_TEST(test_store_known_bytes)
{
    uint8_t b[10];

    memset(b, 0xaa, sizeof(b));
    qs_be16_store(b + 1, 0xbeef);
    static const uint8_t e16[10] = {0xaa, 0xbe, 0xef, 0xaa, 0xaa,
                                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa};
    ck_assert_mem_eq(b, e16, sizeof(b));

    memset(b, 0xaa, sizeof(b));
    qs_be32_store(b + 1, 0x514649fbu); /* the qcow2 magic */
    static const uint8_t e32[10] = {0xaa, 'Q',  'F',  'I',  0xfb,
                                    0xaa, 0xaa, 0xaa, 0xaa, 0xaa};
    ck_assert_mem_eq(b, e32, sizeof(b));

    memset(b, 0xaa, sizeof(b));
    qs_be64_store(b + 1, UINT64_C(0x8000000000010200));
    static const uint8_t e64[10] = {0xaa, 0x80, 0x00, 0x00, 0x00,
                                    0x00, 0x01, 0x02, 0x00, 0xaa};
    ck_assert_mem_eq(b, e64, sizeof(b));
}
END_TEST

START_TEST(test_round_trip)
{
    uint64_t x = UINT64_C(0x123456789abcdef1);
    uint8_t b[8];
    for (int i = 0; i < 10000; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        qs_be16_store(b, (uint16_t)x);
        ck_assert_uint_eq(qs_be16_load(b), (uint16_t)x);
        qs_be32_store(b, (uint32_t)x);
        ck_assert_uint_eq(qs_be32_load(b), (uint32_t)x);
        qs_be64_store(b, x);
        ck_assert_uint_eq(qs_be64_load(b), x);
        /* Most significant byte first. */
        ck_assert_uint_eq(b[0], (uint8_t)(x >> 56));
        ck_assert_uint_eq(b[7], (uint8_t)x);
    }
}
END_TEST

START_TEST(test_edges)
{
    static const uint64_t v[] = {
        0, 1, 0xff, 0x100, UINT32_MAX, UINT64_C(1) << 32, UINT64_MAX};
    uint8_t b[8];
    for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
        qs_be64_store(b, v[i]);
        ck_assert_uint_eq(qs_be64_load(b), v[i]);
        qs_be32_store(b, (uint32_t)v[i]);
        ck_assert_uint_eq(qs_be32_load(b), (uint32_t)v[i]);
        qs_be16_store(b, (uint16_t)v[i]);
        ck_assert_uint_eq(qs_be16_load(b), (uint16_t)v[i]);
    }
    qs_be64_store(b, UINT64_MAX);
    static const uint8_t all[8] = {0xff, 0xff, 0xff, 0xff,
                                   0xff, 0xff, 0xff, 0xff};
    ck_assert_mem_eq(b, all, 8);
}
END_TEST

static Suite *endian_suite(void)
{
    Suite *s = suite_create("endian");
    TCase *tc = tcase_create("core");
    tcase_add_test(tc, test_load_known_bytes);
    tcase_add_test(tc, test_load_high_bits);
    tcase_add_test(tc, test_store_known_bytes);
    tcase_add_test(tc, test_round_trip);
    tcase_add_test(tc, test_edges);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(endian_suite());
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
