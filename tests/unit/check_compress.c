/*
 * check_compress.c - cluster codecs (compress.c): zlib raw deflate with a
 * 4 KiB window as QEMU writes it, and zstd.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "qs_int.h"

#define CL 65536

static uint8_t *src, *cbuf, *out;

static void setup(void)
{
    src = malloc(CL);
    cbuf = malloc(2 * CL);
    out = malloc(CL);
    ck_assert_ptr_nonnull(src);
    ck_assert_ptr_nonnull(cbuf);
    ck_assert_ptr_nonnull(out);
}

static void teardown(void)
{
    free(src);
    free(cbuf);
    free(out);
}

static uint64_t rnd(uint64_t *s)
{
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Text-like data: compresses well. */
static void fill_text(uint8_t *b, size_t n)
{
    static const char words[] = "qcow2 cluster refcount table snapshot ";
    for (size_t i = 0; i < n; i++) {
        b[i] = (uint8_t)words[(i * 7 + i / 97) % (sizeof(words) - 1)];
    }
}

static void fill_random(uint8_t *b, size_t n, uint64_t seed)
{
    uint64_t s = seed | 1;
    for (size_t i = 0; i < n; i++) {
        b[i] = (uint8_t)rnd(&s);
    }
}

static const int types[] = {QSNAP_COMPRESSION_ZLIB, QSNAP_COMPRESSION_ZSTD};

START_TEST(test_round_trip)
{
    const int type = types[_i];
    static const size_t sizes[] = {512, 4096, 65536};
    for (size_t k = 0; k < 3; k++) {
        const size_t n = sizes[k];
        fill_text(src, n);
        const ssize_t c = qs_compress(type, cbuf, n - 1, src, n);
        ck_assert_int_gt(c, 0);
        ck_assert_int_lt(c, (ssize_t)n / 2);
        memset(out, 0xee, n);
        ck_assert_int_eq(qs_decompress(type, out, n, cbuf, (size_t)c), 0);
        ck_assert_mem_eq(out, src, n);
    }
    /* All zeros: the common case for a freshly formatted disk. */
    memset(src, 0, CL);
    const ssize_t c = qs_compress(type, cbuf, CL - 1, src, CL);
    ck_assert_int_gt(c, 0);
    ck_assert_int_lt(c, 1024);
    memset(out, 0xee, CL);
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, (size_t)c), 0);
    ck_assert(out[0] == 0 && out[CL - 1] == 0);
    ck_assert_mem_eq(out, src, CL);
}
END_TEST

START_TEST(test_zlib_is_raw_deflate)
{
    fill_text(src, CL);
    const ssize_t c =
        qs_compress(QSNAP_COMPRESSION_ZLIB, cbuf, CL - 1, src, CL);
    ck_assert_int_gt(c, 2);
    /* A zlib header is CM=8 in the low nibble and a multiple of 31. */
    const unsigned hdr = (unsigned)cbuf[0] << 8 | cbuf[1];
    ck_assert_msg(!((cbuf[0] & 0x0f) == 8 && hdr % 31 == 0),
                  "stream starts with a zlib header (%02x %02x)", cbuf[0],
                  cbuf[1]);

    /* zlib with a header refuses it; raw inflate with a 4 KiB window
     * (what QEMU uses) decodes it. */
    z_stream zs;
    memset(&zs, 0, sizeof(zs));
    ck_assert_int_eq(inflateInit(&zs), Z_OK);
    zs.next_in = cbuf;
    zs.avail_in = (uInt)c;
    zs.next_out = out;
    zs.avail_out = CL;
    ck_assert_int_eq(inflate(&zs, Z_FINISH), Z_DATA_ERROR);
    inflateEnd(&zs);

    memset(&zs, 0, sizeof(zs));
    ck_assert_int_eq(inflateInit2(&zs, -12), Z_OK);
    zs.next_in = cbuf;
    zs.avail_in = (uInt)c;
    zs.next_out = out;
    zs.avail_out = CL;
    ck_assert_int_eq(inflate(&zs, Z_FINISH), Z_STREAM_END);
    ck_assert_uint_eq(zs.total_out, CL);
    inflateEnd(&zs);
    ck_assert_mem_eq(out, src, CL);
}
END_TEST

START_TEST(test_zlib_window_4k)
{
    /* 16 KiB of noise repeated: a 32 KiB window would reach back 16 KiB,
     * which a 4 KiB-window decoder cannot follow. */
    fill_random(src, 16384, 7);
    for (size_t i = 16384; i < CL; i++) {
        src[i] = src[i % 16384];
    }
    ssize_t c = qs_compress(QSNAP_COMPRESSION_ZLIB, cbuf, 2 * CL, src, CL);
    ck_assert_int_gt(c, 0);
    /* Inflate in small steps so that only the 4 KiB window holds history
     * (with one big output buffer zlib would look back into it). */
    z_stream zs;
    memset(&zs, 0, sizeof(zs));
    ck_assert_int_eq(inflateInit2(&zs, -12), Z_OK);
    zs.next_in = cbuf;
    zs.avail_in = (uInt)c;
    int r = Z_OK;
    size_t pos = 0;
    uint8_t step[512];
    while (r == Z_OK && pos < CL) {
        zs.next_out = step;
        zs.avail_out = sizeof(step);
        r = inflate(&zs, Z_NO_FLUSH);
        const size_t got = sizeof(step) - zs.avail_out;
        ck_assert_uint_le(pos + got, CL);
        memcpy(out + pos, step, got);
        pos += got;
    }
    inflateEnd(&zs);
    ck_assert_msg(r == Z_STREAM_END, "inflate with a 4 KiB window: %d", r);
    ck_assert_uint_eq(pos, CL);
    ck_assert_mem_eq(out, src, CL);
}
END_TEST

START_TEST(test_zstd_is_a_frame)
{
    fill_text(src, CL);
    const ssize_t c =
        qs_compress(QSNAP_COMPRESSION_ZSTD, cbuf, CL - 1, src, CL);
    ck_assert_int_gt(c, 4);
    ck_assert_uint_eq(cbuf[0] | cbuf[1] << 8 | cbuf[2] << 16 |
                          (uint32_t)cbuf[3] << 24,
                      ZSTD_MAGICNUMBER);
    /* The library's output is an ordinary zstd frame. */
    ck_assert_uint_eq(ZSTD_decompress(out, CL, cbuf, (size_t)c), CL);
    ck_assert_mem_eq(out, src, CL);
}
END_TEST

START_TEST(test_incompressible)
{
    const int type = types[_i];
    fill_random(src, CL, 99);
    ck_assert_int_eq(qs_compress(type, cbuf, CL - 1, src, CL), -ENOSPC);
    /* A smaller budget is refused the same way. */
    fill_text(src, CL);
    ck_assert_int_eq(qs_compress(type, cbuf, 8, src, CL), -ENOSPC);
}
END_TEST

START_TEST(test_truncated)
{
    const int type = types[_i];
    fill_random(src, CL, 5);
    memset(src + CL / 2, 'a', CL / 2); /* compressible half */
    const ssize_t c = qs_compress(type, cbuf, CL - 1, src, CL);
    ck_assert_int_gt(c, 100);
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, (size_t)c / 2), -EIO);
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, (size_t)c - 1), -EIO);
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, 0), -EIO);
    /* The whole stream is fine. */
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, (size_t)c), 0);
    ck_assert_mem_eq(out, src, CL);
}
END_TEST

START_TEST(test_garbage)
{
    const int type = types[_i];
    fill_random(cbuf, 4096, 11);
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, 4096), -EIO);
}
END_TEST

START_TEST(test_trailing_ignored)
{
    const int type = types[_i];
    fill_text(src, CL);
    const ssize_t c = qs_compress(type, cbuf, CL - 1, src, CL);
    ck_assert_int_gt(c, 0);
    /* The rest of the last sector, or the next cluster's data. */
    fill_random(cbuf + c, 1000, 3);
    memset(out, 0, CL);
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, (size_t)c + 1000), 0);
    ck_assert_mem_eq(out, src, CL);
    memset(cbuf + c, 0, 511);
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, (size_t)c + 511), 0);
    ck_assert_mem_eq(out, src, CL);
}
END_TEST

START_TEST(test_short_output)
{
    /* A stream for 4 KiB cannot fill a 64 KiB cluster. */
    const int type = types[_i];
    fill_text(src, 4096);
    const ssize_t c = qs_compress(type, cbuf, 4095, src, 4096);
    ck_assert_int_gt(c, 0);
    ck_assert_int_eq(qs_decompress(type, out, CL, cbuf, (size_t)c), -EIO);
}
END_TEST

START_TEST(test_unknown_type)
{
    fill_text(src, 512);
    ck_assert_int_eq(qs_compress(7, cbuf, 511, src, 512), -ENOTSUP);
    ck_assert_int_eq(qs_decompress(7, out, 512, cbuf, 100), -ENOTSUP);
}
END_TEST

static Suite *compress_suite(void)
{
    Suite *s = suite_create("compress");
    TCase *tc = tcase_create("codecs");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, test_round_trip, 0, 2);
    tcase_add_test(tc, test_zlib_is_raw_deflate);
    tcase_add_test(tc, test_zlib_window_4k);
    tcase_add_test(tc, test_zstd_is_a_frame);
    tcase_add_loop_test(tc, test_incompressible, 0, 2);
    tcase_add_loop_test(tc, test_truncated, 0, 2);
    tcase_add_loop_test(tc, test_garbage, 0, 2);
    tcase_add_loop_test(tc, test_trailing_ignored, 0, 2);
    tcase_add_loop_test(tc, test_short_output, 0, 2);
    tcase_add_test(tc, test_unknown_type);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(compress_suite());
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
