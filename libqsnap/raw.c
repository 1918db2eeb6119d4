/*
 * raw.c - raw images: the guest disk is the file itself.
 *
 * Used for raw backing files and for raw sources and targets of convert
 * and compare.  Holes found with SEEK_HOLE report as zeros.
 */
#include "config.h"

#include <errno.h>
#include <inttypes.h>

#include "qs_int.h"

int qs_raw_read(struct qsnap_image *img, const struct iovec *iov, int n,
                uint64_t off, uint64_t len)
{
    (void)len;
    int ret = qs_io_preadv(img->io, iov, n, off);
    if (ret < 0) {
        return qs_error(img, ret, "%s: reading at offset %" PRIu64 ": %s",
                        img->filename, off, qsnap_strerror(ret));
    }
    return 0;
}

int qs_raw_block_status(struct qsnap_image *img, uint64_t off, uint64_t len,
                        uint64_t *pnum, unsigned *flags)
{
    uint64_t data;
    int ret = qs_io_seek(img->io, off, false, &data);
    if (ret < 0) {
        /* No SEEK_DATA here: everything is data. */
        *pnum = len;
        *flags = QSNAP_BS_DATA | QSNAP_BS_ALLOCATED | QSNAP_BS_OFFSET;
        return 0;
    }
    if (data > off) {
        *pnum = QS_MIN(len, data - off);
        *flags = QSNAP_BS_ZERO | QSNAP_BS_ALLOCATED | QSNAP_BS_OFFSET;
        return 0;
    }
    uint64_t hole;
    ret = qs_io_seek(img->io, off, true, &hole);
    if (ret < 0 || hole <= off) {
        hole = off + len;
    }
    *pnum = QS_MIN(len, hole - off);
    *flags = QSNAP_BS_DATA | QSNAP_BS_ALLOCATED | QSNAP_BS_OFFSET;
    return 0;
}
