/*
 * compress.c - cluster codecs.
 *
 * Spec: docs/interop/qcow2.txt, "Compressed Clusters Descriptor" and the
 * compression_type header field.  zlib clusters are raw deflate streams
 * (no zlib header) with a 4 KiB window, as QEMU writes them; zstd clusters
 * are one or more zstd frames.  Neither stores the compressed length
 * exactly, so decoders stop once a whole cluster has been produced.
 */
#include "config.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "qs_int.h"

/*
 * Compression contexts are kept per thread and reset between clusters:
 * setting one up costs more than compressing a small cluster.
 */
struct codec_ctx {
    z_stream zs;
    bool zs_ready;
    ZSTD_CCtx *zc;
    ZSTD_DCtx *zd;
};

static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;

static void ctx_free(void *p)
{
    struct codec_ctx *c = p;
    if (c->zs_ready) {
        deflateEnd(&c->zs);
    }
    ZSTD_freeCCtx(c->zc);
    ZSTD_freeDCtx(c->zd);
    free(c);
}

static void ctx_key_init(void)
{
    pthread_key_create(&ctx_key, ctx_free);
}

static struct codec_ctx *thread_ctx(void)
{
    pthread_once(&ctx_once, ctx_key_init);
    struct codec_ctx *c = pthread_getspecific(ctx_key);
    if (!c) {
        c = calloc(1, sizeof(*c));
        if (c && pthread_setspecific(ctx_key, c) != 0) {
            free(c);
            c = NULL;
        }
    }
    return c;
}

static ssize_t deflate_cluster(void *dst, size_t dst_len, const void *src,
                               size_t src_len)
{
    struct codec_ctx *c = thread_ctx();
    if (!c) {
        return -ENOMEM;
    }
    z_stream *zs = &c->zs;
    if (!c->zs_ready) {
        memset(zs, 0, sizeof(*zs));
        /* Raw deflate with a 4 KiB window, as QEMU writes it. */
        if (deflateInit2(zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9,
                         Z_DEFAULT_STRATEGY) != Z_OK) {
            return -EIO;
        }
        c->zs_ready = true;
    } else if (deflateReset(zs) != Z_OK) {
        return -EIO;
    }
    zs->next_in = (Bytef *)src;
    zs->avail_in = (uInt)src_len;
    zs->next_out = dst;
    zs->avail_out = (uInt)dst_len;
    int r = deflate(zs, Z_FINISH);
    return r == Z_STREAM_END ? (ssize_t)(dst_len - zs->avail_out) : -ENOSPC;
}

static int inflate_cluster(void *dst, size_t dst_len, const void *src,
                           size_t src_len)
{
    z_stream zs;
    memset(&zs, 0, sizeof(zs));
    if (inflateInit2(&zs, -12) != Z_OK) {
        return -EIO;
    }
    zs.next_in = (Bytef *)src;
    zs.avail_in = (uInt)src_len;
    zs.next_out = dst;
    zs.avail_out = (uInt)dst_len;
    int r = inflate(&zs, Z_FINISH);
    /* A full output buffer ends the cluster even mid-stream. */
    int ret = (r == Z_STREAM_END || r == Z_BUF_ERROR || r == Z_OK) &&
                      zs.avail_out == 0
                  ? 0
                  : -EIO;
    inflateEnd(&zs);
    return ret;
}

static ssize_t zstd_compress_cluster(void *dst, size_t dst_len, const void *src,
                                     size_t src_len)
{
    struct codec_ctx *c = thread_ctx();
    if (!c) {
        return -ENOMEM;
    }
    if (!c->zc && !(c->zc = ZSTD_createCCtx())) {
        return -ENOMEM;
    }
    size_t r = ZSTD_compressCCtx(c->zc, dst, dst_len, src, src_len,
                                 ZSTD_CLEVEL_DEFAULT);
    if (ZSTD_isError(r)) {
        return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall ? -ENOSPC
                                                                   : -EIO;
    }
    return (ssize_t)r;
}

static int zstd_decompress_cluster(void *dst, size_t dst_len, const void *src,
                                   size_t src_len)
{
    struct codec_ctx *c = thread_ctx();
    if (!c) {
        return -ENOMEM;
    }
    if (!c->zd && !(c->zd = ZSTD_createDCtx())) {
        return -ENOMEM;
    }
    ZSTD_DCtx *d = c->zd;
    ZSTD_DCtx_reset(d, ZSTD_reset_session_only);
    ZSTD_inBuffer in = {src, src_len, 0};
    ZSTD_outBuffer out = {dst, dst_len, 0};
    int ret = 0;
    while (out.pos < out.size) {
        size_t r = ZSTD_decompressStream(d, &out, &in);
        if (ZSTD_isError(r)) {
            ret = -EIO;
            break;
        }
        if (in.pos == in.size && out.pos < out.size) {
            /* Input exhausted: decoding made progress or never will. */
            if (r == 0) {
                ret = -EIO;
                break;
            }
            size_t before = out.pos;
            r = ZSTD_decompressStream(d, &out, &in);
            if (ZSTD_isError(r) || out.pos == before) {
                ret = -EIO;
                break;
            }
        }
    }
    return ret;
}

ssize_t qs_compress(int type, void *dst, size_t dst_len, const void *src,
                    size_t src_len)
{
    switch (type) {
    case QSNAP_COMPRESSION_ZLIB:
        return deflate_cluster(dst, dst_len, src, src_len);
    case QSNAP_COMPRESSION_ZSTD:
        return zstd_compress_cluster(dst, dst_len, src, src_len);
    default:
        return -ENOTSUP;
    }
}

int qs_decompress(int type, void *dst, size_t dst_len, const void *src,
                  size_t src_len)
{
    switch (type) {
    case QSNAP_COMPRESSION_ZLIB:
        return inflate_cluster(dst, dst_len, src, src_len);
    case QSNAP_COMPRESSION_ZSTD:
        return zstd_decompress_cluster(dst, dst_len, src, src_len);
    default:
        return -ENOTSUP;
    }
}
