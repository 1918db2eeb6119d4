/*
 * mkcorrupt.c - write damaged copies of a pristine qcow2 image.
 *
 *   mkcorrupt CASE IN OUT    copy IN to OUT with the damage CASE names
 *   mkcorrupt --list         print "CASE EXPECT DESCRIPTION" lines
 *
 * It parses IN itself (big-endian header, L1, L2, refcount table) to find
 * what to patch, and does not use libqsnap.  EXPECT tells the test what a
 * correct reader does with the result:
 *
 *   fail     opening or reading it, or checking it, fails
 *   ok       it opens, reads and checks clean
 *   ok-rw    it opens read-write (repairing what the header asks for) and
 *            then reads and checks clean
 *   fail-rw  it opens read-only, but a read-write open is refused
 *
 * Exit status: 0 written, 1 error, 2 usage, 3 the case does not apply to
 * this input (e.g. a v3 field in a v2 image, or no compressed cluster).
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NOT_APPLICABLE 3

#define QCOW_MAGIC 0x514649FBu
#define OFFSET_MASK 0x00FFFFFFFFFFFE00ull
#define FLAG_COPIED (1ull << 63)
#define FLAG_COMPRESSED (1ull << 62)

#define INCOMPAT_DIRTY (1ull << 0)
#define INCOMPAT_CORRUPT (1ull << 1)
#define INCOMPAT_DATA_FILE (1ull << 2)
#define INCOMPAT_COMPRESSION (1ull << 3)
#define INCOMPAT_EXTL2 (1ull << 4)

#define EXT_END 0x00000000u
#define EXT_BACKING_FMT 0xE2792ACAu

/* Header field offsets (docs/interop/qcow2.txt, "Header"). */
enum {
    H_MAGIC = 0,
    H_VERSION = 4,
    H_BACKING_OFF = 8,
    H_BACKING_SIZE = 16,
    H_CLUSTER_BITS = 20,
    H_SIZE = 24,
    H_CRYPT = 32,
    H_L1_SIZE = 36,
    H_L1_OFF = 40,
    H_RT_OFF = 48,
    H_RT_CLUSTERS = 56,
    H_NB_SNAP = 60,
    H_SNAP_OFF = 64,
    H_INCOMPAT = 72,
    H_COMPAT = 80,
    H_AUTOCLEAR = 88,
    H_REFCOUNT_ORDER = 96,
    H_HEADER_LENGTH = 100,
    H_COMPRESSION_TYPE = 104,
};

struct image {
    uint8_t *buf;
    size_t len;
    const char *in_path;
    const char *out_path;
    /* decoded header */
    uint32_t version;
    uint32_t cluster_bits;
    uint64_t cluster;
    uint64_t size;
    uint32_t l1_size;
    uint64_t l1_off;
    uint64_t rt_off;
    uint32_t rt_clusters;
    uint32_t nb_snap;
    uint64_t snap_off;
    uint64_t incompat;
    uint32_t header_length;
};

static uint64_t ld(const struct image *im, uint64_t pos, unsigned width)
{
    uint64_t v = 0;
    unsigned i;

    for (i = 0; i < width; i++) {
        v = (v << 8) | (pos + i < im->len ? im->buf[pos + i] : 0);
    }
    return v;
}

static void st(struct image *im, uint64_t pos, unsigned width, uint64_t v)
{
    unsigned i;

    for (i = 0; i < width; i++) {
        const uint64_t p = pos + width - 1 - i;

        if (p < im->len) {
            im->buf[p] = (uint8_t)(v & 0xff);
        }
        v >>= 8;
    }
}

static uint64_t be64(const struct image *im, uint64_t pos)
{
    return ld(im, pos, 8);
}

static uint32_t be32(const struct image *im, uint64_t pos)
{
    return (uint32_t)ld(im, pos, 4);
}

static void put64(struct image *im, uint64_t pos, uint64_t v)
{
    st(im, pos, 8, v);
}

static void put32(struct image *im, uint64_t pos, uint32_t v)
{
    st(im, pos, 4, v);
}

static uint64_t round_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

/* A host offset well past the end of the file, cluster-aligned. */
static uint64_t past_eof(const struct image *im)
{
    return round_up(im->len, im->cluster) + 1024 * im->cluster;
}

static bool is_v3(const struct image *im)
{
    return im->version >= 3;
}

static uint64_t l2_entry_size(const struct image *im)
{
    return (im->incompat & INCOMPAT_EXTL2) ? 16 : 8;
}

/*
 * Finds the file position of the first L2 entry of the active L1 that is
 * a standard allocated cluster (compressed == false) or a compressed
 * cluster (compressed == true).  Returns 0 if there is none.
 */
static uint64_t find_l2_entry(const struct image *im, bool compressed)
{
    const uint64_t esz = l2_entry_size(im);
    const uint64_t n_entries = im->cluster / esz;
    uint64_t i;
    uint64_t j;

    for (i = 0; i < im->l1_size; i++) {
        const uint64_t l1_pos = im->l1_off + 8 * i;
        uint64_t l2_off;

        if (l1_pos + 8 > im->len) {
            break;
        }
        l2_off = be64(im, l1_pos) & OFFSET_MASK;
        if (l2_off == 0 || l2_off + im->cluster > im->len) {
            continue;
        }
        for (j = 0; j < n_entries; j++) {
            const uint64_t pos = l2_off + j * esz;
            const uint64_t e = be64(im, pos);

            if (compressed && (e & FLAG_COMPRESSED)) {
                return pos;
            }
            if (!compressed && !(e & FLAG_COMPRESSED) &&
                (e & OFFSET_MASK) != 0) {
                return pos;
            }
        }
    }
    return 0;
}

/* File position of the index'th non-zero active L1 entry, or 0. */
static uint64_t find_l1_entry(const struct image *im, unsigned index)
{
    uint64_t i;

    for (i = 0; i < im->l1_size; i++) {
        const uint64_t pos = im->l1_off + 8 * i;

        if (pos + 8 > im->len) {
            break;
        }
        if ((be64(im, pos) & OFFSET_MASK) != 0 && index-- == 0) {
            return pos;
        }
    }
    return 0;
}

/* Offset in the file of the first refcount block, or 0. */
static uint64_t first_refblock(const struct image *im)
{
    return be64(im, im->rt_off) & OFFSET_MASK;
}

/*
 * Rewrites the header extension area: an optional backing format
 * extension, the end marker, then the backing file name right after it.
 */
static int set_backing(struct image *im, const char *name, const char *fmt,
                       uint32_t fmt_len)
{
    const uint64_t start = is_v3(im) ? im->header_length : 72;
    const size_t name_len = strlen(name);
    uint64_t pos = start;

    if (start + 16 + round_up(fmt_len, 8) + 8 + name_len > im->cluster) {
        return NOT_APPLICABLE;
    }
    memset(im->buf + start, 0, (size_t)(im->cluster - start));
    if (fmt) {
        put32(im, pos, EXT_BACKING_FMT);
        put32(im, pos + 4, fmt_len);
        memcpy(im->buf + pos + 8, fmt, fmt_len);
        pos += 8 + round_up(fmt_len, 8);
    }
    put32(im, pos, EXT_END);
    put32(im, pos + 4, 0);
    pos += 8;
    memcpy(im->buf + pos, name, name_len);
    put64(im, H_BACKING_OFF, pos);
    put32(im, H_BACKING_SIZE, (uint32_t)name_len);
    return 0;
}

static const char *base_name(const char *path)
{
    const char *s = strrchr(path, '/');

    return s ? s + 1 : path;
}

/* ------------------------------------------------------------------ */
/* The cases                                                          */
/* ------------------------------------------------------------------ */

typedef int (*case_fn)(struct image *im);

static int c_bad_magic(struct image *im)
{
    put32(im, H_MAGIC, 0x584649FBu);
    return 0;
}

static int c_version_1(struct image *im)
{
    put32(im, H_VERSION, 1);
    return 0;
}

static int c_version_4(struct image *im)
{
    put32(im, H_VERSION, 4);
    return 0;
}

static int c_cluster_bits_8(struct image *im)
{
    put32(im, H_CLUSTER_BITS, 8);
    return 0;
}

static int c_cluster_bits_22(struct image *im)
{
    put32(im, H_CLUSTER_BITS, 22);
    return 0;
}

static int c_cluster_bits_63(struct image *im)
{
    put32(im, H_CLUSTER_BITS, 63);
    return 0;
}

static int c_size_2_63(struct image *im)
{
    put64(im, H_SIZE, 1ull << 63);
    return 0;
}

static int c_size_max(struct image *im)
{
    put64(im, H_SIZE, UINT64_MAX);
    return 0;
}

static int c_crypt_aes(struct image *im)
{
    put32(im, H_CRYPT, 1);
    return 0;
}

static int c_crypt_luks(struct image *im)
{
    put32(im, H_CRYPT, 2);
    return 0;
}

static int c_crypt_unknown(struct image *im)
{
    put32(im, H_CRYPT, 3);
    return 0;
}

static int c_l1_size_huge(struct image *im)
{
    put32(im, H_L1_SIZE, 0x10000000u);
    return 0;
}

static int c_l1_size_too_small(struct image *im)
{
    const uint64_t per_l1 = im->cluster * (im->cluster / l2_entry_size(im));
    const uint64_t need = (im->size + per_l1 - 1) / per_l1;

    if (need == 0) {
        return NOT_APPLICABLE;
    }
    put32(im, H_L1_SIZE, (uint32_t)(need - 1));
    return 0;
}

static int c_l1_unaligned(struct image *im)
{
    put64(im, H_L1_OFF, im->l1_off + 8);
    return 0;
}

static int c_l1_past_eof(struct image *im)
{
    put64(im, H_L1_OFF, past_eof(im));
    return 0;
}

static int c_l1_at_header(struct image *im)
{
    put64(im, H_L1_OFF, 0);
    return 0;
}

static int c_l1_at_refcount_table(struct image *im)
{
    put64(im, H_L1_OFF, im->rt_off);
    return 0;
}

static int c_rt_unaligned(struct image *im)
{
    put64(im, H_RT_OFF, im->rt_off + 8);
    return 0;
}

static int c_rt_past_eof(struct image *im)
{
    put64(im, H_RT_OFF, past_eof(im));
    return 0;
}

static int c_rt_at_header(struct image *im)
{
    put64(im, H_RT_OFF, 0);
    return 0;
}

static int c_rt_at_l1(struct image *im)
{
    put64(im, H_RT_OFF, im->l1_off);
    return 0;
}

static int c_rt_at_l2(struct image *im)
{
    const uint64_t pos = find_l1_entry(im, 0);

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, H_RT_OFF, be64(im, pos) & OFFSET_MASK);
    return 0;
}

static int c_rt_clusters_huge(struct image *im)
{
    put32(im, H_RT_CLUSTERS, 0x00FFFFFFu);
    return 0;
}

static int c_rt_clusters_zero(struct image *im)
{
    put32(im, H_RT_CLUSTERS, 0);
    return 0;
}

static int c_refcount_order_7(struct image *im)
{
    if (!is_v3(im)) {
        return NOT_APPLICABLE;
    }
    put32(im, H_REFCOUNT_ORDER, 7);
    return 0;
}

static int c_header_length_unaligned(struct image *im)
{
    if (!is_v3(im)) {
        return NOT_APPLICABLE;
    }
    put32(im, H_HEADER_LENGTH, im->header_length + 1);
    return 0;
}

static int c_header_length_short(struct image *im)
{
    if (!is_v3(im)) {
        return NOT_APPLICABLE;
    }
    put32(im, H_HEADER_LENGTH, 96);
    return 0;
}

static int c_header_length_huge(struct image *im)
{
    if (!is_v3(im)) {
        return NOT_APPLICABLE;
    }
    put32(im, H_HEADER_LENGTH, (uint32_t)im->cluster + 8);
    return 0;
}

static int set_incompat(struct image *im, uint64_t bits)
{
    if (!is_v3(im)) {
        return NOT_APPLICABLE;
    }
    put64(im, H_INCOMPAT, im->incompat | bits);
    return 0;
}

static int c_incompat_unknown(struct image *im)
{
    return set_incompat(im, 1ull << 7);
}

static int c_incompat_high(struct image *im)
{
    return set_incompat(im, 1ull << 63);
}

static int c_incompat_data_file(struct image *im)
{
    return set_incompat(im, INCOMPAT_DATA_FILE);
}

static int c_corrupt_bit(struct image *im)
{
    return set_incompat(im, INCOMPAT_CORRUPT);
}

static int c_dirty_bit(struct image *im)
{
    return set_incompat(im, INCOMPAT_DIRTY);
}

static int c_extl2_small_cluster(struct image *im)
{
    if (im->cluster_bits >= 14 || (im->incompat & INCOMPAT_EXTL2)) {
        return NOT_APPLICABLE;
    }
    return set_incompat(im, INCOMPAT_EXTL2);
}

static int c_compression_type_no_bit(struct image *im)
{
    if (!is_v3(im) || im->header_length <= H_COMPRESSION_TYPE ||
        (im->incompat & INCOMPAT_COMPRESSION)) {
        return NOT_APPLICABLE;
    }
    im->buf[H_COMPRESSION_TYPE] = 1;
    return 0;
}

static int c_compression_type_unknown(struct image *im)
{
    if (!is_v3(im) || im->header_length <= H_COMPRESSION_TYPE) {
        return NOT_APPLICABLE;
    }
    im->buf[H_COMPRESSION_TYPE] = 2;
    return set_incompat(im, INCOMPAT_COMPRESSION);
}

static int c_compression_bit_zlib(struct image *im)
{
    if (!is_v3(im) || im->header_length <= H_COMPRESSION_TYPE) {
        return NOT_APPLICABLE;
    }
    im->buf[H_COMPRESSION_TYPE] = 0;
    return set_incompat(im, INCOMPAT_COMPRESSION);
}

static int c_compat_unknown(struct image *im)
{
    if (!is_v3(im)) {
        return NOT_APPLICABLE;
    }
    put64(im, H_COMPAT, be64(im, H_COMPAT) | (1ull << 9));
    return 0;
}

static int c_autoclear_unknown(struct image *im)
{
    if (!is_v3(im)) {
        return NOT_APPLICABLE;
    }
    put64(im, H_AUTOCLEAR, be64(im, H_AUTOCLEAR) | (1ull << 5));
    return 0;
}

static int c_backing_offset_outside(struct image *im)
{
    put64(im, H_BACKING_OFF, im->cluster + 16);
    put32(im, H_BACKING_SIZE, 8);
    return 0;
}

static int c_backing_name_crosses(struct image *im)
{
    put64(im, H_BACKING_OFF, im->cluster - 4);
    put32(im, H_BACKING_SIZE, 16);
    return 0;
}

static int c_backing_size_2000(struct image *im)
{
    if (im->cluster < 4096) {
        return NOT_APPLICABLE;
    }
    put64(im, H_BACKING_OFF, im->cluster - 2048);
    put32(im, H_BACKING_SIZE, 2000);
    memset(im->buf + im->cluster - 2048, 'a', 2000);
    return 0;
}

static int c_backing_missing(struct image *im)
{
    return set_backing(im, "missing-backing-file.qcow2", NULL, 0);
}

static int c_backing_loop(struct image *im)
{
    return set_backing(im, base_name(im->out_path), "qcow2", 5);
}

static int c_ext_backing_fmt_20(struct image *im)
{
    char path[PATH_MAX];

    if (!realpath(im->in_path, path)) {
        fprintf(stderr, "mkcorrupt: %s: %s\n", im->in_path, strerror(errno));
        return -1;
    }
    return set_backing(im, path, "qcow2-format-name-20", 20);
}

static uint64_t ext_start(const struct image *im)
{
    return is_v3(im) ? im->header_length : 72;
}

static int c_ext_length_past_cluster(struct image *im)
{
    const uint64_t pos = ext_start(im);

    if (be32(im, pos) == EXT_END) {
        put32(im, pos, 0x12345678u);
    }
    put32(im, pos + 4, (uint32_t)im->cluster);
    return 0;
}

static int c_ext_length_huge(struct image *im)
{
    const uint64_t pos = ext_start(im);

    if (be32(im, pos) == EXT_END) {
        put32(im, pos, 0x12345678u);
    }
    put32(im, pos + 4, 0xFFFFFFF0u);
    return 0;
}

static int c_ext_unknown(struct image *im)
{
    const uint64_t start = ext_start(im);
    uint64_t pos = start;

    /* Find the end marker and put an unknown 8-byte extension there. */
    while (pos + 8 <= im->cluster && be32(im, pos) != EXT_END) {
        pos += 8 + round_up(be32(im, pos + 4), 8);
    }
    if (pos + 24 > im->cluster || be64(im, H_BACKING_OFF) != 0) {
        return NOT_APPLICABLE;
    }
    put32(im, pos, 0x7E57DA7Au);
    put32(im, pos + 4, 5);
    memcpy(im->buf + pos + 8, "hello\0\0\0", 8);
    put64(im, pos + 16, 0);
    return 0;
}

static int c_snap_count_huge(struct image *im)
{
    put32(im, H_NB_SNAP, 0x7FFFFFFFu);
    if (im->snap_off == 0) {
        put64(im, H_SNAP_OFF, im->l1_off);
    }
    return 0;
}

static int c_snap_unaligned(struct image *im)
{
    if (im->nb_snap == 0) {
        put32(im, H_NB_SNAP, 1);
        put64(im, H_SNAP_OFF, im->l1_off + 8);
    } else {
        put64(im, H_SNAP_OFF, im->snap_off + 8);
    }
    return 0;
}

static int c_snap_past_eof(struct image *im)
{
    if (im->nb_snap == 0) {
        put32(im, H_NB_SNAP, 1);
    }
    put64(im, H_SNAP_OFF, past_eof(im));
    return 0;
}

static int c_snap_offset_zero(struct image *im)
{
    if (im->nb_snap == 0) {
        return NOT_APPLICABLE;
    }
    put64(im, H_SNAP_OFF, 0);
    return 0;
}

static int c_snap_l1_past_eof(struct image *im)
{
    if (im->nb_snap == 0) {
        return NOT_APPLICABLE;
    }
    put64(im, im->snap_off, past_eof(im));
    return 0;
}

static int c_snap_l1_unaligned(struct image *im)
{
    if (im->nb_snap == 0) {
        return NOT_APPLICABLE;
    }
    put64(im, im->snap_off, be64(im, im->snap_off) + 8);
    return 0;
}

static int c_snap_l1_size_huge(struct image *im)
{
    if (im->nb_snap == 0) {
        return NOT_APPLICABLE;
    }
    put32(im, im->snap_off + 8, 0x10000000u);
    return 0;
}

static int c_snap_extra_huge(struct image *im)
{
    if (im->nb_snap == 0) {
        return NOT_APPLICABLE;
    }
    put32(im, im->snap_off + 36, 0x10000000u);
    return 0;
}

static int patch_l2(struct image *im, bool compressed, uint64_t value)
{
    const uint64_t pos = find_l2_entry(im, compressed);

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, value);
    return 0;
}

static int c_l2_past_eof(struct image *im)
{
    const uint64_t pos = find_l2_entry(im, false);

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, (be64(im, pos) & ~OFFSET_MASK) | past_eof(im));
    return 0;
}

static int c_l2_at_l1(struct image *im)
{
    return patch_l2(im, false, FLAG_COPIED | im->l1_off);
}

static int c_l2_at_refcount_table(struct image *im)
{
    return patch_l2(im, false, FLAG_COPIED | im->rt_off);
}

/* A compressed descriptor whose data starts at host byte 0. */
static int c_l2_at_header(struct image *im)
{
    return patch_l2(im, false, FLAG_COMPRESSED);
}

static int c_l2_unaligned(struct image *im)
{
    const uint64_t pos = find_l2_entry(im, false);

    if (!pos || im->cluster <= 512) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, be64(im, pos) + 512);
    return 0;
}

static int compressed_shift(const struct image *im)
{
    return 62 - ((int)im->cluster_bits - 8);
}

static int c_compressed_past_eof(struct image *im)
{
    const uint64_t pos = find_l2_entry(im, true);
    const int x = compressed_shift(im);
    const uint64_t off_mask = (1ull << x) - 1;

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, (be64(im, pos) & ~off_mask) | (past_eof(im) + 123));
    return 0;
}

static int c_compressed_huge_span(struct image *im)
{
    const uint64_t pos = find_l2_entry(im, true);
    const int x = compressed_shift(im);
    const uint64_t count_mask = ((1ull << 62) - 1) & ~((1ull << x) - 1);

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, be64(im, pos) | count_mask);
    return 0;
}

static int c_compressed_copied(struct image *im)
{
    const uint64_t pos = find_l2_entry(im, true);

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, be64(im, pos) | FLAG_COPIED);
    return 0;
}

static int c_compressed_garbage(struct image *im)
{
    const uint64_t pos = find_l2_entry(im, true);
    const int x = compressed_shift(im);
    uint64_t data;
    uint64_t i;

    if (!pos) {
        return NOT_APPLICABLE;
    }
    data = be64(im, pos) & ((1ull << x) - 1);
    for (i = 0; i < 64 && data + i < im->len; i++) {
        im->buf[data + i] = (uint8_t)(0xA5 ^ (i * 37));
    }
    return 0;
}

static int c_l1_entry_at_rt(struct image *im)
{
    const uint64_t pos = find_l1_entry(im, 0);

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, FLAG_COPIED | im->rt_off);
    return 0;
}

static int c_l1_entry_at_l1(struct image *im)
{
    const uint64_t pos = find_l1_entry(im, 0);

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, FLAG_COPIED | im->l1_off);
    return 0;
}

static int c_l1_entry_unaligned(struct image *im)
{
    const uint64_t pos = find_l1_entry(im, 0);

    if (!pos || im->cluster <= 512) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, be64(im, pos) + 512);
    return 0;
}

static int c_l1_entry_past_eof(struct image *im)
{
    const uint64_t pos = find_l1_entry(im, 0);

    if (!pos) {
        return NOT_APPLICABLE;
    }
    put64(im, pos, FLAG_COPIED | past_eof(im));
    return 0;
}

static int c_l1_entries_share_l2(struct image *im)
{
    const uint64_t first = find_l1_entry(im, 0);
    uint64_t i;

    if (!first || im->l1_size < 2) {
        return NOT_APPLICABLE;
    }
    for (i = 0; i < im->l1_size; i++) {
        const uint64_t pos = im->l1_off + 8 * i;

        if (pos != first) {
            put64(im, pos, be64(im, first));
            return 0;
        }
    }
    return NOT_APPLICABLE;
}

static int c_refblock_past_eof(struct image *im)
{
    put64(im, im->rt_off, past_eof(im));
    return 0;
}

static int c_refblock_unaligned(struct image *im)
{
    if (im->cluster <= 512 || first_refblock(im) == 0) {
        return NOT_APPLICABLE;
    }
    put64(im, im->rt_off, first_refblock(im) + 512);
    return 0;
}

static int c_refblock_at_l1(struct image *im)
{
    put64(im, im->rt_off, im->l1_off);
    return 0;
}

static int c_rt_entry_zero(struct image *im)
{
    put64(im, im->rt_off, 0);
    return 0;
}

static int c_refcounts_zeroed(struct image *im)
{
    const uint64_t rb = first_refblock(im);

    if (rb == 0 || rb + im->cluster > im->len) {
        return NOT_APPLICABLE;
    }
    memset(im->buf + rb, 0, (size_t)im->cluster);
    return 0;
}

static int c_dirty_refcounts_zeroed(struct image *im)
{
    const int rc = c_refcounts_zeroed(im);

    return rc ? rc : set_incompat(im, INCOMPAT_DIRTY);
}

static int c_truncated_header(struct image *im)
{
    im->len = is_v3(im) ? im->header_length : 72;
    return 0;
}

static int c_truncated_cluster0(struct image *im)
{
    im->len = (size_t)im->cluster;
    return 0;
}

static int c_truncated_half(struct image *im)
{
    im->len = im->len / 2;
    return 0;
}

static int c_zero_length(struct image *im)
{
    im->len = 0;
    return 0;
}

struct corrupt_case {
    const char *name;
    const char *expect;
    case_fn fn;
    const char *desc;
};

static const struct corrupt_case cases[] = {
    {"bad-magic", "fail", c_bad_magic, "magic is not QFI\\xfb"},
    {"version-1", "fail", c_version_1, "version 1"},
    {"version-4", "fail", c_version_4, "version 4"},
    {"cluster-bits-8", "fail", c_cluster_bits_8, "256-byte clusters"},
    {"cluster-bits-22", "fail", c_cluster_bits_22, "4 MiB clusters"},
    {"cluster-bits-63", "fail", c_cluster_bits_63, "cluster_bits 63"},
    {"size-2-63", "fail", c_size_2_63, "virtual size 2^63"},
    {"size-max", "fail", c_size_max, "virtual size 2^64-1"},
    {"crypt-aes", "fail", c_crypt_aes, "crypt_method 1 (AES)"},
    {"crypt-luks", "fail", c_crypt_luks, "crypt_method 2, no LUKS header"},
    {"crypt-unknown", "fail", c_crypt_unknown, "crypt_method 3"},
    {"l1-size-huge", "fail", c_l1_size_huge, "l1_size 2^28 entries"},
    {"l1-size-too-small", "fail", c_l1_size_too_small,
     "l1_size one entry short of the virtual size"},
    {"l1-unaligned", "fail", c_l1_unaligned, "L1 offset not aligned"},
    {"l1-past-eof", "fail", c_l1_past_eof, "L1 table past the end of file"},
    {"l1-at-header", "fail", c_l1_at_header, "L1 table at offset 0"},
    {"l1-at-refcount-table", "fail", c_l1_at_refcount_table,
     "L1 table on the refcount table"},
    {"rt-unaligned", "fail", c_rt_unaligned,
     "refcount table offset not aligned"},
    {"rt-past-eof", "fail", c_rt_past_eof,
     "refcount table past the end of file"},
    {"rt-at-header", "fail", c_rt_at_header, "refcount table at offset 0"},
    {"rt-at-l1", "fail", c_rt_at_l1, "refcount table on the L1 table"},
    {"rt-at-l2", "fail", c_rt_at_l2, "refcount table on an L2 table"},
    {"rt-clusters-huge", "fail", c_rt_clusters_huge,
     "refcount_table_clusters 2^24-1"},
    {"rt-clusters-zero", "fail", c_rt_clusters_zero,
     "refcount_table_clusters 0"},
    {"refcount-order-7", "fail", c_refcount_order_7, "refcount_order 7"},
    {"header-length-unaligned", "fail", c_header_length_unaligned,
     "header_length not a multiple of 8"},
    {"header-length-short", "fail", c_header_length_short,
     "header_length 96 (< 104)"},
    {"header-length-huge", "fail", c_header_length_huge,
     "header_length larger than a cluster"},
    {"incompat-bit-7", "fail", c_incompat_unknown,
     "unknown incompatible feature bit 7"},
    {"incompat-bit-63", "fail", c_incompat_high,
     "unknown incompatible feature bit 63"},
    {"incompat-data-file", "fail", c_incompat_data_file,
     "external data file bit without a data file"},
    {"corrupt-bit", "fail-rw", c_corrupt_bit, "corrupt bit set"},
    {"dirty-bit", "ok-rw", c_dirty_bit, "dirty bit set"},
    {"dirty-refcounts-zeroed", "ok-rw", c_dirty_refcounts_zeroed,
     "dirty bit set, first refcount block zeroed"},
    {"extl2-small-cluster", "fail", c_extl2_small_cluster,
     "extended L2 with clusters below 16 KiB"},
    {"compression-type-no-bit", "fail", c_compression_type_no_bit,
     "compression_type 1 without the incompatible bit"},
    {"compression-type-unknown", "fail", c_compression_type_unknown,
     "compression_type 2"},
    {"compression-bit-zlib", "fail", c_compression_bit_zlib,
     "compression type bit set with compression_type 0"},
    {"compat-unknown", "ok", c_compat_unknown,
     "unknown compatible feature bit 9 (must be ignored)"},
    {"autoclear-unknown", "ok", c_autoclear_unknown,
     "unknown autoclear feature bit 5 (must be ignored)"},
    {"backing-offset-outside", "fail", c_backing_offset_outside,
     "backing file name outside cluster 0"},
    {"backing-name-crosses", "fail", c_backing_name_crosses,
     "backing file name running past cluster 0"},
    {"backing-size-2000", "fail", c_backing_size_2000,
     "backing file name of 2000 bytes"},
    {"backing-missing", "fail", c_backing_missing,
     "backing file that does not exist"},
    {"backing-loop", "fail", c_backing_loop,
     "the image is its own backing file"},
    {"ext-backing-fmt-20", "fail", c_ext_backing_fmt_20,
     "backing format extension of 20 bytes"},
    {"ext-length-past-cluster", "fail", c_ext_length_past_cluster,
     "extension length running past cluster 0"},
    {"ext-length-huge", "fail", c_ext_length_huge,
     "extension length 0xfffffff0"},
    {"ext-unknown", "ok", c_ext_unknown,
     "unknown header extension (must be skipped)"},
    {"snap-count-huge", "fail", c_snap_count_huge, "nb_snapshots 0x7fffffff"},
    {"snap-unaligned", "fail", c_snap_unaligned,
     "snapshot table offset not aligned"},
    {"snap-past-eof", "fail", c_snap_past_eof,
     "snapshot table past the end of file"},
    {"snap-offset-zero", "fail", c_snap_offset_zero,
     "snapshot table at offset 0"},
    {"snap-l1-past-eof", "fail", c_snap_l1_past_eof,
     "snapshot L1 table past the end of file"},
    {"snap-l1-unaligned", "fail", c_snap_l1_unaligned,
     "snapshot L1 table offset not aligned"},
    {"snap-l1-size-huge", "fail", c_snap_l1_size_huge,
     "snapshot L1 size 2^28 entries"},
    {"snap-extra-huge", "fail", c_snap_extra_huge,
     "snapshot extra data size 2^28"},
    {"l2-past-eof", "fail", c_l2_past_eof,
     "L2 entry pointing past the end of file"},
    {"l2-at-header", "fail", c_l2_at_header,
     "L2 entry (compressed form) whose data is the header"},
    {"l2-at-l1", "fail", c_l2_at_l1, "L2 entry pointing at the L1 table"},
    {"l2-at-refcount-table", "fail", c_l2_at_refcount_table,
     "L2 entry pointing at the refcount table"},
    {"l2-unaligned", "fail", c_l2_unaligned, "L2 entry offset not aligned"},
    {"l1-entry-at-rt", "fail", c_l1_entry_at_rt,
     "L1 entry pointing at the refcount table"},
    {"l1-entry-at-l1", "fail", c_l1_entry_at_l1,
     "L1 entry pointing at the L1 table itself"},
    {"l1-entry-unaligned", "fail", c_l1_entry_unaligned,
     "L1 entry offset not aligned"},
    {"l1-entry-past-eof", "fail", c_l1_entry_past_eof,
     "L1 entry pointing past the end of file"},
    {"l1-entries-share-l2", "fail", c_l1_entries_share_l2,
     "two L1 entries pointing at one L2 table"},
    {"compressed-past-eof", "fail", c_compressed_past_eof,
     "compressed cluster past the end of file"},
    {"compressed-huge-span", "fail", c_compressed_huge_span,
     "compressed cluster with the largest sector count"},
    {"compressed-copied", "fail", c_compressed_copied,
     "compressed cluster with the COPIED flag"},
    {"compressed-garbage", "fail", c_compressed_garbage,
     "compressed cluster data overwritten with garbage"},
    {"refblock-past-eof", "fail", c_refblock_past_eof,
     "refcount block past the end of file"},
    {"refblock-unaligned", "fail", c_refblock_unaligned,
     "refcount block offset not aligned"},
    {"refblock-at-l1", "fail", c_refblock_at_l1,
     "refcount block on the L1 table"},
    {"rt-entry-zero", "fail", c_rt_entry_zero,
     "first refcount table entry cleared"},
    {"refcounts-zeroed", "fail", c_refcounts_zeroed,
     "first refcount block zeroed"},
    {"truncated-header", "fail", c_truncated_header,
     "file holds only the header"},
    {"truncated-cluster0", "fail", c_truncated_cluster0,
     "file holds only cluster 0"},
    {"truncated-half", "fail", c_truncated_half, "file cut in half"},
    {"zero-length", "fail", c_zero_length, "empty file"},
};

#define N_CASES (sizeof(cases) / sizeof(cases[0]))

static int load(struct image *im, const char *path)
{
    struct stat sb;
    size_t done = 0;
    int fd = open(path, O_RDONLY);

    if (fd < 0 || fstat(fd, &sb) < 0) {
        fprintf(stderr, "mkcorrupt: %s: %s\n", path, strerror(errno));
        if (fd >= 0) {
            close(fd);
        }
        return -1;
    }
    im->len = (size_t)sb.st_size;
    im->buf = calloc(1, im->len + 1);
    if (!im->buf) {
        fprintf(stderr, "mkcorrupt: out of memory\n");
        close(fd);
        return -1;
    }
    while (done < im->len) {
        const ssize_t n = read(fd, im->buf + done, im->len - done);

        if (n <= 0) {
            fprintf(stderr, "mkcorrupt: %s: read failed\n", path);
            close(fd);
            return -1;
        }
        done += (size_t)n;
    }
    close(fd);
    return 0;
}

static int decode(struct image *im)
{
    if (im->len < 72 || be32(im, H_MAGIC) != QCOW_MAGIC) {
        fprintf(stderr, "mkcorrupt: %s: not a qcow2 image\n", im->in_path);
        return -1;
    }
    im->version = be32(im, H_VERSION);
    im->cluster_bits = be32(im, H_CLUSTER_BITS);
    if ((im->version != 2 && im->version != 3) || im->cluster_bits < 9 ||
        im->cluster_bits > 21) {
        fprintf(stderr, "mkcorrupt: %s: unexpected version or cluster size\n",
                im->in_path);
        return -1;
    }
    im->cluster = 1ull << im->cluster_bits;
    im->size = be64(im, H_SIZE);
    im->l1_size = be32(im, H_L1_SIZE);
    im->l1_off = be64(im, H_L1_OFF);
    im->rt_off = be64(im, H_RT_OFF);
    im->rt_clusters = be32(im, H_RT_CLUSTERS);
    im->nb_snap = be32(im, H_NB_SNAP);
    im->snap_off = be64(im, H_SNAP_OFF);
    if (is_v3(im)) {
        im->incompat = be64(im, H_INCOMPAT);
        im->header_length = be32(im, H_HEADER_LENGTH);
    } else {
        im->incompat = 0;
        im->header_length = 72;
    }
    if (im->len < im->cluster) {
        fprintf(stderr, "mkcorrupt: %s: shorter than one cluster\n",
                im->in_path);
        return -1;
    }
    return 0;
}

static int save(const struct image *im, const char *path)
{
    size_t done = 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

    if (fd < 0) {
        fprintf(stderr, "mkcorrupt: %s: %s\n", path, strerror(errno));
        return -1;
    }
    while (done < im->len) {
        const ssize_t n = write(fd, im->buf + done, im->len - done);

        if (n <= 0) {
            fprintf(stderr, "mkcorrupt: %s: write failed\n", path);
            close(fd);
            return -1;
        }
        done += (size_t)n;
    }
    if (close(fd) < 0) {
        fprintf(stderr, "mkcorrupt: %s: %s\n", path, strerror(errno));
        return -1;
    }
    return 0;
}

static void usage(FILE *f)
{
    fputs("Usage: mkcorrupt CASE IN OUT\n"
          "       mkcorrupt --list\n"
          "Writes OUT, a copy of the qcow2 image IN damaged as CASE says.\n"
          "--list prints each case with its expected outcome (fail, ok,\n"
          "ok-rw, fail-rw) and a description.  Exit status 3 means the\n"
          "case does not apply to IN.\n",
          f);
}

int main(int argc, char **argv)
{
    struct image im;
    const struct corrupt_case *cc = NULL;
    size_t i;
    int rc;

    if (argc == 2 && strcmp(argv[1], "--list") == 0) {
        for (i = 0; i < N_CASES; i++) {
            printf("%s %s %s\n", cases[i].name, cases[i].expect, cases[i].desc);
        }
        return 0;
    }
    if (argc == 2 &&
        (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        usage(stdout);
        return 0;
    }
    if (argc != 4) {
        usage(stderr);
        return 2;
    }
    for (i = 0; i < N_CASES; i++) {
        if (strcmp(cases[i].name, argv[1]) == 0) {
            cc = &cases[i];
        }
    }
    if (!cc) {
        fprintf(stderr, "mkcorrupt: unknown case '%s' (see --list)\n", argv[1]);
        return 2;
    }
    memset(&im, 0, sizeof(im));
    im.in_path = argv[2];
    im.out_path = argv[3];
    if (load(&im, argv[2]) < 0 || decode(&im) < 0) {
        free(im.buf);
        return 1;
    }
    rc = cc->fn(&im);
    if (rc == 0) {
        rc = save(&im, argv[3]) < 0 ? 1 : 0;
    } else if (rc < 0) {
        rc = 1;
    }
    free(im.buf);
    return rc;
}
