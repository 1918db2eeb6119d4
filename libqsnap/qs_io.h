/*
 * qs_io.h - the host file underneath an image.
 *
 * All access to the host file goes through a qs_io, a small vtable, so that
 * tests can substitute in-memory and fault-injecting back-ends.  The POSIX
 * back-end keeps two descriptors when O_DIRECT is requested: data I/O whose
 * offset, length and buffers are aligned goes through the direct one,
 * everything else (metadata, partial sectors) through the buffered one.
 * A writable file gets the direct descriptor too, for bulk writes alone.
 *
 * Image locks follow QEMU's file driver: one-byte OFD read locks at
 * 100 + permission bit for permissions held and 200 + bit for permissions
 * not shared with others.
 */
#ifndef QS_IO_H
#define QS_IO_H

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef struct qs_io qs_io;

struct qs_io_ops {
    int (*preadv)(qs_io *io, const struct iovec *iov, int iovcnt, uint64_t off);
    int (*pwritev)(qs_io *io, const struct iovec *iov, int iovcnt,
                   uint64_t off);
    /* Optional: pwritev for data written once and not read back soon (VM
     * state); the back-end may bypass the host's cache for it. */
    int (*pwritev_bulk)(qs_io *io, const struct iovec *iov, int iovcnt,
                        uint64_t off);
    int (*flush)(qs_io *io);
    /* Optional hint: start writing dirty data back, without waiting. */
    void (*start_writeback)(qs_io *io);
    int (*truncate)(qs_io *io, uint64_t size);
    int (*punch)(qs_io *io, uint64_t off, uint64_t len);
    int (*falloc)(qs_io *io, uint64_t off, uint64_t len);
    /* Optional: allocate [off, off + len) and extend the file over it if
     * the file system can do so without writing it (no fallback). */
    int (*reserve)(qs_io *io, uint64_t off, uint64_t len);
    int (*size)(qs_io *io, uint64_t *size);
    int (*disk_usage)(qs_io *io, uint64_t *bytes);
    /* Next data (or hole) at or after off; *res = size if none. */
    int (*seek)(qs_io *io, uint64_t off, bool hole, uint64_t *res);
    void (*close)(qs_io *io);
};

struct qs_io {
    const struct qs_io_ops *ops;
};

enum {
    QS_IO_RDWR = 1u << 0,
    QS_IO_CREATE = 1u << 1, /* create or truncate */
    QS_IO_DIRECT = 1u << 2, /* O_DIRECT for aligned I/O */
    QS_IO_NOLOCK = 1u << 3, /* force-share: no exclusive claims */
    QS_IO_EXCL = 1u << 4,   /* with CREATE: fail if it exists */
    QS_IO_REGULAR = 1u << 5, /* refuse anything but a regular file */
};

/* Opens `path` with the POSIX back-end; on failure writes `err`. */
int qs_io_open_posix(const char *path, unsigned flags, qs_io **out, char *err,
                     size_t errlen);

static inline int qs_io_preadv(qs_io *io, const struct iovec *iov, int n,
                               uint64_t off)
{
    return io->ops->preadv(io, iov, n, off);
}

static inline int qs_io_pwritev(qs_io *io, const struct iovec *iov, int n,
                                uint64_t off)
{
    return io->ops->pwritev(io, iov, n, off);
}

static inline int qs_io_pwritev_bulk(qs_io *io, const struct iovec *iov, int n,
                                     uint64_t off)
{
    return io->ops->pwritev_bulk ? io->ops->pwritev_bulk(io, iov, n, off)
                                 : io->ops->pwritev(io, iov, n, off);
}

int qs_io_pread(qs_io *io, void *buf, size_t len, uint64_t off);
int qs_io_pwrite(qs_io *io, const void *buf, size_t len, uint64_t off);

static inline int qs_io_flush(qs_io *io)
{
    return io->ops->flush(io);
}

static inline void qs_io_start_writeback(qs_io *io)
{
    if (io->ops->start_writeback) {
        io->ops->start_writeback(io);
    }
}

static inline int qs_io_truncate(qs_io *io, uint64_t size)
{
    return io->ops->truncate(io, size);
}

static inline int qs_io_punch(qs_io *io, uint64_t off, uint64_t len)
{
    return io->ops->punch(io, off, len);
}

static inline int qs_io_falloc(qs_io *io, uint64_t off, uint64_t len)
{
    return io->ops->falloc(io, off, len);
}

static inline int qs_io_reserve(qs_io *io, uint64_t off, uint64_t len)
{
    return io->ops->reserve ? io->ops->reserve(io, off, len) : -EOPNOTSUPP;
}

static inline int qs_io_size(qs_io *io, uint64_t *size)
{
    return io->ops->size(io, size);
}

static inline int qs_io_disk_usage(qs_io *io, uint64_t *bytes)
{
    return io->ops->disk_usage(io, bytes);
}

static inline int qs_io_seek(qs_io *io, uint64_t off, bool hole, uint64_t *res)
{
    return io->ops->seek(io, off, hole, res);
}

static inline void qs_io_close(qs_io *io)
{
    if (io) {
        io->ops->close(io);
    }
}

#endif /* QS_IO_H */
