/*
 * header.c - decode, validate and encode the qcow2 header and extensions.
 *
 * Spec: docs/interop/qcow2.txt, "Header", "Header extensions".
 *
 * Invariants:
 *   1. A decoded header has every field checked against the spec's limits
 *      and every table it names lies inside the file; nothing downstream
 *      re-checks these fields.
 *   2. Unknown header fields (past the ones we know) and unknown
 *      extensions survive a decode/encode round trip byte for byte.
 *   3. The backing file name and all extensions lie inside cluster 0.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qs_endian.h"
#include "qs_int.h"

/* Names QEMU publishes in its feature table (spec: feature name table). */
static const struct qs_feature_name known_features[] = {
    {0, 0, "dirty bit"},
    {0, 1, "corrupt bit"},
    {0, 2, "external data file"},
    {0, 3, "compression type"},
    {0, 4, "extended L2 entries"},
    {1, 0, "lazy refcounts"},
    {2, 0, "bitmaps"},
    {2, 1, "raw external data"},
};
#define N_KNOWN_FEATURES (sizeof(known_features) / sizeof(known_features[0]))

static uint32_t align8(uint32_t v)
{
    return (v + 7u) & ~7u;
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

void qs_header_free(struct qs_header *h)
{
    for (size_t i = 0; i < h->n_exts; i++) {
        free(h->exts[i].data);
    }
    free(h->exts);
    free(h->features);
    free(h->unknown_fields);
    h->exts = NULL;
    h->features = NULL;
    h->unknown_fields = NULL;
    h->n_exts = 0;
    h->n_features = 0;
    h->unknown_fields_len = 0;
}

int qs_header_copy(struct qs_header *dst, const struct qs_header *src)
{
    *dst = *src;
    dst->exts = NULL;
    dst->features = NULL;
    dst->unknown_fields = NULL;
    dst->n_exts = 0;
    dst->n_features = 0;
    dst->unknown_fields_len = 0;

    if (src->unknown_fields_len) {
        dst->unknown_fields = malloc(src->unknown_fields_len);
        if (!dst->unknown_fields) {
            goto fail;
        }
        memcpy(dst->unknown_fields, src->unknown_fields,
               src->unknown_fields_len);
        dst->unknown_fields_len = src->unknown_fields_len;
    }
    if (src->n_features) {
        dst->features = calloc(src->n_features, sizeof(*dst->features));
        if (!dst->features) {
            goto fail;
        }
        memcpy(dst->features, src->features,
               src->n_features * sizeof(*dst->features));
        dst->n_features = src->n_features;
    }
    if (src->n_exts) {
        dst->exts = calloc(src->n_exts, sizeof(*dst->exts));
        if (!dst->exts) {
            goto fail;
        }
        for (size_t i = 0; i < src->n_exts; i++) {
            dst->exts[i] = src->exts[i];
            dst->exts[i].data = malloc(src->exts[i].len ? src->exts[i].len : 1);
            if (!dst->exts[i].data) {
                goto fail;
            }
            memcpy(dst->exts[i].data, src->exts[i].data, src->exts[i].len);
            dst->n_exts = i + 1;
        }
    }
    return 0;

fail:
    qs_header_free(dst);
    return -ENOMEM;
}

const char *qs_header_feature_name(const struct qs_header *h, int type, int bit)
{
    for (size_t i = 0; i < h->n_features; i++) {
        if (h->features[i].type == type && h->features[i].bit == bit) {
            return h->features[i].name;
        }
    }
    return NULL;
}

static int add_ext(struct qs_header *h, uint32_t type, const uint8_t *data,
                   uint32_t len)
{
    struct qs_ext *n = realloc(h->exts, (h->n_exts + 1) * sizeof(*n));
    if (!n) {
        return -ENOMEM;
    }
    h->exts = n;
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy) {
        return -ENOMEM;
    }
    memcpy(copy, data, len);
    h->exts[h->n_exts++] = (struct qs_ext){type, len, copy};
    return 0;
}

static int parse_feature_table(struct qs_header *h, const uint8_t *data,
                               uint32_t len)
{
    size_t n = len / 48;
    free(h->features);
    h->features = calloc(n ? n : 1, sizeof(*h->features));
    if (!h->features) {
        return -ENOMEM;
    }
    h->n_features = n;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *e = data + i * 48;
        h->features[i].type = e[0];
        h->features[i].bit = e[1];
        memcpy(h->features[i].name, e + 2, 46);
        h->features[i].name[46] = '\0';
    }
    return 0;
}

#define BAD(code, ...)                                                         \
    do {                                                                       \
        qs_fmt_err(err, errlen, __VA_ARGS__);                                  \
        ret = (code);                                                          \
        goto fail;                                                             \
    } while (0)

static int parse_extensions(const uint8_t *buf, uint32_t start, uint32_t end,
                            const char *fn, struct qs_header *h, char *err,
                            size_t errlen)
{
    int ret = 0;
    uint32_t off = start;

    while (off + 8 <= end) {
        uint32_t type = qs_be32_load(buf + off);
        uint32_t len = qs_be32_load(buf + off + 4);
        if (type == QS_EXT_END) {
            return 0;
        }
        if (len > end - off - 8) {
            BAD(-EUCLEAN,
                "%s: header extension 0x%08x at offset %u has length %u, "
                "running past the end of the header area (%u)",
                fn, type, off, len, end);
        }
        const uint8_t *data = buf + off + 8;
        switch (type) {
        case QS_EXT_BACKING_FMT:
            if (len > QS_MAX_BACKING_FMT) {
                BAD(-EUCLEAN,
                    "%s: backing format extension is %u bytes long "
                    "(at most %u)",
                    fn, len, QS_MAX_BACKING_FMT);
            }
            memcpy(h->backing_fmt, data, len);
            h->backing_fmt[len] = '\0';
            break;
        case QS_EXT_FEATURE_TABLE:
            ret = parse_feature_table(h, data, len);
            if (ret < 0) {
                goto fail;
            }
            break;
        default:
            ret = add_ext(h, type, data, len);
            if (ret < 0) {
                goto fail;
            }
            break;
        }
        off += 8 + align8(len);
    }
    return 0;

fail:
    return ret;
}

int qs_header_decode(const uint8_t *buf, size_t len, uint64_t file_size,
                     const char *fn, struct qs_header *h, char *err,
                     size_t errlen)
{
    int ret = 0;

    memset(h, 0, sizeof(*h));
    if (len < QS_V2_HEADER_LEN) {
        BAD(-EINVAL, "%s: file is %zu bytes, too small for a qcow2 header", fn,
            len);
    }
    uint32_t magic = qs_be32_load(buf);
    if (magic != QS_MAGIC) {
        BAD(-EINVAL, "%s: not a qcow2 image (magic 0x%08x)", fn, magic);
    }
    h->version = qs_be32_load(buf + 4);
    h->backing_file_offset = qs_be64_load(buf + 8);
    h->backing_file_size = qs_be32_load(buf + 16);
    h->cluster_bits = qs_be32_load(buf + 20);
    h->size = qs_be64_load(buf + 24);
    h->crypt_method = qs_be32_load(buf + 32);
    h->l1_size = qs_be32_load(buf + 36);
    h->l1_table_offset = qs_be64_load(buf + 40);
    h->refcount_table_offset = qs_be64_load(buf + 48);
    h->refcount_table_clusters = qs_be32_load(buf + 56);
    h->nb_snapshots = qs_be32_load(buf + 60);
    h->snapshots_offset = qs_be64_load(buf + 64);

    if (h->version != 2 && h->version != 3) {
        BAD(-ENOTSUP, "%s: unsupported qcow2 version %u (2 and 3 are known)",
            fn, h->version);
    }
    if (h->cluster_bits < QS_MIN_CLUSTER_BITS ||
        h->cluster_bits > QS_MAX_CLUSTER_BITS) {
        BAD(-EUCLEAN, "%s: cluster_bits %u out of range %u..%u", fn,
            h->cluster_bits, QS_MIN_CLUSTER_BITS, QS_MAX_CLUSTER_BITS);
    }
    const uint64_t cs = 1ull << h->cluster_bits;
    const uint64_t hdr_area = len < cs ? len : cs;

    if (h->version == 2) {
        h->header_length = QS_V2_HEADER_LEN;
        h->refcount_order = 4;
    } else {
        if (len < QS_V3_HEADER_LEN) {
            BAD(-EUCLEAN, "%s: file is %zu bytes, too small for a v3 header",
                fn, len);
        }
        h->incompat = qs_be64_load(buf + 72);
        h->compat = qs_be64_load(buf + 80);
        h->autoclear = qs_be64_load(buf + 88);
        h->refcount_order = qs_be32_load(buf + 96);
        h->header_length = qs_be32_load(buf + 100);
        if (h->header_length < QS_V3_HEADER_LEN || h->header_length % 8 != 0 ||
            h->header_length > hdr_area) {
            BAD(-EUCLEAN,
                "%s: header_length %u invalid (must be a multiple of 8, "
                "at least %u, within the first cluster of %" PRIu64 " bytes)",
                fn, h->header_length, QS_V3_HEADER_LEN, hdr_area);
        }
        if (h->header_length > QS_V3_HEADER_LEN) {
            h->compression_type = buf[104];
        }
        if (h->header_length > QS_V3_HEADER_LEN_WRITTEN) {
            h->unknown_fields_len = h->header_length - QS_V3_HEADER_LEN_WRITTEN;
            h->unknown_fields = malloc(h->unknown_fields_len);
            if (!h->unknown_fields) {
                BAD(-ENOMEM, "%s: out of memory", fn);
            }
            memcpy(h->unknown_fields, buf + QS_V3_HEADER_LEN_WRITTEN,
                   h->unknown_fields_len);
        }
    }
    if (h->refcount_order > 6) {
        BAD(-EUCLEAN, "%s: refcount_order %u out of range 0..6", fn,
            h->refcount_order);
    }

    /* Backing file name: inside cluster 0, at most 1023 bytes. */
    if (h->backing_file_offset != 0 || h->backing_file_size != 0) {
        if (h->backing_file_size > QS_MAX_BACKING_NAME) {
            BAD(-EUCLEAN,
                "%s: backing_file_size %u exceeds the limit of %u bytes", fn,
                h->backing_file_size, QS_MAX_BACKING_NAME);
        }
        if (h->backing_file_offset < h->header_length ||
            h->backing_file_offset > hdr_area ||
            h->backing_file_size > hdr_area - h->backing_file_offset) {
            BAD(-EUCLEAN,
                "%s: backing file name (backing_file_offset %" PRIu64
                ", backing_file_size %u) lies outside the header cluster",
                fn, h->backing_file_offset, h->backing_file_size);
        }
        memcpy(h->backing_file, buf + h->backing_file_offset,
               h->backing_file_size);
        h->backing_file[h->backing_file_size] = '\0';
        if (strlen(h->backing_file) != h->backing_file_size) {
            BAD(-EUCLEAN, "%s: backing file name contains a NUL byte", fn);
        }
    }

    /* Extensions run up to the backing name, or to the end of cluster 0. */
    uint32_t ext_end = (uint32_t)hdr_area;
    if (h->backing_file_size) {
        ext_end = (uint32_t)h->backing_file_offset;
    }
    ret = parse_extensions(buf, h->header_length, ext_end, fn, h, err, errlen);
    if (ret < 0) {
        goto fail;
    }

    uint64_t unknown = h->incompat & ~QS_INCOMPAT_KNOWN;
    if (unknown) {
        int bit = __builtin_ctzll(unknown);
        const char *name = qs_header_feature_name(h, 0, bit);
        BAD(-ENOTSUP,
            "%s: unsupported incompatible feature: %s (bit %d of "
            "incompatible_features 0x%" PRIx64 ")",
            fn, name ? name : "unknown", bit, h->incompat);
    }
    if (h->incompat & QS_INCOMPAT_DATA_FILE) {
        BAD(-ENOTSUP,
            "%s: images with an external data file are not "
            "supported",
            fn);
    }
    if (h->crypt_method != 0) {
        BAD(-ENOTSUP,
            "%s: encrypted images (crypt_method %u) are not "
            "supported",
            fn, h->crypt_method);
    }
    if (h->compression_type > 1) {
        BAD(-ENOTSUP, "%s: unknown compression_type %u", fn,
            h->compression_type);
    }
    if ((h->compression_type != 0) !=
        !!(h->incompat & QS_INCOMPAT_COMPRESSION)) {
        BAD(-EUCLEAN,
            "%s: compression_type %u disagrees with incompatible feature "
            "bit 3 (incompatible_features 0x%" PRIx64 ")",
            fn, h->compression_type, h->incompat);
    }
    if ((h->incompat & QS_INCOMPAT_EXTL2) && h->cluster_bits < 14) {
        BAD(-EUCLEAN,
            "%s: extended L2 entries need clusters of at least 16 KiB "
            "(cluster_bits %u)",
            fn, h->cluster_bits);
    }

    /* Virtual size and the active L1 table. */
    const uint32_t l2_bits =
        h->cluster_bits - ((h->incompat & QS_INCOMPAT_EXTL2) ? 4 : 3);
    const uint32_t span_bits = h->cluster_bits + l2_bits;
    if (h->size > (uint64_t)INT64_MAX) {
        BAD(-EUCLEAN, "%s: virtual size %" PRIu64 " is too large", fn, h->size);
    }
    const uint64_t l1_needed = (h->size + (1ull << span_bits) - 1) >> span_bits;
    if ((uint64_t)h->l1_size * 8 > QS_MAX_L1_BYTES) {
        BAD(-EUCLEAN, "%s: l1_size %u exceeds the limit of %u entries", fn,
            h->l1_size, QS_MAX_L1_BYTES / 8);
    }
    if (h->l1_size < l1_needed) {
        BAD(-EUCLEAN,
            "%s: l1_size %u is too small for the virtual size %" PRIu64
            " (needs %" PRIu64 ")",
            fn, h->l1_size, h->size, l1_needed);
    }
    if (h->l1_table_offset % cs) {
        BAD(-EUCLEAN,
            "%s: l1_table_offset 0x%" PRIx64 " is not cluster-aligned", fn,
            h->l1_table_offset);
    }
    const uint64_t l1_bytes = (uint64_t)h->l1_size * 8;
    if (l1_bytes &&
        (h->l1_table_offset == 0 || h->l1_table_offset > file_size ||
         l1_bytes > file_size - h->l1_table_offset)) {
        BAD(-EUCLEAN,
            "%s: L1 table (l1_table_offset 0x%" PRIx64 ", %u entries) lies "
            "outside the file (%" PRIu64 " bytes)",
            fn, h->l1_table_offset, h->l1_size, file_size);
    }

    /* Refcount table. */
    const uint64_t rt_bytes = (uint64_t)h->refcount_table_clusters * cs;
    if (h->refcount_table_offset == 0 || h->refcount_table_offset % cs) {
        BAD(-EUCLEAN,
            "%s: refcount_table_offset 0x%" PRIx64
            " is zero or not cluster-aligned",
            fn, h->refcount_table_offset);
    }
    if (h->refcount_table_clusters == 0 || rt_bytes > QS_MAX_REFTABLE_BYTES) {
        BAD(-EUCLEAN,
            "%s: refcount_table_clusters %u out of range (1..%" PRIu64 ")", fn,
            h->refcount_table_clusters, QS_MAX_REFTABLE_BYTES / cs);
    }
    if (h->refcount_table_offset > file_size ||
        rt_bytes > file_size - h->refcount_table_offset) {
        BAD(-EUCLEAN,
            "%s: refcount table (offset 0x%" PRIx64 ", %u clusters) lies "
            "outside the file (%" PRIu64 " bytes)",
            fn, h->refcount_table_offset, h->refcount_table_clusters,
            file_size);
    }

    /* Snapshot table location (its length is checked when parsed). */
    if (h->nb_snapshots > QS_MAX_SNAPSHOTS) {
        BAD(-EUCLEAN, "%s: nb_snapshots %u exceeds the limit of %u", fn,
            h->nb_snapshots, QS_MAX_SNAPSHOTS);
    }
    if (h->snapshots_offset % cs) {
        BAD(-EUCLEAN,
            "%s: snapshots_offset 0x%" PRIx64 " is not cluster-aligned", fn,
            h->snapshots_offset);
    }
    if (h->nb_snapshots &&
        (h->snapshots_offset == 0 || h->snapshots_offset >= file_size)) {
        BAD(-EUCLEAN,
            "%s: snapshots_offset 0x%" PRIx64 " lies outside the file "
            "(%" PRIu64 " bytes)",
            fn, h->snapshots_offset, file_size);
    }

    /* Metadata that must not overlap: header, L1, refcount table. */
    if (ranges_overlap(h->l1_table_offset, l1_bytes, 0, cs)) {
        BAD(-EUCLEAN, "%s: L1 table (0x%" PRIx64 ") overlaps the header", fn,
            h->l1_table_offset);
    }
    if (ranges_overlap(h->refcount_table_offset, rt_bytes, 0, cs)) {
        BAD(-EUCLEAN, "%s: refcount table (0x%" PRIx64 ") overlaps the header",
            fn, h->refcount_table_offset);
    }
    if (ranges_overlap(h->l1_table_offset, l1_bytes, h->refcount_table_offset,
                       rt_bytes)) {
        BAD(-EUCLEAN,
            "%s: L1 table (0x%" PRIx64 ") overlaps the refcount table "
            "(0x%" PRIx64 ")",
            fn, h->l1_table_offset, h->refcount_table_offset);
    }
    if (h->nb_snapshots &&
        (ranges_overlap(h->snapshots_offset, 1, h->l1_table_offset, l1_bytes) ||
         ranges_overlap(h->snapshots_offset, 1, h->refcount_table_offset,
                        rt_bytes))) {
        BAD(-EUCLEAN,
            "%s: snapshot table (0x%" PRIx64 ") overlaps the L1 or "
            "refcount table",
            fn, h->snapshots_offset);
    }
    return 0;

fail:
    qs_header_free(h);
    return ret;
}

static uint8_t *put_ext(uint8_t *p, uint32_t type, const void *data,
                        uint32_t len)
{
    qs_be32_store(p, type);
    qs_be32_store(p + 4, len);
    memcpy(p + 8, data, len);
    return p + 8 + align8(len);
}

int qs_header_encode(const struct qs_header *h, uint8_t *buf, size_t len)
{
    const bool v3 = h->version >= 3;
    const uint32_t hdr_len =
        v3 ? QS_V3_HEADER_LEN_WRITTEN + h->unknown_fields_len
           : QS_V2_HEADER_LEN;
    const uint32_t fmt_len = (uint32_t)strlen(h->backing_fmt);
    const uint32_t name_len = (uint32_t)strlen(h->backing_file);
    const uint32_t table_len = (uint32_t)(N_KNOWN_FEATURES * 48);

    size_t need = hdr_len;
    if (fmt_len) {
        need += 8 + align8(fmt_len);
    }
    for (size_t i = 0; i < h->n_exts; i++) {
        need += 8 + align8(h->exts[i].len);
    }
    need += 8; /* end marker */
    need += name_len;
    if (need > len) {
        return -ENOSPC;
    }
    /* QEMU leaves the feature table out when it does not fit. */
    const bool with_table = v3 && need + 8 + table_len <= len;

    memset(buf, 0, len);
    qs_be32_store(buf, QS_MAGIC);
    qs_be32_store(buf + 4, h->version);
    qs_be32_store(buf + 20, h->cluster_bits);
    qs_be64_store(buf + 24, h->size);
    qs_be32_store(buf + 32, h->crypt_method);
    qs_be32_store(buf + 36, h->l1_size);
    qs_be64_store(buf + 40, h->l1_table_offset);
    qs_be64_store(buf + 48, h->refcount_table_offset);
    qs_be32_store(buf + 56, h->refcount_table_clusters);
    qs_be32_store(buf + 60, h->nb_snapshots);
    qs_be64_store(buf + 64, h->snapshots_offset);
    if (v3) {
        qs_be64_store(buf + 72, h->incompat);
        qs_be64_store(buf + 80, h->compat);
        qs_be64_store(buf + 88, h->autoclear);
        qs_be32_store(buf + 96, h->refcount_order);
        qs_be32_store(buf + 100, hdr_len);
        buf[104] = h->compression_type;
        if (h->unknown_fields_len) {
            memcpy(buf + QS_V3_HEADER_LEN_WRITTEN, h->unknown_fields,
                   h->unknown_fields_len);
        }
    }

    uint8_t *p = buf + hdr_len;
    if (fmt_len) {
        p = put_ext(p, QS_EXT_BACKING_FMT, h->backing_fmt, fmt_len);
    }
    if (with_table) {
        uint8_t table[N_KNOWN_FEATURES * 48];
        memset(table, 0, sizeof(table));
        for (size_t i = 0; i < N_KNOWN_FEATURES; i++) {
            table[i * 48] = known_features[i].type;
            table[i * 48 + 1] = known_features[i].bit;
            memcpy(table + i * 48 + 2, known_features[i].name,
                   strlen(known_features[i].name));
        }
        p = put_ext(p, QS_EXT_FEATURE_TABLE, table, table_len);
    }
    for (size_t i = 0; i < h->n_exts; i++) {
        p = put_ext(p, h->exts[i].type, h->exts[i].data, h->exts[i].len);
    }
    p += 8; /* end marker: already zero */
    if (name_len) {
        memcpy(p, h->backing_file, name_len);
        qs_be64_store(buf + 8, (uint64_t)(p - buf));
        qs_be32_store(buf + 16, name_len);
        p += name_len;
    }
    return (int)(p - buf);
}
