/*
 * qs_compress.h - cluster codecs: zlib raw deflate (as QEMU) and zstd.
 */
#ifndef QS_COMPRESS_H
#define QS_COMPRESS_H

#include <stddef.h>
#include <sys/types.h>

/*
 * Compresses `src` (one cluster) into `dst` of `dst_len` bytes.
 * Returns the compressed size, -ENOSPC if it would not be smaller than
 * dst_len, -EIO on a codec failure.
 */
ssize_t qs_compress(int type, void *dst, size_t dst_len, const void *src,
                    size_t src_len);

/*
 * Decompresses until `dst_len` bytes (one cluster) are produced; trailing
 * input is ignored, as it may belong to the next compressed cluster.
 * Returns 0 or -EIO when the data is damaged or too short.
 */
int qs_decompress(int type, void *dst, size_t dst_len, const void *src,
                  size_t src_len);

#endif /* QS_COMPRESS_H */
