/*
 * io.c - POSIX back-end of the host file layer (see qs_io.h).
 *
 * Invariants:
 *   1. Every call transfers the whole range or returns -errno; short reads
 *      past the end of the file return zeros for the missing tail.
 *   2. The direct descriptor (if any) is used only for I/O whose offset,
 *      lengths and buffer addresses are all QS_DIRECT_ALIGN-aligned, and
 *      only for bulk writes unless O_DIRECT was asked for.  It is the same
 *      file as the buffered one (checked when opened).
 *   3. Locks are taken before the conflict test, so two openers racing
 *      cannot both pass it.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qs_fault.h"
#include "qs_int.h"

#define QS_DIRECT_ALIGN 512

/* QEMU's permission bits and lock byte bases (block/file-posix.c facts). */
#define QS_LOCK_PERM_BASE 100
#define QS_LOCK_SHARED_BASE 200
#define QS_PERM_CONSISTENT_READ 0
#define QS_PERM_WRITE 1
#define QS_PERM_WRITE_UNCHANGED 2
#define QS_PERM_RESIZE 3
#define QS_PERM_COUNT 5

static const char *const perm_names[QS_PERM_COUNT] = {
    "consistent read", "write", "write unchanged", "resize", "graph modify",
};

struct posix_io {
    qs_io base;
    int fd;
    int direct_fd;   /* an O_DIRECT twin of fd, or -1 */
    bool direct_all; /* QS_IO_DIRECT: all aligned I/O goes through it */
};

static struct posix_io *to_posix(qs_io *io)
{
    return (struct posix_io *)io;
}

static bool iov_aligned(const struct iovec *iov, int n, uint64_t off)
{
    if (off % QS_DIRECT_ALIGN) {
        return false;
    }
    for (int i = 0; i < n; i++) {
        if ((uintptr_t)iov[i].iov_base % QS_DIRECT_ALIGN ||
            iov[i].iov_len % QS_DIRECT_ALIGN) {
            return false;
        }
    }
    return true;
}

/* Advances an iovec array by `done` bytes; returns the new start index. */
static int iov_advance(struct iovec *iov, int n, size_t done)
{
    int i = 0;
    while (i < n && done >= iov[i].iov_len) {
        done -= iov[i].iov_len;
        i++;
    }
    if (i < n) {
        iov[i].iov_base = (char *)iov[i].iov_base + done;
        iov[i].iov_len -= done;
    }
    return i;
}

static int rw_loop(int fd, const struct iovec *iov_in, int n, uint64_t off,
                   bool write)
{
    struct iovec stack_iov[16];
    struct iovec *iov = stack_iov;
    size_t total = 0;

    if (n > 16) {
        iov = malloc(sizeof(*iov) * (size_t)n);
        if (!iov) {
            return -ENOMEM;
        }
    }
    for (int i = 0; i < n; i++) {
        iov[i] = iov_in[i];
        total += iov[i].iov_len;
    }

    int ret = 0;
    int start = 0;
    while (total > 0) {
        int cnt = n - start;
        if (cnt > IOV_MAX) {
            cnt = IOV_MAX;
        }
        ssize_t r = write ? pwritev(fd, iov + start, cnt, (off_t)off)
                          : preadv(fd, iov + start, cnt, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            ret = -errno;
            break;
        }
        if (r == 0) {
            if (write) {
                ret = -EIO;
                break;
            }
            /* Past the end of the file: the rest reads as zeros. */
            for (int i = start; i < n; i++) {
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            }
            break;
        }
        total -= (size_t)r;
        off += (uint64_t)r;
        start += iov_advance(iov + start, n - start, (size_t)r);
    }
    if (iov != stack_iov) {
        free(iov);
    }
    return ret;
}

static int posix_rw(qs_io *io, const struct iovec *iov, int n, uint64_t off,
                    bool write, bool bulk)
{
    struct posix_io *p = to_posix(io);

    if (p->direct_fd >= 0 && (p->direct_all || bulk) &&
        iov_aligned(iov, n, off)) {
        int ret = rw_loop(p->direct_fd, iov, n, off, write);
        if (ret != -EINVAL) {
            return ret;
        }
        /* The device wants a larger alignment: fall back to buffered. */
    }
    return rw_loop(p->fd, iov, n, off, write);
}

static int posix_preadv(qs_io *io, const struct iovec *iov, int n, uint64_t off)
{
    return posix_rw(io, iov, n, off, false, false);
}

static int posix_pwritev(qs_io *io, const struct iovec *iov, int n,
                         uint64_t off)
{
    return posix_rw(io, iov, n, off, true, false);
}

/* Written once, read back rarely: past the page cache where aligned, so
 * that gigabytes of VM state neither crowd the host's cache out nor cost
 * a copy into it. */
static int posix_pwritev_bulk(qs_io *io, const struct iovec *iov, int n,
                              uint64_t off)
{
    return posix_rw(io, iov, n, off, true, true);
}

static int posix_flush(qs_io *io)
{
    struct posix_io *p = to_posix(io);
    if (fdatasync(p->fd) < 0) {
        return -errno;
    }
    return 0;
}

static void posix_start_writeback(qs_io *io)
{
    /* A hint: errors show up at the next flush. */
    (void)sync_file_range(to_posix(io)->fd, 0, 0, SYNC_FILE_RANGE_WRITE);
}

static int posix_truncate(qs_io *io, uint64_t size)
{
    if (ftruncate(to_posix(io)->fd, (off_t)size) < 0) {
        return -errno;
    }
    return 0;
}

static int posix_punch(qs_io *io, uint64_t off, uint64_t len)
{
    if (fallocate(to_posix(io)->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  (off_t)off, (off_t)len) < 0) {
        return -errno;
    }
    return 0;
}

static int posix_falloc(qs_io *io, uint64_t off, uint64_t len)
{
    int r = posix_fallocate(to_posix(io)->fd, (off_t)off, (off_t)len);
    return -r;
}

static int posix_reserve(qs_io *io, uint64_t off, uint64_t len)
{
    if (fallocate(to_posix(io)->fd, 0, (off_t)off, (off_t)len) < 0) {
        return -errno;
    }
    return 0;
}

static int posix_size(qs_io *io, uint64_t *size)
{
    struct stat st;
    struct posix_io *p = to_posix(io);

    if (fstat(p->fd, &st) < 0) {
        return -errno;
    }
    if (S_ISBLK(st.st_mode)) {
        off_t end = lseek(p->fd, 0, SEEK_END);
        if (end < 0) {
            return -errno;
        }
        *size = (uint64_t)end;
        return 0;
    }
    *size = (uint64_t)st.st_size;
    return 0;
}

static int posix_disk_usage(qs_io *io, uint64_t *bytes)
{
    struct stat st;
    if (fstat(to_posix(io)->fd, &st) < 0) {
        return -errno;
    }
    *bytes = (uint64_t)st.st_blocks * 512;
    return 0;
}

static int posix_seek(qs_io *io, uint64_t off, bool hole, uint64_t *res)
{
    off_t r = lseek(to_posix(io)->fd, (off_t)off, hole ? SEEK_HOLE : SEEK_DATA);
    if (r < 0) {
        if (errno == ENXIO) {
            /* No more data past off: report the end of the file. */
            uint64_t size;
            int ret = posix_size(io, &size);
            if (ret < 0) {
                return ret;
            }
            *res = hole ? off : size;
            return 0;
        }
        return -errno;
    }
    *res = (uint64_t)r;
    return 0;
}

static void posix_close(qs_io *io)
{
    struct posix_io *p = to_posix(io);
    if (p->direct_fd >= 0) {
        close(p->direct_fd);
    }
    close(p->fd); /* drops the OFD locks too */
    free(p);
}

/*
 * The O_DIRECT twin of an open file, or -1.  A file system without
 * O_DIRECT simply gets buffered I/O; so does a path that names another
 * file by now.
 */
static int open_direct_twin(const char *path, unsigned flags,
                            const struct stat *st)
{
    int dflags = O_CLOEXEC | O_DIRECT;
    dflags |= (flags & QS_IO_RDWR) ? O_RDWR : O_RDONLY;
    int fd = open(path, dflags);
    struct stat dst;
    if (fd >= 0 && (fstat(fd, &dst) < 0 || dst.st_dev != st->st_dev ||
                    dst.st_ino != st->st_ino)) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static const struct qs_io_ops posix_ops = {
    .preadv = posix_preadv,
    .pwritev = posix_pwritev,
    .pwritev_bulk = posix_pwritev_bulk,
    .flush = posix_flush,
    .start_writeback = posix_start_writeback,
    .truncate = posix_truncate,
    .punch = posix_punch,
    .falloc = posix_falloc,
    .reserve = posix_reserve,
    .size = posix_size,
    .disk_usage = posix_disk_usage,
    .seek = posix_seek,
    .close = posix_close,
};

int qs_io_pread(qs_io *io, void *buf, size_t len, uint64_t off)
{
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    return qs_io_preadv(io, &iov, 1, off);
}

int qs_io_pwrite(qs_io *io, const void *buf, size_t len, uint64_t off)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    return qs_io_pwritev(io, &iov, 1, off);
}

/* ---------------------------------------------------------------- locks */

static int lock_byte(int fd, unsigned byte)
{
    struct flock fl = {
        .l_type = F_RDLCK,
        .l_whence = SEEK_SET,
        .l_start = byte,
        .l_len = 1,
    };
    if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
        return -errno;
    }
    return 0;
}

/* Returns 1 if another open file description holds a lock on `byte`. */
static int byte_taken(int fd, unsigned byte)
{
    struct flock fl = {
        .l_type = F_WRLCK,
        .l_whence = SEEK_SET,
        .l_start = byte,
        .l_len = 1,
    };
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
        return -errno;
    }
    return fl.l_type != F_UNLCK;
}

/*
 * Takes QEMU's lock bytes for the permissions `held` and the unshared
 * permissions `unshared` (bit masks over QS_PERM_*), then checks nobody
 * else conflicts.
 */
static int take_image_locks(int fd, const char *path, unsigned held,
                            unsigned unshared, char *err, size_t errlen)
{
    for (int bit = 0; bit < QS_PERM_COUNT; bit++) {
        int ret = 0;
        if (held & (1u << bit)) {
            ret = lock_byte(fd, QS_LOCK_PERM_BASE + bit);
        }
        if (ret == 0 && (unshared & (1u << bit))) {
            ret = lock_byte(fd, QS_LOCK_SHARED_BASE + bit);
        }
        if (ret == -EINVAL || ret == -ENOTSUP || ret == -ENOLCK) {
            return 0; /* no OFD locks on this file system: nothing to do */
        }
        if (ret < 0) {
            qs_fmt_err(err, errlen, "%s: cannot lock image: %s", path,
                       strerror(-ret));
            return ret;
        }
    }
    for (int bit = 0; bit < QS_PERM_COUNT; bit++) {
        int taken = 0;
        const char *what = NULL;
        /* Messages as QEMU words them. */
        if (held & (1u << bit)) {
            taken = byte_taken(fd, QS_LOCK_SHARED_BASE + bit);
            what = "";
        }
        if (taken == 0 && (unshared & (1u << bit))) {
            taken = byte_taken(fd, QS_LOCK_PERM_BASE + bit);
            what = "shared ";
        }
        if (taken < 0) {
            return 0;
        }
        if (taken) {
            qs_fmt_err(err, errlen,
                       "%s: Failed to get %s\"%s\" lock: is another "
                       "process using the image?",
                       path, what, perm_names[bit]);
            return -EAGAIN;
        }
    }
    return 0;
}

int qs_io_open_posix(const char *path, unsigned flags, qs_io **out, char *err,
                     size_t errlen)
{
    int oflags = O_CLOEXEC | O_NONBLOCK;
    oflags |= (flags & QS_IO_RDWR) ? O_RDWR : O_RDONLY;
    if (flags & QS_IO_CREATE) {
        oflags |= O_CREAT | ((flags & QS_IO_EXCL) ? O_EXCL : O_TRUNC);
    }

    /* O_NONBLOCK so that opening a FIFO never blocks; checked below. */
    int fd = open(path, oflags, 0644);
    if (fd < 0) {
        int e = errno;
        qs_fmt_err(err, errlen, "%s: cannot open: %s", path, strerror(e));
        return -e;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && (flags & QS_IO_REGULAR) &&
        !S_ISREG(st.st_mode)) {
        qs_fmt_err(err, errlen, "%s: not a regular file (mode 0%o)", path,
                   (unsigned)st.st_mode);
        close(fd);
        return -EINVAL;
    }
    if (fstat(fd, &st) < 0 || !(S_ISREG(st.st_mode) || S_ISBLK(st.st_mode))) {
        qs_fmt_err(err, errlen,
                   "%s: not a regular file or block device (mode 0%o)", path,
                   (unsigned)st.st_mode);
        close(fd);
        return -EINVAL;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0) {
        fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    }

    unsigned held = 1u << QS_PERM_CONSISTENT_READ;
    unsigned unshared = 0;
    if (flags & QS_IO_RDWR) {
        held |= (1u << QS_PERM_WRITE) | (1u << QS_PERM_RESIZE);
    }
    if (!(flags & QS_IO_NOLOCK)) {
        unshared = (1u << QS_PERM_WRITE) | (1u << QS_PERM_RESIZE);
    }
    int ret = take_image_locks(fd, path, held, unshared, err, errlen);
    if (ret < 0) {
        close(fd);
        return ret;
    }

    struct posix_io *p = calloc(1, sizeof(*p));
    if (!p) {
        close(fd);
        return -ENOMEM;
    }
    p->base.ops = &posix_ops;
    p->fd = fd;
    p->direct_fd = -1;
    p->direct_all = flags & QS_IO_DIRECT;
    if (flags & (QS_IO_DIRECT | QS_IO_RDWR)) {
        p->direct_fd = open_direct_twin(path, flags, &st);
    }
    *out = &p->base;
    /* Tests can ask for failures from the environment (qs_fault.h). */
    return qs_fault_env_wrap(path, out, err, errlen);
}
