/*
 * check_header.c - qcow2 header decode/encode (header.c) against byte
 * buffers built by hand from the spec's field table.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qs_int.h"

#define FN "hdr-test.qcow2"
#define EXT_A 0xAAAA0001u
#define EXT_B 0xBBBB0002u

/* ------------------------------------------------------------ builders */

static uint8_t *hbuf; /* one cluster, up to 64 KiB */
static char msg[1024];

static void setup(void)
{
    hbuf = calloc(1, 65536);
    ck_assert_ptr_nonnull(hbuf);
    msg[0] = '\0';
}

static void teardown(void)
{
    free(hbuf);
    hbuf = NULL;
}

/*
 * A valid header for a 1 MiB disk: refcount table at cluster 1, L1 at
 * cluster 3, file of 4 clusters.  v3 headers are 104 bytes long.
 */
static void build(uint8_t *b, uint32_t version, uint32_t cluster_bits)
{
    const uint64_t cs = UINT64_C(1) << cluster_bits;
    const uint64_t span = cs * (cs / 8);
    const uint32_t l1_size = (uint32_t)(((1u << 20) + span - 1) / span);

    memset(b, 0, (size_t)cs);
    qs_be32_store(b, QS_MAGIC);
    qs_be32_store(b + 4, version);
    qs_be32_store(b + 20, cluster_bits);
    qs_be64_store(b + 24, 1u << 20);
    qs_be32_store(b + 36, l1_size);
    qs_be64_store(b + 40, 3 * cs);
    qs_be64_store(b + 48, cs);
    qs_be32_store(b + 56, 1);
    if (version >= 3) {
        qs_be32_store(b + 96, 4);
        qs_be32_store(b + 100, 104);
    }
}

static uint64_t file_size_for(uint32_t cluster_bits)
{
    return UINT64_C(4) << cluster_bits;
}

/* Appends an extension at `off`; returns the offset after it. */
static uint32_t put_ext(uint8_t *b, uint32_t off, uint32_t type,
                        const void *data, uint32_t len)
{
    qs_be32_store(b + off, type);
    qs_be32_store(b + off + 4, len);
    if (len) {
        memcpy(b + off + 8, data, len);
    }
    return off + 8 + ((len + 7) & ~7u);
}

/* Offset of extension `type` in an encoded header, or -1. */
static long find_ext(const uint8_t *b, size_t len, uint32_t type,
                     uint32_t *elen)
{
    uint32_t off = qs_be32_load(b + 4) == 2 ? 72 : qs_be32_load(b + 100);
    while (off + 8 <= len) {
        const uint32_t t = qs_be32_load(b + off);
        const uint32_t l = qs_be32_load(b + off + 4);
        if (t == 0) {
            return -1;
        }
        if (t == type) {
            if (elen) {
                *elen = l;
            }
            return off;
        }
        off += 8 + ((l + 7) & ~7u);
    }
    return -1;
}

static int decode(uint32_t cluster_bits, struct qs_header *h)
{
    return qs_header_decode(hbuf, (size_t)1 << cluster_bits,
                            file_size_for(cluster_bits), FN, h, msg,
                            sizeof(msg));
}

/* ------------------------------------------------------------ valid */

START_TEST(test_v2_minimal)
{
    struct qs_header h;
    build(hbuf, 2, 16);
    ck_assert_int_eq(decode(16, &h), 0);
    ck_assert_uint_eq(h.version, 2);
    ck_assert_uint_eq(h.cluster_bits, 16);
    ck_assert_uint_eq(h.size, 1u << 20);
    ck_assert_uint_eq(h.l1_size, 1);
    ck_assert_uint_eq(h.l1_table_offset, 3 * 65536);
    ck_assert_uint_eq(h.refcount_table_offset, 65536);
    ck_assert_uint_eq(h.refcount_table_clusters, 1);
    ck_assert_uint_eq(h.refcount_order, 4); /* implied by v2 */
    ck_assert_uint_eq(h.header_length, 72);
    ck_assert_uint_eq(h.incompat, 0);
    ck_assert_uint_eq(h.n_exts, 0);
    ck_assert_str_eq(h.backing_file, "");

    /* A v2 header with nothing else encodes to the very same bytes. */
    uint8_t *out = malloc(65536);
    ck_assert_ptr_nonnull(out);
    memset(out, 0x5a, 65536);
    const int used = qs_header_encode(&h, out, 65536);
    ck_assert_int_eq(used, 72 + 8);
    ck_assert_mem_eq(out, hbuf, 65536);
    free(out);
    qs_header_free(&h);
}
END_TEST

START_TEST(test_v3_minimal)
{
    struct qs_header h, h2;
    build(hbuf, 3, 16);
    ck_assert_int_eq(decode(16, &h), 0);
    ck_assert_uint_eq(h.version, 3);
    ck_assert_uint_eq(h.header_length, 104);
    ck_assert_uint_eq(h.refcount_order, 4);
    ck_assert_uint_eq(h.compression_type, 0);
    ck_assert_uint_eq(h.unknown_fields_len, 0);
    ck_assert_uint_eq(h.n_exts, 0);
    ck_assert_uint_eq(h.n_features, 0);

    uint8_t *out = calloc(1, 65536);
    ck_assert_ptr_nonnull(out);
    const int used = qs_header_encode(&h, out, 65536);
    ck_assert_int_gt(used, 112);
    /* Same fields, header_length 112 with the compression_type byte. */
    ck_assert_mem_eq(out, hbuf, 100);
    ck_assert_uint_eq(qs_be32_load(out + 100), 112);
    ck_assert_uint_eq(out[104], 0);
    ck_assert_int_ge(find_ext(out, 65536, QS_EXT_FEATURE_TABLE, NULL), 112);

    ck_assert_int_eq(qs_header_decode(out, 65536, file_size_for(16), FN, &h2,
                                      msg, sizeof(msg)),
                     0);
    ck_assert_uint_eq(h2.size, h.size);
    ck_assert_uint_eq(h2.l1_table_offset, h.l1_table_offset);
    ck_assert_uint_eq(h2.header_length, 112);
    ck_assert_uint_ge(h2.n_features, 8);
    ck_assert_str_eq(qs_header_feature_name(&h2, 0, 0), "dirty bit");
    ck_assert_str_eq(qs_header_feature_name(&h2, 0, 1), "corrupt bit");
    ck_assert_str_eq(qs_header_feature_name(&h2, 1, 0), "lazy refcounts");
    ck_assert_ptr_null(qs_header_feature_name(&h2, 0, 40));
    free(out);
    qs_header_free(&h);
    qs_header_free(&h2);
}
END_TEST

START_TEST(test_v3_zstd_and_refcount_order)
{
    struct qs_header h;
    for (uint32_t order = 0; order <= 6; order++) {
        build(hbuf, 3, 16);
        qs_be64_store(hbuf + 72, QS_INCOMPAT_COMPRESSION);
        qs_be32_store(hbuf + 96, order);
        qs_be32_store(hbuf + 100, 112);
        hbuf[104] = 1;
        ck_assert_int_eq(decode(16, &h), 0);
        ck_assert_uint_eq(h.refcount_order, order);
        ck_assert_uint_eq(h.compression_type, 1);
        ck_assert_uint_eq(h.incompat, QS_INCOMPAT_COMPRESSION);
        qs_header_free(&h);
    }
}
END_TEST

START_TEST(test_v3_512_byte_cluster)
{
    struct qs_header h;
    build(hbuf, 3, 9);
    ck_assert_int_eq(decode(9, &h), 0);
    ck_assert_uint_eq(h.cluster_bits, 9);
    ck_assert_uint_eq(h.l1_size, 32);
    qs_header_free(&h);
}
END_TEST

/* ------------------------------------------------------------ failures */

struct bad_case {
    const char *what;
    void (*mutate)(uint8_t *b);
    int code;
    const char *field; /* must appear in the message */
    const char *also;  /* another required substring, or NULL */
};

static void m_magic(uint8_t *b)
{
    qs_be32_store(b, 0x514649fa);
}
static void m_version1(uint8_t *b)
{
    qs_be32_store(b + 4, 1);
}
static void m_version4(uint8_t *b)
{
    qs_be32_store(b + 4, 4);
}
static void m_cbits8(uint8_t *b)
{
    qs_be32_store(b + 20, 8);
}
static void m_cbits22(uint8_t *b)
{
    qs_be32_store(b + 20, 22);
}
static void m_hlen_odd(uint8_t *b)
{
    qs_be32_store(b + 100, 105);
}
static void m_hlen_small(uint8_t *b)
{
    qs_be32_store(b + 100, 96);
}
static void m_hlen_big(uint8_t *b)
{
    qs_be32_store(b + 100, 65536 + 8);
}
static void m_rorder7(uint8_t *b)
{
    qs_be32_store(b + 96, 7);
}
static void m_incompat_named(uint8_t *b)
{
    uint8_t table[2 * 48];
    memset(table, 0, sizeof(table));
    table[0] = 0; /* incompatible */
    table[1] = 0;
    memcpy(table + 2, "dirty bit", 9);
    table[48] = 0;
    table[49] = 5;
    memcpy(table + 50, "frobnicated widgets", 19);
    put_ext(b, 104, QS_EXT_FEATURE_TABLE, table, sizeof(table));
    qs_be64_store(b + 72, UINT64_C(1) << 5);
}
static void m_incompat_unnamed(uint8_t *b)
{
    qs_be64_store(b + 72, UINT64_C(1) << 33);
}
static void m_l1_past_eof(uint8_t *b)
{
    qs_be64_store(b + 40, 100 * 65536);
}
static void m_l1_unaligned(uint8_t *b)
{
    qs_be64_store(b + 40, 3 * 65536 + 512);
}
static void m_l1_small(uint8_t *b)
{
    qs_be64_store(b + 24, UINT64_C(1) << 40); /* needs 2048 entries */
}
static void m_rt_over_header(uint8_t *b)
{
    qs_be64_store(b + 48, 0);
}
static void m_rt_clusters0(uint8_t *b)
{
    qs_be32_store(b + 56, 0);
}
static void m_backing_outside(uint8_t *b)
{
    qs_be64_store(b + 8, 65536 - 4);
    qs_be32_store(b + 16, 10);
}
static void m_backing_too_long(uint8_t *b)
{
    qs_be64_store(b + 8, 4096);
    qs_be32_store(b + 16, 2000);
    memset(b + 4096, 'x', 2000);
}
static void m_backing_fmt_long(uint8_t *b)
{
    put_ext(b, 104, QS_EXT_BACKING_FMT, "qcow2qcow2qcow2q", 16);
}
static void m_ext_past_cluster(uint8_t *b)
{
    qs_be32_store(b + 104, EXT_A);
    qs_be32_store(b + 108, 70000);
}
static void m_ctype_no_bit(uint8_t *b)
{
    qs_be32_store(b + 100, 112);
    b[104] = 1;
}
static void m_bit_no_ctype(uint8_t *b)
{
    qs_be32_store(b + 100, 112);
    qs_be64_store(b + 72, QS_INCOMPAT_COMPRESSION);
}
static void m_crypt(uint8_t *b)
{
    qs_be32_store(b + 32, 1);
}

static const struct bad_case bad_cases[] = {
    {"bad magic", m_magic, -EINVAL, "magic", "0x514649fa"},
    {"version 1", m_version1, -ENOTSUP, "version", NULL},
    {"version 4", m_version4, -ENOTSUP, "version", NULL},
    {"cluster_bits 8", m_cbits8, -EUCLEAN, "cluster_bits", "8"},
    {"cluster_bits 22", m_cbits22, -EUCLEAN, "cluster_bits", "22"},
    {"header_length odd", m_hlen_odd, -EUCLEAN, "header_length", "105"},
    {"header_length small", m_hlen_small, -EUCLEAN, "header_length", "96"},
    {"header_length too big", m_hlen_big, -EUCLEAN, "header_length", "65544"},
    {"refcount_order 7", m_rorder7, -EUCLEAN, "refcount_order", "7"},
    {"unknown incompatible bit, named", m_incompat_named, -ENOTSUP,
     "incompatible_features", "frobnicated widgets"},
    {"unknown incompatible bit, unnamed", m_incompat_unnamed, -ENOTSUP,
     "incompatible_features", "33"},
    {"L1 past EOF", m_l1_past_eof, -EUCLEAN, "l1_table_offset", "0x640000"},
    {"L1 unaligned", m_l1_unaligned, -EUCLEAN, "l1_table_offset", "0x30200"},
    {"L1 too small", m_l1_small, -EUCLEAN, "l1_size", NULL},
    {"refcount table over header", m_rt_over_header, -EUCLEAN,
     "refcount_table_offset", NULL},
    {"refcount table empty", m_rt_clusters0, -EUCLEAN,
     "refcount_table_clusters", NULL},
    {"backing name outside cluster", m_backing_outside, -EUCLEAN,
     "backing_file_offset", "65532"},
    {"backing name too long", m_backing_too_long, -EUCLEAN, "backing_file_size",
     "2000"},
    {"backing format 16 bytes", m_backing_fmt_long, -EUCLEAN, "backing format",
     "16"},
    {"extension past cluster", m_ext_past_cluster, -EUCLEAN, "length", "70000"},
    {"compression_type without bit", m_ctype_no_bit, -EUCLEAN,
     "compression_type", "incompatible_features"},
    {"bit without compression_type", m_bit_no_ctype, -EUCLEAN,
     "compression_type", "incompatible_features"},
    {"crypt_method 1", m_crypt, -ENOTSUP, "crypt_method", NULL},
};
#define N_BAD (int)(sizeof(bad_cases) / sizeof(bad_cases[0]))

START_TEST(test_bad_header)
{
    const struct bad_case *c = &bad_cases[_i];
    struct qs_header h;
    build(hbuf, 3, 16);
    c->mutate(hbuf);
    const int ret = decode(16, &h);
    ck_assert_msg(ret == c->code, "%s: got %d, want %d (%s)", c->what, ret,
                  c->code, msg);
    ck_assert_msg(strstr(msg, FN) != NULL, "%s: no file name in '%s'", c->what,
                  msg);
    ck_assert_msg(strstr(msg, c->field) != NULL,
                  "%s: message '%s' does not name '%s'", c->what, msg,
                  c->field);
    if (c->also) {
        ck_assert_msg(strstr(msg, c->also) != NULL,
                      "%s: message '%s' lacks '%s'", c->what, msg, c->also);
    }
    /* Nothing left allocated on failure. */
    ck_assert_ptr_null(h.exts);
    ck_assert_ptr_null(h.features);
    ck_assert_ptr_null(h.unknown_fields);
}
END_TEST

START_TEST(test_too_short)
{
    struct qs_header h;
    build(hbuf, 3, 16);
    ck_assert_int_eq(qs_header_decode(hbuf, 50, 50, FN, &h, msg, sizeof(msg)),
                     -EINVAL);
    ck_assert_ptr_nonnull(strstr(msg, FN));
    /* A v3 header cut inside its v3 fields. */
    ck_assert_int_eq(qs_header_decode(hbuf, 80, 80, FN, &h, msg, sizeof(msg)),
                     -EUCLEAN);
    ck_assert_ptr_nonnull(strstr(msg, FN));
    /* No message buffer is fine too. */
    ck_assert_int_eq(qs_header_decode(hbuf, 50, 50, FN, &h, NULL, 0), -EINVAL);
}
END_TEST

/* ------------------------------------------------------------ round trip */

static const uint8_t unknown_fields[16] = {1, 2,  3,  4,  5,  6,  7,  8,
                                           9, 10, 11, 12, 13, 14, 15, 16};
static const uint8_t ext_b_data[13] = {0xde, 0xad, 0xbe, 0xef, 0, 1, 2,
                                       3,    4,    5,    6,    7, 8};

START_TEST(test_unknown_survive)
{
    struct qs_header h, h2;
    build(hbuf, 3, 16);
    qs_be32_store(hbuf + 100, 128);
    memcpy(hbuf + 112, unknown_fields, sizeof(unknown_fields));
    uint32_t off = 128;
    off = put_ext(hbuf, off, QS_EXT_BACKING_FMT, "qcow2", 5);
    off = put_ext(hbuf, off, EXT_A, "hello", 5);
    off = put_ext(hbuf, off, EXT_B, ext_b_data, sizeof(ext_b_data));
    off += 8; /* end */
    memcpy(hbuf + off, "base.qcow2", 10);
    qs_be64_store(hbuf + 8, off);
    qs_be32_store(hbuf + 16, 10);
    const uint64_t compat = UINT64_C(1) << 7; /* unknown compatible bit */
    qs_be64_store(hbuf + 80, compat);

    ck_assert_int_eq(decode(16, &h), 0);
    ck_assert_uint_eq(h.header_length, 128);
    ck_assert_uint_eq(h.unknown_fields_len, 16);
    ck_assert_mem_eq(h.unknown_fields, unknown_fields, 16);
    ck_assert_uint_eq(h.n_exts, 2);
    ck_assert_uint_eq(h.exts[0].type, EXT_A);
    ck_assert_uint_eq(h.exts[1].type, EXT_B);
    ck_assert_str_eq(h.backing_file, "base.qcow2");
    ck_assert_str_eq(h.backing_fmt, "qcow2");
    ck_assert_uint_eq(h.compat, compat);

    uint8_t *out = calloc(1, 65536);
    uint8_t *out2 = calloc(1, 65536);
    ck_assert_ptr_nonnull(out);
    ck_assert_ptr_nonnull(out2);
    ck_assert_int_gt(qs_header_encode(&h, out, 65536), 0);

    /* Unknown header fields: same bytes, same place. */
    ck_assert_uint_eq(qs_be32_load(out + 100), 128);
    ck_assert_mem_eq(out + 112, hbuf + 112, 16);
    ck_assert_uint_eq(qs_be64_load(out + 80), compat);
    /* Unknown extensions: same header, data and padding, same order. */
    uint32_t la, lb;
    const long a_in = find_ext(hbuf, 65536, EXT_A, &la);
    const long a_out = find_ext(out, 65536, EXT_A, &la);
    const long b_in = find_ext(hbuf, 65536, EXT_B, &lb);
    const long b_out = find_ext(out, 65536, EXT_B, &lb);
    ck_assert_int_ge(a_out, 128);
    ck_assert_int_gt(b_out, a_out);
    ck_assert_uint_eq(la, 5);
    ck_assert_uint_eq(lb, sizeof(ext_b_data));
    ck_assert_mem_eq(out + a_out, hbuf + a_in, 8 + 8);
    ck_assert_mem_eq(out + b_out, hbuf + b_in, 8 + 16);

    ck_assert_int_eq(qs_header_decode(out, 65536, file_size_for(16), FN, &h2,
                                      msg, sizeof(msg)),
                     0);
    ck_assert_str_eq(h2.backing_file, "base.qcow2");
    ck_assert_str_eq(h2.backing_fmt, "qcow2");
    ck_assert_uint_eq(h2.n_exts, 2);
    ck_assert_mem_eq(h2.exts[1].data, ext_b_data, sizeof(ext_b_data));
    /* A second round changes nothing. */
    ck_assert_int_gt(qs_header_encode(&h2, out2, 65536), 0);
    ck_assert_mem_eq(out, out2, 65536);

    free(out);
    free(out2);
    qs_header_free(&h);
    qs_header_free(&h2);
}
END_TEST

START_TEST(test_copy_is_deep)
{
    struct qs_header h, c;
    build(hbuf, 3, 16);
    qs_be32_store(hbuf + 100, 120);
    memcpy(hbuf + 112, unknown_fields, 8);
    put_ext(hbuf, 120, EXT_A, "hello", 5);
    ck_assert_int_eq(decode(16, &h), 0);
    ck_assert_int_eq(qs_header_copy(&c, &h), 0);
    ck_assert_ptr_ne(c.exts, h.exts);
    ck_assert_ptr_ne(c.unknown_fields, h.unknown_fields);
    qs_header_free(&h);
    ck_assert_uint_eq(c.n_exts, 1);
    ck_assert_mem_eq(c.exts[0].data, "hello", 5);
    ck_assert_mem_eq(c.unknown_fields, unknown_fields, 8);
    qs_header_free(&c);
}
END_TEST

START_TEST(test_feature_table_omitted_when_full)
{
    struct qs_header h, h2;
    uint8_t out[512];

    /* 512-byte cluster with a backing name: no room for the table. */
    build(hbuf, 3, 9);
    ck_assert_int_eq(decode(9, &h), 0);
    snprintf(h.backing_file, sizeof(h.backing_file), "%s", "base.qcow2");
    const int used = qs_header_encode(&h, out, sizeof(out));
    ck_assert_int_gt(used, 0);
    ck_assert_int_le(used, 512);
    ck_assert_int_eq(find_ext(out, sizeof(out), QS_EXT_FEATURE_TABLE, NULL),
                     -1);
    ck_assert_int_eq(qs_header_decode(out, sizeof(out), file_size_for(9), FN,
                                      &h2, msg, sizeof(msg)),
                     0);
    ck_assert_str_eq(h2.backing_file, "base.qcow2");
    ck_assert_uint_eq(h2.n_features, 0);
    qs_header_free(&h2);

    /* Without it, the table is written when it fits. */
    h.backing_file[0] = '\0';
    ck_assert_int_gt(qs_header_encode(&h, out, sizeof(out)), 0);
    uint32_t tl = 0;
    ck_assert_int_gt(find_ext(out, sizeof(out), QS_EXT_FEATURE_TABLE, &tl), 0);
    ck_assert_uint_eq(tl % 48, 0);

    /* A name that cannot fit at all is refused. */
    memset(h.backing_file, 'n', 500);
    h.backing_file[500] = '\0';
    ck_assert_int_eq(qs_header_encode(&h, out, sizeof(out)), -ENOSPC);
    qs_header_free(&h);
}
END_TEST

START_TEST(test_backing_name_read)
{
    struct qs_header h;
    build(hbuf, 2, 16);
    memcpy(hbuf + 1000, "/images/base.raw", 16);
    qs_be64_store(hbuf + 8, 1000);
    qs_be32_store(hbuf + 16, 16);
    ck_assert_int_eq(decode(16, &h), 0);
    ck_assert_str_eq(h.backing_file, "/images/base.raw");
    qs_header_free(&h);

    /* An embedded NUL is refused. */
    hbuf[1005] = '\0';
    ck_assert_int_eq(decode(16, &h), -EUCLEAN);
    ck_assert_ptr_nonnull(strstr(msg, FN));
}
END_TEST

static Suite *header_suite(void)
{
    Suite *s = suite_create("header");
    TCase *tc = tcase_create("decode");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_v2_minimal);
    tcase_add_test(tc, test_v3_minimal);
    tcase_add_test(tc, test_v3_zstd_and_refcount_order);
    tcase_add_test(tc, test_v3_512_byte_cluster);
    tcase_add_loop_test(tc, test_bad_header, 0, N_BAD);
    tcase_add_test(tc, test_too_short);
    tcase_add_test(tc, test_backing_name_read);
    suite_add_tcase(s, tc);

    tc = tcase_create("encode");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_unknown_survive);
    tcase_add_test(tc, test_copy_is_deep);
    tcase_add_test(tc, test_feature_table_omitted_when_full);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(header_suite());
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
