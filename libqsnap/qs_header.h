/*
 * qs_header.h - the qcow2 header (cluster 0) and its extensions.
 *
 * Spec: docs/interop/qcow2.txt, "Header" and "Header extensions".
 */
#ifndef QS_HEADER_H
#define QS_HEADER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QS_MAGIC 0x514649FBu
#define QS_V2_HEADER_LEN 72u
#define QS_V3_HEADER_LEN 104u
#define QS_V3_HEADER_LEN_WRITTEN 112u /* with compression_type, as QEMU */

#define QS_MIN_CLUSTER_BITS 9u
#define QS_MAX_CLUSTER_BITS 21u
#define QS_MAX_BACKING_NAME 1023u
#define QS_MAX_BACKING_FMT 15u
#define QS_MAX_L1_BYTES (32u << 20)
#define QS_MAX_REFTABLE_BYTES (8u << 20)
#define QS_MAX_SNAPSHOTS 65536u
#define QS_MAX_HOST_OFFSET (UINT64_C(1) << 56)

#define QS_INCOMPAT_DIRTY (UINT64_C(1) << 0)
#define QS_INCOMPAT_CORRUPT (UINT64_C(1) << 1)
#define QS_INCOMPAT_DATA_FILE (UINT64_C(1) << 2)
#define QS_INCOMPAT_COMPRESSION (UINT64_C(1) << 3)
#define QS_INCOMPAT_EXTL2 (UINT64_C(1) << 4)
#define QS_INCOMPAT_KNOWN UINT64_C(0x1f)
#define QS_COMPAT_LAZY_REFCOUNTS (UINT64_C(1) << 0)
#define QS_AUTOCLEAR_BITMAPS (UINT64_C(1) << 0)
#define QS_AUTOCLEAR_DATA_RAW (UINT64_C(1) << 1)

#define QS_EXT_END 0x00000000u
#define QS_EXT_BACKING_FMT 0xE2792ACAu
#define QS_EXT_FEATURE_TABLE 0x6803F857u
#define QS_EXT_BITMAPS 0x23852875u
#define QS_EXT_CRYPTO 0x0537BE77u
#define QS_EXT_DATA_FILE 0x44415441u

/* Byte offsets of header fields that are updated in place. */
#define QS_HDR_OFF_SIZE 24u
#define QS_HDR_OFF_L1 36u        /* l1_size (4) + l1_table_offset (8) */
#define QS_HDR_OFF_REFTABLE 48u  /* offset (8) + clusters (4) */
#define QS_HDR_OFF_SNAPSHOTS 60u /* nb_snapshots (4) + offset (8) */
#define QS_HDR_OFF_INCOMPAT 72u
#define QS_HDR_OFF_AUTOCLEAR 88u

struct qs_ext {
    uint32_t type;
    uint32_t len;
    uint8_t *data;
};

struct qs_feature_name {
    uint8_t type; /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;
    char name[47];
};

struct qs_header {
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t incompat;
    uint64_t compat;
    uint64_t autoclear;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;

    /* Header bytes past the fields we know, kept verbatim on rewrite. */
    uint8_t *unknown_fields;
    uint32_t unknown_fields_len;

    /* Extensions other than backing format and feature table, in order. */
    struct qs_ext *exts;
    size_t n_exts;

    struct qs_feature_name *features;
    size_t n_features;

    char backing_file[QS_MAX_BACKING_NAME + 1];
    char backing_fmt[QS_MAX_BACKING_FMT + 1];
};

/*
 * Decodes and validates the header in `buf` (`len` bytes: all of cluster 0
 * or the whole file if smaller).  `file_size` bounds every table.  On error
 * writes a message naming `filename`, the field and the value.
 * Returns 0, -EINVAL (not qcow2), -EUCLEAN (bad field), -ENOTSUP, -ENOMEM.
 */
int qs_header_decode(const uint8_t *buf, size_t len, uint64_t file_size,
                     const char *filename, struct qs_header *h, char *err,
                     size_t errlen);

/*
 * Encodes `h` into `buf` (one cluster, zeroed first).  The feature name
 * table is written when it fits.  Returns the bytes used, -ENOSPC if the
 * header does not fit in one cluster.
 */
int qs_header_encode(const struct qs_header *h, uint8_t *buf, size_t len);

/* Name of an incompatible feature bit from the table, or NULL. */
const char *qs_header_feature_name(const struct qs_header *h, int type,
                                   int bit);

void qs_header_free(struct qs_header *h);

/* Deep copy (for rewriting with changes). */
int qs_header_copy(struct qs_header *dst, const struct qs_header *src);

#endif /* QS_HEADER_H */
