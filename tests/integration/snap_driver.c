/*
 * snap_driver.c - a test driver for snapshots, checkpoints and VM state.
 *
 * The snapshot_*.sh and vmstate.sh integration scripts use it for what the
 * command line tools cannot do.  Two kinds of commands:
 *
 *   File commands parse and patch qcow2 files themselves, without
 *   libqsnap, so they are an independent reading of the format:
 *     poke, peek, flip      big-endian integers and single bytes
 *     layout                header and snapshot table as key=value lines
 *     refcounted            how many host clusters have a refcount > 0
 *     vmpatch               damage a snapshot's VM state section container
 *
 *   API commands drive the public interface as a VMM would:
 *     view-dump             a snapshot's disk read through a qsnap_view
 *     section-read          one VM state section into a file
 *     bigstate              a checkpoint with a huge, mostly zero memory
 *                           section streamed from a generator, then
 *                           read back at random offsets
 *     abort, hold           a checkpoint aborted, or left open until the
 *                           process is killed
 *     race                  views read while other threads write the live
 *                           disk and take snapshots
 *
 * Exit status: 0 success, 1 failure, 2 usage, 3 the request does not apply
 * to this image (e.g. no stored chunk to damage).
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <xxhash.h>

#include <qsnap.h>

#include "driver_util.h"

#define PROG "snap-driver"

const char drv_prog[] = PROG;
#define PIECE (1024u * 1024u)
#define EXIT_NA 3

/* ------------------------------------------------------------------ */
/* Small helpers                                                      */
/* ------------------------------------------------------------------ */

static uint64_t be_load(const uint8_t *p, unsigned width)
{
    uint64_t v = 0;

    for (unsigned i = 0; i < width; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

static void be_store(uint8_t *p, unsigned width, uint64_t v)
{
    for (unsigned i = width; i > 0; i--) {
        p[i - 1] = (uint8_t)v;
        v >>= 8;
    }
}

/* Whole-range pread/pwrite on a host file; false (with a message) if not. */
static bool read_at(int fd, void *buf, size_t len, uint64_t off,
                    const char *path)
{
    uint8_t *p = buf;

    while (len > 0) {
        const ssize_t n = pread(fd, p, len, (off_t)off);
        if (n <= 0) {
            msg("%s: cannot read %zu bytes at 0x%" PRIx64 ": %s", path, len,
                off, n < 0 ? strerror(errno) : "end of file");
            return false;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return true;
}

static bool write_at(int fd, const void *buf, size_t len, uint64_t off,
                     const char *path)
{
    const uint8_t *p = buf;

    while (len > 0) {
        const ssize_t n = pwrite(fd, p, len, (off_t)off);
        if (n <= 0) {
            msg("%s: cannot write at 0x%" PRIx64 ": %s", path, off,
                strerror(errno));
            return false;
        }
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return true;
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* A per-thread PRNG. */
static uint64_t rng_next(uint64_t *state)
{
    *state += 0x9E3779B97F4A7C15ull;
    return splitmix64(*state);
}

/*
 * Deterministic content: byte `off` of the stream named by `seed`.  Fills
 * buf with bytes [off, off + len).
 */
static void gen_fill(uint64_t seed, uint64_t off, void *buf, size_t len)
{
    uint8_t *p = buf;

    while (len > 0) {
        const uint64_t word =
            splitmix64(seed ^ (off / 8) * 0xD6E8FEB86659FD93ull);
        const unsigned skip = (unsigned)(off % 8);
        unsigned n = 8 - skip;
        uint8_t bytes[8];

        be_store(bytes, 8, word);
        if (n > len) {
            n = (unsigned)len;
        }
        memcpy(p, bytes + skip, n);
        p += n;
        off += n;
        len -= n;
    }
}

/*
 * A guest memory image: 4 KiB pages, one in 128 holding data (half of
 * those incompressible, half text-like), all others zero.
 */
#define MEM_PAGE 4096u

static void mem_fill(uint64_t seed, uint64_t off, void *buf, size_t len)
{
    uint8_t *p = buf;

    while (len > 0) {
        const uint64_t page = off / MEM_PAGE;
        const uint64_t in_page = off % MEM_PAGE;
        size_t n = MEM_PAGE - in_page;
        const uint64_t h = splitmix64(seed + page * 0x2545F4914F6CDD1Dull);

        if (n > len) {
            n = len;
        }
        if (h % 128 != 0) {
            memset(p, 0, n);
        } else if ((h >> 8) & 1) {
            gen_fill(seed ^ h, off, p, n);
        } else {
            for (size_t i = 0; i < n; i++) {
                const uint64_t o = in_page + i;
                p[i] = (uint8_t)("page of guest memory "[o % 21] + (page & 7));
            }
        }
        p += n;
        off += n;
        len -= n;
    }
}

static double now_sec(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Opens a qcow2 image; NULL (with a message naming it) on failure. */
static qsnap_image *open_qcow2(const char *path, unsigned flags)
{
    struct qsnap_open_opts opts;
    qsnap_image *img = NULL;
    char err[512] = "";
    int ret;

    qsnap_open_opts_init(&opts);
    opts.flags = flags;
    opts.format = QSNAP_FMT_QCOW2;
    ret = qsnap_open(path, &opts, &img, err, sizeof(err));
    if (ret < 0) {
        msg("cannot open %s: %s (%s)", path, err, qsnap_strerror(ret));
        return NULL;
    }
    return img;
}

static int close_qcow2(qsnap_image *img, const char *path)
{
    const int ret = qsnap_close(img);

    if (ret < 0) {
        msg("closing %s failed: %s", path, qsnap_strerror(ret));
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* poke, peek, flip                                                   */
/* ------------------------------------------------------------------ */

static int cmd_poke(int argc, char **argv)
{
    uint8_t buf[8];
    uint64_t off;
    uint64_t width;
    uint64_t value;
    int fd;
    bool ok;

    if (argc != 5) {
        msg("usage: poke FILE OFFSET WIDTH VALUE");
        return 2;
    }
    off = need_size("offset", argv[2]);
    width = need_size("width", argv[3]);
    value = need_size("value", argv[4]);
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        msg("width must be 1, 2, 4 or 8");
        return 2;
    }
    fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        msg("%s: %s", argv[1], strerror(errno));
        return 1;
    }
    be_store(buf, (unsigned)width, value);
    ok = write_at(fd, buf, (size_t)width, off, argv[1]);
    close(fd);
    return ok ? 0 : 1;
}

static int cmd_peek(int argc, char **argv)
{
    uint8_t buf[8];
    uint64_t off;
    uint64_t width;
    int fd;
    bool ok;

    if (argc != 4) {
        msg("usage: peek FILE OFFSET WIDTH");
        return 2;
    }
    off = need_size("offset", argv[2]);
    width = need_size("width", argv[3]);
    if (width != 1 && width != 2 && width != 4 && width != 8) {
        msg("width must be 1, 2, 4 or 8");
        return 2;
    }
    fd = open(argv[1], O_RDONLY);
    if (fd < 0) {
        msg("%s: %s", argv[1], strerror(errno));
        return 1;
    }
    ok = read_at(fd, buf, (size_t)width, off, argv[1]);
    close(fd);
    if (ok) {
        printf("%" PRIu64 "\n", be_load(buf, (unsigned)width));
    }
    return ok ? 0 : 1;
}

static int cmd_flip(int argc, char **argv)
{
    uint8_t b;
    uint64_t off;
    int fd;
    bool ok;

    if (argc != 3) {
        msg("usage: flip FILE OFFSET");
        return 2;
    }
    off = need_size("offset", argv[2]);
    fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        msg("%s: %s", argv[1], strerror(errno));
        return 1;
    }
    ok = read_at(fd, &b, 1, off, argv[1]);
    if (ok) {
        b ^= 0xFF;
        ok = write_at(fd, &b, 1, off, argv[1]);
    }
    close(fd);
    return ok ? 0 : 1;
}

/* ------------------------------------------------------------------ */
/* An independent qcow2 reader                                        */
/* ------------------------------------------------------------------ */

#define QCOW_MAGIC 0x514649FBu
#define OFF_MASK 0x00FFFFFFFFFFFE00ull
#define L2E_COMPRESSED (1ull << 62)
#define L2E_ZERO 1ull
#define MAX_SNAPSHOTS 65536u

struct snap_entry {
    uint64_t entry_off; /* where the entry starts in the file */
    uint64_t l1_off;
    uint32_t l1_size;
    uint32_t extra_size;
    uint64_t vm_state_size;
    uint64_t disk_size;
    char id[256];
    char name[1024];
};

struct qfile {
    const char *path;
    int fd;
    uint64_t file_size;
    uint32_t version;
    unsigned cluster_bits;
    uint64_t cluster_size;
    uint64_t size;
    uint32_t l1_size;
    uint64_t l1_off;
    uint64_t rt_off;
    uint32_t rt_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_off;
    uint64_t incompat;
    unsigned refcount_order;
    struct snap_entry *snaps;
    uint32_t n_snaps;
};

static void qfile_close(struct qfile *q)
{
    if (q->fd >= 0) {
        close(q->fd);
    }
    free(q->snaps);
    q->snaps = NULL;
    q->fd = -1;
}

/* Reads the header and the snapshot table; false with a message if bad. */
static bool qfile_open(struct qfile *q, const char *path, bool rw)
{
    uint8_t h[104];
    struct stat st;
    uint64_t pos;

    memset(q, 0, sizeof(*q));
    q->path = path;
    q->fd = open(path, rw ? O_RDWR : O_RDONLY);
    if (q->fd < 0) {
        msg("%s: %s", path, strerror(errno));
        return false;
    }
    if (fstat(q->fd, &st) < 0) {
        msg("%s: %s", path, strerror(errno));
        goto fail;
    }
    q->file_size = (uint64_t)st.st_size;
    memset(h, 0, sizeof(h));
    if (!read_at(q->fd, h, 72, 0, path)) {
        goto fail;
    }
    if (be_load(h, 4) != QCOW_MAGIC) {
        msg("%s: not a qcow2 image", path);
        goto fail;
    }
    q->version = (uint32_t)be_load(h + 4, 4);
    q->cluster_bits = (unsigned)be_load(h + 20, 4);
    if (q->cluster_bits < 9 || q->cluster_bits > 21) {
        msg("%s: cluster_bits %u", path, q->cluster_bits);
        goto fail;
    }
    q->cluster_size = 1ull << q->cluster_bits;
    q->size = be_load(h + 24, 8);
    q->l1_size = (uint32_t)be_load(h + 36, 4);
    q->l1_off = be_load(h + 40, 8);
    q->rt_off = be_load(h + 48, 8);
    q->rt_clusters = (uint32_t)be_load(h + 56, 4);
    q->nb_snapshots = (uint32_t)be_load(h + 60, 4);
    q->snapshots_off = be_load(h + 64, 8);
    q->refcount_order = 4;
    if (q->version >= 3) {
        if (!read_at(q->fd, h + 72, 32, 72, path)) {
            goto fail;
        }
        q->incompat = be_load(h + 72, 8);
        q->refcount_order = (unsigned)be_load(h + 96, 4);
        if (q->refcount_order > 6) {
            msg("%s: refcount_order %u", path, q->refcount_order);
            goto fail;
        }
    }
    if (q->nb_snapshots > MAX_SNAPSHOTS) {
        msg("%s: %u snapshots", path, q->nb_snapshots);
        goto fail;
    }
    q->snaps = calloc(q->nb_snapshots ? q->nb_snapshots : 1, sizeof(*q->snaps));
    if (!q->snaps) {
        msg("out of memory");
        goto fail;
    }
    pos = q->snapshots_off;
    for (uint32_t i = 0; i < q->nb_snapshots; i++) {
        struct snap_entry *e = &q->snaps[i];
        uint8_t eh[40];
        uint8_t extra[16];
        unsigned id_len;
        unsigned name_len;

        e->entry_off = pos;
        if (!read_at(q->fd, eh, sizeof(eh), pos, path)) {
            goto fail;
        }
        e->l1_off = be_load(eh, 8);
        e->l1_size = (uint32_t)be_load(eh + 8, 4);
        id_len = (unsigned)be_load(eh + 12, 2);
        name_len = (unsigned)be_load(eh + 14, 2);
        e->vm_state_size = be_load(eh + 32, 4);
        e->extra_size = (uint32_t)be_load(eh + 36, 4);
        e->disk_size = q->size;
        if (e->extra_size > 1024 || id_len >= sizeof(e->id) ||
            name_len >= sizeof(e->name)) {
            msg("%s: snapshot entry %u at 0x%" PRIx64 " is not plausible", path,
                i, pos);
            goto fail;
        }
        memset(extra, 0, sizeof(extra));
        if (e->extra_size > 0 &&
            !read_at(q->fd, extra, e->extra_size < 16 ? e->extra_size : 16,
                     pos + 40, path)) {
            goto fail;
        }
        if (e->extra_size >= 8) {
            e->vm_state_size = be_load(extra, 8);
        }
        if (e->extra_size >= 16) {
            e->disk_size = be_load(extra + 8, 8);
        }
        pos += 40 + e->extra_size;
        if (!read_at(q->fd, e->id, id_len, pos, path) ||
            !read_at(q->fd, e->name, name_len, pos + id_len, path)) {
            goto fail;
        }
        pos += id_len + name_len;
        pos = (pos + 7) & ~7ull;
        q->n_snaps++;
    }
    return true;
fail:
    qfile_close(q);
    return false;
}

static const struct snap_entry *qfile_snapshot(const struct qfile *q,
                                               const char *name)
{
    for (uint32_t i = 0; i < q->n_snaps; i++) {
        if (strcmp(q->snaps[i].name, name) == 0) {
            return &q->snaps[i];
        }
    }
    msg("%s: no snapshot named '%s'", q->path, name);
    return NULL;
}

/*
 * Host offset of the guest byte `guest_off` in the snapshot's disk (its
 * L1 table), or 0 if it is not stored in a data cluster of this file.
 */
static bool qfile_map(const struct qfile *q, const struct snap_entry *e,
                      uint64_t guest_off, uint64_t *host_off)
{
    const uint64_t l2_entries = q->cluster_size / 8;
    const uint64_t l1_idx = (guest_off >> q->cluster_bits) / l2_entries;
    const uint64_t l2_idx = (guest_off >> q->cluster_bits) % l2_entries;
    uint8_t b[8];
    uint64_t l1e;
    uint64_t l2e;

    *host_off = 0;
    if (l1_idx >= e->l1_size) {
        return true;
    }
    if (!read_at(q->fd, b, 8, e->l1_off + l1_idx * 8, q->path)) {
        return false;
    }
    l1e = be_load(b, 8) & OFF_MASK;
    if (l1e == 0) {
        return true;
    }
    if (!read_at(q->fd, b, 8, l1e + l2_idx * 8, q->path)) {
        return false;
    }
    l2e = be_load(b, 8);
    if (l2e & L2E_COMPRESSED) {
        msg("%s: guest offset 0x%" PRIx64 " is compressed", q->path, guest_off);
        return false;
    }
    if ((l2e & OFF_MASK) == 0) {
        return true;
    }
    *host_off = (l2e & OFF_MASK) + (guest_off & (q->cluster_size - 1));
    return true;
}

/* Reads or writes the snapshot's guest bytes, cluster by cluster. */
static bool qfile_guest_io(const struct qfile *q, const struct snap_entry *e,
                           void *buf, size_t len, uint64_t guest_off,
                           bool write)
{
    uint8_t *p = buf;

    while (len > 0) {
        const uint64_t in_cl = guest_off & (q->cluster_size - 1);
        size_t n = (size_t)(q->cluster_size - in_cl);
        uint64_t host;

        if (n > len) {
            n = len;
        }
        if (!qfile_map(q, e, guest_off, &host)) {
            return false;
        }
        if (host == 0) {
            if (write) {
                msg("%s: guest offset 0x%" PRIx64 " is not allocated", q->path,
                    guest_off);
                return false;
            }
            memset(p, 0, n);
        } else if (write ? !write_at(q->fd, p, n, host, q->path)
                         : !read_at(q->fd, p, n, host, q->path)) {
            return false;
        }
        p += n;
        len -= n;
        guest_off += n;
    }
    return true;
}

static int cmd_layout(int argc, char **argv)
{
    struct qfile q;

    if (argc != 2) {
        msg("usage: layout FILE");
        return 2;
    }
    if (!qfile_open(&q, argv[1], false)) {
        return 1;
    }
    printf("version=%u\ncluster_size=%" PRIu64 "\nsize=%" PRIu64 "\n"
           "l1_offset=%" PRIu64 "\nl1_size=%u\n"
           "refcount_table_offset=%" PRIu64 "\nrefcount_bits=%u\n"
           "nb_snapshots=%u\nsnapshots_offset=%" PRIu64 "\n"
           "file_size=%" PRIu64 "\n",
           q.version, q.cluster_size, q.size, q.l1_off, q.l1_size, q.rt_off,
           1u << q.refcount_order, q.nb_snapshots, q.snapshots_off,
           q.file_size);
    for (uint32_t i = 0; i < q.n_snaps; i++) {
        const struct snap_entry *e = &q.snaps[i];
        printf("snap.%u.offset=%" PRIu64 "\nsnap.%u.l1_offset=%" PRIu64 "\n"
               "snap.%u.l1_size=%u\nsnap.%u.extra_size=%u\n"
               "snap.%u.id=%s\nsnap.%u.name=%s\n"
               "snap.%u.vm_state_size=%" PRIu64 "\n"
               "snap.%u.disk_size=%" PRIu64 "\n",
               i, e->entry_off, i, e->l1_off, i, e->l1_size, i, e->extra_size,
               i, e->id, i, e->name, i, e->vm_state_size, i, e->disk_size);
    }
    qfile_close(&q);
    return 0;
}

/* Counts host clusters whose refcount is not zero, from the raw tables. */
static int cmd_refcounted(int argc, char **argv)
{
    struct qfile q;
    uint8_t *table = NULL;
    uint8_t *block = NULL;
    uint64_t n_ref = 0;
    uint64_t max_ref = 0;
    uint64_t rt_bytes;
    uint64_t per_block;
    unsigned bits;
    int rc = 1;

    if (argc != 2) {
        msg("usage: refcounted FILE");
        return 2;
    }
    if (!qfile_open(&q, argv[1], false)) {
        return 1;
    }
    bits = 1u << q.refcount_order;
    per_block = q.cluster_size * 8 / bits;
    rt_bytes = (uint64_t)q.rt_clusters * q.cluster_size;
    if (rt_bytes > 64ull << 20) {
        msg("%s: refcount table of %" PRIu64 " bytes", argv[1], rt_bytes);
        goto out;
    }
    table = xmalloc((size_t)rt_bytes);
    block = xmalloc((size_t)q.cluster_size);
    if (!read_at(q.fd, table, (size_t)rt_bytes, q.rt_off, argv[1])) {
        goto out;
    }
    for (uint64_t t = 0; t < rt_bytes / 8; t++) {
        const uint64_t rb = be_load(table + t * 8, 8) & OFF_MASK;
        if (rb == 0) {
            continue;
        }
        if (!read_at(q.fd, block, (size_t)q.cluster_size, rb, argv[1])) {
            goto out;
        }
        for (uint64_t i = 0; i < per_block; i++) {
            uint64_t v;
            if (bits >= 8) {
                v = be_load(block + i * (bits / 8), bits / 8);
            } else {
                v = (block[i * bits / 8] >> ((i * bits) % 8)) &
                    ((1u << bits) - 1);
            }
            if (v != 0) {
                n_ref++;
                max_ref = t * per_block + i + 1;
            }
        }
    }
    printf("referenced_clusters=%" PRIu64 "\ncluster_size=%" PRIu64 "\n"
           "referenced_bytes=%" PRIu64 "\nreferenced_end=%" PRIu64 "\n",
           n_ref, q.cluster_size, n_ref * q.cluster_size,
           max_ref * q.cluster_size);
    rc = 0;
out:
    free(table);
    free(block);
    qfile_close(&q);
    return rc;
}

/* ------------------------------------------------------------------ */
/* vmpatch: damage a VM state section container                       */
/* ------------------------------------------------------------------ */

#define VMS_MAGIC "QSNAPVMS"
#define VMS_SB 64u
#define REC_SIZE 24u

struct vsec {
    uint64_t rec_off; /* offset of the record in the directory */
    char name[256];
    uint64_t size;
    uint64_t n_chunks;
    uint64_t chunks_off; /* offset of its chunk records in the directory */
};

struct container {
    uint64_t base; /* guest offset of the VM state area */
    uint8_t sb[VMS_SB];
    uint8_t *dir;
    uint64_t dir_off;
    uint64_t dir_size;
    struct vsec *secs;
    uint32_t n_secs;
};

static bool container_read(const struct qfile *q, const struct snap_entry *e,
                           struct container *c)
{
    const uint64_t span = q->cluster_size * (q->cluster_size / 8);
    uint64_t pos = 0;

    memset(c, 0, sizeof(*c));
    c->base = (e->disk_size + span - 1) / span * span;
    if (!qfile_guest_io(q, e, c->sb, VMS_SB, c->base, false)) {
        return false;
    }
    if (memcmp(c->sb, VMS_MAGIC, 8) != 0) {
        msg("%s: snapshot '%s' holds no section container", q->path, e->name);
        return false;
    }
    c->n_secs = (uint32_t)be_load(c->sb + 16, 4);
    c->dir_off = be_load(c->sb + 24, 8);
    c->dir_size = be_load(c->sb + 32, 8);
    if (c->n_secs > 65536 || c->dir_size > (64ull << 20) ||
        c->dir_off + c->dir_size > e->vm_state_size) {
        msg("%s: container superblock not plausible", q->path);
        return false;
    }
    c->dir = xmalloc((size_t)c->dir_size);
    c->secs = calloc(c->n_secs ? c->n_secs : 1, sizeof(*c->secs));
    if (!c->secs || !qfile_guest_io(q, e, c->dir, (size_t)c->dir_size,
                                    c->base + c->dir_off, false)) {
        return false;
    }
    for (uint32_t i = 0; i < c->n_secs; i++) {
        struct vsec *s = &c->secs[i];
        unsigned name_len;

        if (pos + 32 > c->dir_size) {
            msg("%s: directory too short", q->path);
            return false;
        }
        s->rec_off = pos;
        name_len = (unsigned)be_load(c->dir + pos, 2);
        s->size = be_load(c->dir + pos + 8, 8);
        s->n_chunks = be_load(c->dir + pos + 16, 8);
        pos += 32;
        if (name_len == 0 || pos + name_len > c->dir_size) {
            msg("%s: bad section name length", q->path);
            return false;
        }
        memcpy(s->name, c->dir + pos, name_len);
        s->name[name_len] = '\0';
        pos += (name_len + 7u) & ~7u;
        s->chunks_off = pos;
        if (s->n_chunks > (c->dir_size - pos) / REC_SIZE) {
            msg("%s: section '%s' has too many chunks", q->path, s->name);
            return false;
        }
        pos += s->n_chunks * REC_SIZE;
    }
    return true;
}

static void container_free(struct container *c)
{
    free(c->dir);
    free(c->secs);
}

/* Recomputes every hash over the (changed) directory and superblock. */
static void container_rehash(struct container *c)
{
    for (uint32_t i = 0; i < c->n_secs; i++) {
        const struct vsec *s = &c->secs[i];
        const uint64_t size = be_load(c->dir + s->rec_off + 8, 8);
        uint64_t n_chunks = be_load(c->dir + s->rec_off + 16, 8);

        if (n_chunks > s->n_chunks) {
            n_chunks = s->n_chunks;
        }
        be_store(
            c->dir + s->rec_off + 24, 8,
            XXH64(c->dir + s->chunks_off, (size_t)(n_chunks * REC_SIZE), size));
    }
    be_store(c->sb + 40, 8, XXH64(c->dir, (size_t)c->dir_size, 0));
    be_store(c->sb + 56, 8, XXH64(c->sb, 56, 0));
}

static bool container_write(const struct qfile *q, const struct snap_entry *e,
                            struct container *c)
{
    return qfile_guest_io(q, e, c->sb, VMS_SB, c->base, true) &&
           qfile_guest_io(q, e, c->dir, (size_t)c->dir_size,
                          c->base + c->dir_off, true);
}

static const struct vsec *find_section(const struct container *c,
                                       const char *name)
{
    for (uint32_t i = 0; i < c->n_secs; i++) {
        if (strcmp(c->secs[i].name, name) == 0) {
            return &c->secs[i];
        }
    }
    msg("no section '%s'", name);
    return NULL;
}

static int vmpatch_usage(void)
{
    msg("usage: vmpatch FILE SNAPSHOT chunk SECTION INDEX\n"
        "       vmpatch FILE SNAPSHOT chunk-data SECTION\n"
        "       vmpatch FILE SNAPSHOT size SECTION VALUE\n"
        "       vmpatch FILE SNAPSHOT chunk-off SECTION INDEX VALUE\n"
        "       vmpatch FILE SNAPSHOT chunk-len SECTION INDEX VALUE\n"
        "       vmpatch FILE SNAPSHOT n-sections VALUE\n"
        "       vmpatch FILE SNAPSHOT dir-size VALUE\n"
        "       vmpatch FILE SNAPSHOT dir");
    return 2;
}

/*
 * vmpatch FILE SNAPSHOT WHAT...: damages the container of a snapshot's VM
 * state in place.  `chunk` flips a byte inside a stored chunk (kind zstd
 * or raw; prints the chunk index, or with INDEX that chunk); `chunk-data`
 * the first stored chunk of SECTION; `dir` flips a directory byte (the
 * checksums then disagree); the others change one field and recompute
 * every hash, so only a consistency check can catch them.
 */
static int cmd_vmpatch(int argc, char **argv)
{
    struct qfile q;
    struct container c;
    const struct snap_entry *e;
    const struct vsec *s = NULL;
    const char *what;
    int rc = 1;

    if (argc < 4) {
        return vmpatch_usage();
    }
    what = argv[3];
    if (!qfile_open(&q, argv[1], true)) {
        return 1;
    }
    memset(&c, 0, sizeof(c));
    e = qfile_snapshot(&q, argv[2]);
    if (!e || !container_read(&q, e, &c)) {
        goto out;
    }
    if (strcmp(what, "chunk") == 0 || strcmp(what, "chunk-data") == 0) {
        uint64_t want = UINT64_MAX;
        const bool by_index = strcmp(what, "chunk") == 0;
        if (argc != (by_index ? 6 : 5)) {
            rc = vmpatch_usage();
            goto out;
        }
        s = find_section(&c, argv[4]);
        if (!s) {
            goto out;
        }
        if (by_index) {
            want = need_size("chunk index", argv[5]);
        }
        for (uint64_t k = 0; k < s->n_chunks; k++) {
            const uint8_t *r = c.dir + s->chunks_off + k * REC_SIZE;
            const uint64_t off = be_load(r, 8);
            const uint64_t len = be_load(r + 8, 4);
            uint8_t b;

            if ((want != UINT64_MAX && k != want) || len == 0) {
                continue;
            }
            if (!qfile_guest_io(&q, e, &b, 1, c.base + off + len / 2, false)) {
                goto out;
            }
            b ^= 0x5A;
            if (!qfile_guest_io(&q, e, &b, 1, c.base + off + len / 2, true)) {
                goto out;
            }
            printf("%" PRIu64 "\n", k);
            rc = 0;
            goto out;
        }
        msg("section '%s' has no such stored chunk", s->name);
        rc = EXIT_NA;
        goto out;
    } else if (strcmp(what, "dir") == 0 && argc == 4) {
        c.dir[c.dir_size / 2] ^= 0x5A;
    } else if (strcmp(what, "size") == 0 && argc == 6) {
        s = find_section(&c, argv[4]);
        if (!s) {
            goto out;
        }
        be_store(c.dir + s->rec_off + 8, 8, need_size("value", argv[5]));
        container_rehash(&c);
    } else if ((strcmp(what, "chunk-off") == 0 ||
                strcmp(what, "chunk-len") == 0) &&
               argc == 7) {
        const uint64_t k = need_size("chunk index", argv[5]);
        uint8_t *r;
        s = find_section(&c, argv[4]);
        if (!s) {
            goto out;
        }
        if (k >= s->n_chunks) {
            msg("section '%s' has %" PRIu64 " chunks", s->name, s->n_chunks);
            rc = EXIT_NA;
            goto out;
        }
        r = c.dir + s->chunks_off + k * REC_SIZE;
        if (what[6] == 'o') {
            be_store(r, 8, need_size("value", argv[6]));
        } else {
            be_store(r + 8, 4, need_size("value", argv[6]));
        }
        container_rehash(&c);
    } else if (strcmp(what, "n-sections") == 0 && argc == 5) {
        be_store(c.sb + 16, 4, need_size("value", argv[4]));
        container_rehash(&c);
    } else if (strcmp(what, "dir-size") == 0 && argc == 5) {
        be_store(c.sb + 32, 8, need_size("value", argv[4]));
        be_store(c.sb + 56, 8, XXH64(c.sb, 56, 0));
    } else {
        rc = vmpatch_usage();
        goto out;
    }
    rc = container_write(&q, e, &c) ? 0 : 1;
out:
    container_free(&c);
    qfile_close(&q);
    return rc;
}

/* ------------------------------------------------------------------ */
/* view-dump, section-read                                            */
/* ------------------------------------------------------------------ */

static int cmd_view_dump(int argc, char **argv)
{
    qsnap_image *img;
    qsnap_view *view = NULL;
    uint8_t *buf = NULL;
    uint64_t size;
    int fd = -1;
    int ret;
    int rc = 1;

    if (argc != 4) {
        msg("usage: view-dump IMAGE SNAPSHOT OUT");
        return 2;
    }
    img = open_qcow2(argv[1], QSNAP_OPEN_FORCE_SHARE);
    if (!img) {
        return 1;
    }
    ret = qsnap_view_open(img, argv[2], &view);
    if (ret < 0) {
        msg("view of '%s' in %s: %s (%s)", argv[2], argv[1], qsnap_errmsg(img),
            qsnap_strerror(ret));
        goto out;
    }
    fd = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        msg("%s: %s", argv[3], strerror(errno));
        goto out;
    }
    size = qsnap_view_size(view);
    buf = xmalloc(PIECE);
    for (uint64_t off = 0; off < size; off += PIECE) {
        const size_t n = size - off < PIECE ? (size_t)(size - off) : PIECE;
        ret = qsnap_view_pread(view, buf, n, off);
        if (ret < 0) {
            msg("view of '%s' in %s: read at 0x%" PRIx64 ": %s (%s)", argv[2],
                argv[1], off, qsnap_errmsg(img), qsnap_strerror(ret));
            goto out;
        }
        if (!write_at(fd, buf, n, off, argv[3])) {
            goto out;
        }
    }
    if (ftruncate(fd, (off_t)size) < 0) {
        msg("%s: %s", argv[3], strerror(errno));
        goto out;
    }
    rc = 0;
out:
    free(buf);
    if (fd >= 0) {
        close(fd);
    }
    if (view) {
        qsnap_view_close(view);
    }
    if (close_qcow2(img, argv[1])) {
        rc = 1;
    }
    return rc;
}

static int cmd_section_read(int argc, char **argv)
{
    qsnap_image *img;
    qsnap_vmstate *vs = NULL;
    struct qsnap_section_info *list = NULL;
    const struct qsnap_section_info *sec = NULL;
    uint8_t *buf = NULL;
    uint32_t count = 0;
    int fd = -1;
    int ret;
    int rc = 1;

    if (argc != 5) {
        msg("usage: section-read IMAGE SNAPSHOT SECTION OUT");
        return 2;
    }
    img = open_qcow2(argv[1], QSNAP_OPEN_FORCE_SHARE);
    if (!img) {
        return 1;
    }
    ret = qsnap_vmstate_open(img, argv[2], &vs);
    if (ret < 0) {
        msg("VM state of '%s' in %s: %s (%s)", argv[2], argv[1],
            qsnap_errmsg(img), qsnap_strerror(ret));
        goto out;
    }
    ret = qsnap_vmstate_sections(vs, &list, &count);
    if (ret < 0) {
        msg("sections of '%s' in %s: %s (%s)", argv[2], argv[1],
            qsnap_vmstate_errmsg(vs), qsnap_strerror(ret));
        goto out;
    }
    for (uint32_t i = 0; i < count; i++) {
        if (strcmp(list[i].name, argv[3]) == 0) {
            sec = &list[i];
        }
    }
    if (!sec) {
        msg("%s: snapshot '%s' has no section '%s'", argv[1], argv[2], argv[3]);
        goto out;
    }
    fd = open(argv[4], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        msg("%s: %s", argv[4], strerror(errno));
        goto out;
    }
    buf = xmalloc(PIECE);
    for (uint64_t off = 0; off < sec->size; off += PIECE) {
        const size_t n =
            sec->size - off < PIECE ? (size_t)(sec->size - off) : PIECE;
        ret = qsnap_vmstate_section_pread(vs, sec->name, buf, n, off);
        if (ret < 0) {
            msg("reading section '%s' at 0x%" PRIx64 ": %s (%s)", sec->name,
                off, qsnap_vmstate_errmsg(vs), qsnap_strerror(ret));
            goto out;
        }
        if (!write_at(fd, buf, n, off, argv[4])) {
            goto out;
        }
    }
    rc = 0;
out:
    free(buf);
    free(list);
    if (fd >= 0) {
        close(fd);
    }
    if (vs) {
        qsnap_vmstate_close(vs);
    }
    if (close_qcow2(img, argv[1])) {
        rc = 1;
    }
    return rc;
}

/* ------------------------------------------------------------------ */
/* Checkpoints: bigstate, abort, hold                                 */
/* ------------------------------------------------------------------ */

static int ck_fail(qsnap_image *img, const char *what, int ret)
{
    msg("%s: %s (%s)", what, qsnap_errmsg(img), qsnap_strerror(ret));
    return 1;
}

/* Streams `size` bytes of content (generator `fill`) into a section. */
static int write_section(qsnap_image *img, qsnap_checkpoint *ck,
                         const char *name, uint64_t size, uint64_t seed,
                         void (*fill)(uint64_t, uint64_t, void *, size_t))
{
    /* Odd piece sizes, so writes straddle the container's chunks. */
    static const size_t pieces[] = {PIECE + 4093, 65536 + 1, PIECE * 2, 777};
    uint8_t *buf = xmalloc(PIECE * 2 + 4093);
    uint64_t off = 0;
    unsigned k = 0;
    int ret;

    ret = qsnap_checkpoint_section_begin(ck, name);
    if (ret < 0) {
        free(buf);
        return ck_fail(img, "section begin", ret);
    }
    while (off < size) {
        size_t n = pieces[k++ % 4];
        if (n > size - off) {
            n = (size_t)(size - off);
        }
        fill(seed, off, buf, n);
        ret = qsnap_checkpoint_section_write(ck, buf, n);
        if (ret < 0) {
            free(buf);
            return ck_fail(img, "section write", ret);
        }
        off += n;
    }
    free(buf);
    ret = qsnap_checkpoint_section_end(ck);
    return ret < 0 ? ck_fail(img, "section end", ret) : 0;
}

/* Reads `len` bytes of a section at `off` and compares with the generator. */
static bool check_section(qsnap_vmstate *vs, const char *name, uint64_t seed,
                          void (*fill)(uint64_t, uint64_t, void *, size_t),
                          uint64_t off, size_t len, uint8_t *buf, uint8_t *want)
{
    const int ret = qsnap_vmstate_section_pread(vs, name, buf, len, off);

    if (ret < 0) {
        msg("section '%s' read 0x%" PRIx64 "+0x%zx: %s (%s)", name, off, len,
            qsnap_vmstate_errmsg(vs), qsnap_strerror(ret));
        return false;
    }
    fill(seed, off, want, len);
    for (size_t i = 0; i < len; i++) {
        if (buf[i] != want[i]) {
            msg("section '%s': byte 0x%" PRIx64 " reads 0x%02x, written "
                "0x%02x",
                name, off + i, buf[i], want[i]);
            return false;
        }
    }
    return true;
}

/*
 * bigstate IMAGE NAME SIZE SEED SAMPLES: a checkpoint whose "memory"
 * section is SIZE bytes of mostly zero pages and whose "cpu" section is a
 * few KiB, streamed from generators (nothing that size is ever held in
 * memory or on disk); then SAMPLES reads at random offsets compared with
 * the generators.  Prints the sizes the library reports.
 */
static int cmd_bigstate(int argc, char **argv)
{
    const uint64_t cpu_size = 4096 * 3 + 17;
    const size_t max_read = 300000;
    qsnap_image *img;
    qsnap_checkpoint *ck = NULL;
    qsnap_vmstate *vs = NULL;
    struct qsnap_section_info *list = NULL;
    uint32_t count = 0;
    uint64_t size;
    uint64_t seed;
    uint64_t samples;
    uint64_t rng;
    uint64_t stored = 0;
    uint8_t *buf = NULL;
    uint8_t *want = NULL;
    double t0;
    int ret;
    int rc = 1;

    if (argc != 6) {
        msg("usage: bigstate IMAGE NAME SIZE SEED SAMPLES");
        return 2;
    }
    size = need_size("size", argv[3]);
    seed = need_size("seed", argv[4]);
    samples = need_size("samples", argv[5]);
    rng = seed;
    img = open_qcow2(argv[1], QSNAP_OPEN_RDWR);
    if (!img) {
        return 1;
    }
    t0 = now_sec();
    ret = qsnap_checkpoint_begin(img, argv[2], NULL, QSNAP_CHECKPOINT_SECTIONS,
                                 &ck);
    if (ret < 0) {
        rc = ck_fail(img, "checkpoint begin", ret);
        goto out;
    }
    if (write_section(img, ck, "cpu", cpu_size, seed + 1, gen_fill) ||
        write_section(img, ck, "memory", size, seed, mem_fill)) {
        qsnap_checkpoint_abort(ck);
        goto out;
    }
    ret = qsnap_checkpoint_commit(ck);
    if (ret < 0) {
        rc = ck_fail(img, "checkpoint commit", ret);
        goto out;
    }
    printf("save_seconds=%.2f\n", now_sec() - t0);

    ret = qsnap_vmstate_open(img, argv[2], &vs);
    if (ret < 0) {
        rc = ck_fail(img, "VM state open", ret);
        goto out;
    }
    ret = qsnap_vmstate_sections(vs, &list, &count);
    if (ret < 0 || count != 2) {
        msg("%s: %u sections: %s", argv[1], count, qsnap_vmstate_errmsg(vs));
        goto out;
    }
    for (uint32_t i = 0; i < count; i++) {
        printf("section=%s size=%" PRIu64 " stored=%" PRIu64 "\n", list[i].name,
               list[i].size, list[i].stored_size);
        stored += list[i].stored_size;
        if (list[i].size != (strcmp(list[i].name, "cpu") ? size : cpu_size)) {
            msg("section '%s' has size %" PRIu64, list[i].name, list[i].size);
            goto out;
        }
    }
    printf("stored_total=%" PRIu64 "\nvmstate_size=%" PRIu64 "\n", stored,
           qsnap_vmstate_size(vs));
    buf = xmalloc(max_read);
    want = xmalloc(max_read);
    if (!check_section(vs, "cpu", seed + 1, gen_fill, 0, (size_t)cpu_size, buf,
                       want) ||
        !check_section(vs, "memory", seed, mem_fill, 0, 4096, buf, want) ||
        !check_section(vs, "memory", seed, mem_fill, size - 4099, 4099, buf,
                       want)) {
        goto out;
    }
    for (uint64_t k = 0; k < samples; k++) {
        size_t len = (size_t)(rng_next(&rng) % max_read) + 1;
        uint64_t off;
        /* Half the samples land on a page that holds data. */
        off = rng_next(&rng) % size;
        if (k % 2) {
            uint8_t probe[1];
            for (int tries = 0; tries < 512; tries++) {
                mem_fill(seed, off & ~(uint64_t)(MEM_PAGE - 1), probe, 1);
                if (probe[0]) {
                    break;
                }
                off = rng_next(&rng) % size;
            }
        }
        if (len > size - off) {
            len = (size_t)(size - off);
        }
        if (!check_section(vs, "memory", seed, mem_fill, off, len, buf, want)) {
            goto out;
        }
    }
    printf("samples_ok=%" PRIu64 "\n", samples);
    rc = 0;
out:
    free(buf);
    free(want);
    free(list);
    if (vs) {
        qsnap_vmstate_close(vs);
    }
    if (close_qcow2(img, argv[1])) {
        rc = 1;
    }
    return rc;
}

/* Writes `bytes` of random state into an open checkpoint. */
static int fill_checkpoint(qsnap_image *img, qsnap_checkpoint *ck,
                           bool sections, uint64_t bytes, uint64_t seed)
{
    uint8_t *buf;
    int ret;

    if (sections) {
        return write_section(img, ck, "devices", 1000, seed + 7, gen_fill) ||
               write_section(img, ck, "memory", bytes, seed, gen_fill);
    }
    buf = xmalloc(PIECE);
    for (uint64_t off = 0; off < bytes; off += PIECE) {
        const size_t n = bytes - off < PIECE ? (size_t)(bytes - off) : PIECE;
        gen_fill(seed, off, buf, n);
        ret = qsnap_checkpoint_write(ck, buf, n);
        if (ret < 0) {
            free(buf);
            return ck_fail(img, "checkpoint write", ret);
        }
    }
    free(buf);
    return 0;
}

/* abort IMAGE NAME BYTES sections|raw: begin, write BYTES, abort. */
static int cmd_abort(int argc, char **argv)
{
    qsnap_image *img;
    qsnap_checkpoint *ck = NULL;
    bool sections;
    int ret;
    int rc = 1;

    if (argc != 5 ||
        (strcmp(argv[4], "sections") != 0 && strcmp(argv[4], "raw") != 0)) {
        msg("usage: abort IMAGE NAME BYTES sections|raw");
        return 2;
    }
    sections = strcmp(argv[4], "sections") == 0;
    img = open_qcow2(argv[1], QSNAP_OPEN_RDWR);
    if (!img) {
        return 1;
    }
    ret = qsnap_checkpoint_begin(
        img, argv[2], NULL,
        sections ? QSNAP_CHECKPOINT_SECTIONS : QSNAP_CHECKPOINT_RAW, &ck);
    if (ret < 0) {
        rc = ck_fail(img, "checkpoint begin", ret);
        goto out;
    }
    if (fill_checkpoint(img, ck, sections, need_size("bytes", argv[3]), 42)) {
        qsnap_checkpoint_abort(ck);
        goto out;
    }
    ret = qsnap_checkpoint_abort(ck);
    if (ret < 0) {
        rc = ck_fail(img, "checkpoint abort", ret);
        goto out;
    }
    rc = 0;
out:
    if (close_qcow2(img, argv[1])) {
        rc = 1;
    }
    return rc;
}

/*
 * hold IMAGE NAME BYTES: begin a checkpoint, write BYTES, flush the image,
 * print "written" and wait (forever) to be killed.
 */
static int cmd_hold(int argc, char **argv)
{
    qsnap_image *img;
    qsnap_checkpoint *ck = NULL;
    int ret;

    if (argc != 4) {
        msg("usage: hold IMAGE NAME BYTES");
        return 2;
    }
    img = open_qcow2(argv[1], QSNAP_OPEN_RDWR);
    if (!img) {
        return 1;
    }
    ret = qsnap_checkpoint_begin(img, argv[2], NULL, QSNAP_CHECKPOINT_SECTIONS,
                                 &ck);
    if (ret < 0) {
        ck_fail(img, "checkpoint begin", ret);
        qsnap_close(img);
        return 1;
    }
    if (fill_checkpoint(img, ck, true, need_size("bytes", argv[3]), 43)) {
        qsnap_checkpoint_abort(ck);
        qsnap_close(img);
        return 1;
    }
    ret = qsnap_flush(img);
    if (ret < 0) {
        msg("flush with an open checkpoint: %s (%s)", qsnap_errmsg(img),
            qsnap_strerror(ret));
    }
    printf("written\n");
    fflush(stdout);
    for (;;) {
        pause();
    }
}

/* ------------------------------------------------------------------ */
/* race: views read while the live disk is written                    */
/* ------------------------------------------------------------------ */

#define RACE_MAX_IO (256u * 1024u)
#define RACE_READERS 2

struct race {
    qsnap_image *img;
    qsnap_view *view;
    uint64_t size;
    uint64_t base_seed;
    uint8_t *model; /* the live disk, kept by the writer */
    double deadline;
    bool snapshots; /* the main thread creates/deletes snapshots too */
    atomic_bool failed;
    atomic_uint_fast64_t n_reads;
    atomic_uint_fast64_t n_writes;
    atomic_uint_fast64_t n_snaps;
};

static void race_fail(struct race *r, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void race_fail(struct race *r, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fputs(PROG ": race: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    atomic_store(&r->failed, true);
}

struct reader_arg {
    struct race *r;
    unsigned idx;
};

static void *race_reader(void *opaque)
{
    const struct reader_arg *a = opaque;
    struct race *r = a->r;
    uint8_t *buf = xmalloc(RACE_MAX_IO);
    uint8_t *want = xmalloc(RACE_MAX_IO);
    uint64_t rng = r->base_seed * 31 + a->idx;

    while (!atomic_load(&r->failed) && now_sec() < r->deadline) {
        const size_t len = (size_t)(rng_next(&rng) % RACE_MAX_IO) + 1;
        const uint64_t off = rng_next(&rng) % (r->size - len + 1);
        const int ret = qsnap_view_pread(r->view, buf, len, off);

        if (ret < 0) {
            race_fail(r, "view read 0x%" PRIx64 "+0x%zx: %s (%s)", off, len,
                      qsnap_errmsg(r->img), qsnap_strerror(ret));
            break;
        }
        gen_fill(r->base_seed, off, want, len);
        for (size_t i = 0; i < len; i++) {
            if (buf[i] != want[i]) {
                race_fail(r,
                          "view byte 0x%" PRIx64 " reads 0x%02x, "
                          "snapshot holds 0x%02x (read 0x%" PRIx64 "+0x%zx)",
                          off + i, buf[i], want[i], off, len);
                break;
            }
        }
        atomic_fetch_add(&r->n_reads, 1);
    }
    free(buf);
    free(want);
    return NULL;
}

static void *race_writer(void *opaque)
{
    struct race *r = opaque;
    uint8_t *buf = xmalloc(RACE_MAX_IO);
    uint64_t rng = r->base_seed * 17 + 5;
    uint64_t k = 0;

    while (!atomic_load(&r->failed) && now_sec() < r->deadline) {
        const size_t len = (size_t)(rng_next(&rng) % RACE_MAX_IO) + 1;
        const uint64_t off = rng_next(&rng) % (r->size - len + 1);
        const unsigned kind = (unsigned)(rng_next(&rng) % 16);
        const char *what;
        int ret;

        k++;
        if (kind == 0) {
            what = "write_zeroes";
            ret = qsnap_write_zeroes(r->img, off, len, QSNAP_ZERO_MAY_UNMAP);
            memset(r->model + off, 0, len);
        } else if (kind == 1) {
            what = "discard";
            ret = qsnap_discard(r->img, off, len);
            memset(r->model + off, 0, len);
        } else if (kind == 2) {
            what = "flush";
            ret = qsnap_flush(r->img);
        } else if (kind == 3) {
            what = "read";
            ret = qsnap_pread(r->img, buf, len, off);
            if (ret == 0 && memcmp(buf, r->model + off, len) != 0) {
                race_fail(r,
                          "live disk 0x%" PRIx64 "+0x%zx differs from "
                          "what was written",
                          off, len);
                break;
            }
        } else {
            what = "write";
            gen_fill(r->base_seed ^ (k << 20), off, buf, len);
            ret = qsnap_pwrite(r->img, buf, len, off);
            memcpy(r->model + off, buf, len);
        }
        if (ret < 0) {
            race_fail(r, "%s 0x%" PRIx64 "+0x%zx: %s (%s)", what, off, len,
                      qsnap_errmsg(r->img), qsnap_strerror(ret));
            break;
        }
        atomic_fetch_add(&r->n_writes, 1);
    }
    free(buf);
    return NULL;
}

/*
 * race IMAGE SECONDS SEED EXPECT.raw [--snapshots]: fills the disk from
 * the generator, takes snapshot "race-base", writes its content to
 * EXPECT.raw, then for SECONDS two threads read a view of it at random
 * while a third writes, zeroes and discards the live disk (and, with
 * --snapshots, the main thread creates and deletes other snapshots).
 * Then the whole view and the whole live disk are compared.
 */
static int cmd_race(int argc, char **argv)
{
    struct race r;
    struct reader_arg args[RACE_READERS];
    pthread_t readers[RACE_READERS];
    pthread_t writer;
    struct qsnap_info info;
    uint8_t *buf = NULL;
    uint64_t seconds;
    unsigned n_started = 0;
    bool writer_started = false;
    int fd = -1;
    int ret;
    int rc = 1;

    if (argc < 5 || argc > 6 ||
        (argc == 6 && strcmp(argv[5], "--snapshots") != 0)) {
        msg("usage: race IMAGE SECONDS SEED EXPECT.raw [--snapshots]");
        return 2;
    }
    memset(&r, 0, sizeof(r));
    seconds = need_size("seconds", argv[2]);
    r.base_seed = need_size("seed", argv[3]);
    r.snapshots = argc == 6;
    atomic_init(&r.failed, false);
    atomic_init(&r.n_reads, 0);
    atomic_init(&r.n_writes, 0);
    atomic_init(&r.n_snaps, 0);
    r.img = open_qcow2(argv[1], QSNAP_OPEN_RDWR);
    if (!r.img) {
        return 1;
    }
    info.struct_size = sizeof(info);
    ret = qsnap_get_info(r.img, &info);
    if (ret < 0 || info.virtual_size < RACE_MAX_IO ||
        info.virtual_size > (256ull << 20)) {
        msg("%s: needs a disk of 256 KiB .. 256 MiB", argv[1]);
        goto out;
    }
    r.size = info.virtual_size;
    r.model = xmalloc((size_t)r.size);
    gen_fill(r.base_seed, 0, r.model, (size_t)r.size);
    ret = qsnap_pwrite(r.img, r.model, (size_t)r.size, 0);
    if (ret < 0) {
        rc = ck_fail(r.img, "filling the disk", ret);
        goto out;
    }
    ret = qsnap_snapshot_create(r.img, "race-base", NULL);
    if (ret < 0) {
        rc = ck_fail(r.img, "snapshot create race-base", ret);
        goto out;
    }
    fd = open(argv[4], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || !write_at(fd, r.model, (size_t)r.size, 0, argv[4])) {
        msg("%s: cannot write the expected content", argv[4]);
        goto out;
    }
    ret = qsnap_view_open(r.img, "race-base", &r.view);
    if (ret < 0) {
        rc = ck_fail(r.img, "view open race-base", ret);
        goto out;
    }
    r.deadline = now_sec() + (double)seconds;
    for (unsigned i = 0; i < RACE_READERS; i++) {
        args[i].r = &r;
        args[i].idx = i;
        if (pthread_create(&readers[i], NULL, race_reader, &args[i]) != 0) {
            race_fail(&r, "pthread_create failed");
            break;
        }
        n_started++;
    }
    if (pthread_create(&writer, NULL, race_writer, &r) == 0) {
        writer_started = true;
    } else {
        race_fail(&r, "pthread_create failed");
    }
    while (!atomic_load(&r.failed) && now_sec() < r.deadline) {
        if (r.snapshots) {
            /* Snapshot of the live disk while it is being written. */
            ret = qsnap_snapshot_create(r.img, "race-tmp", NULL);
            if (ret == 0) {
                ret = qsnap_snapshot_delete(r.img, "race-tmp");
            }
            if (ret < 0) {
                race_fail(&r, "snapshot create/delete race-tmp: %s (%s)",
                          qsnap_errmsg(r.img), qsnap_strerror(ret));
                break;
            }
            atomic_fetch_add(&r.n_snaps, 1);
        }
        usleep(20000);
    }
    for (unsigned i = 0; i < n_started; i++) {
        pthread_join(readers[i], NULL);
    }
    if (writer_started) {
        pthread_join(writer, NULL);
    }
    printf("reads=%" PRIu64 " writes=%" PRIu64 " snapshots=%" PRIu64 "\n",
           (uint64_t)atomic_load(&r.n_reads),
           (uint64_t)atomic_load(&r.n_writes),
           (uint64_t)atomic_load(&r.n_snaps));
    if (atomic_load(&r.failed)) {
        goto out;
    }
    if (atomic_load(&r.n_reads) == 0 || atomic_load(&r.n_writes) == 0) {
        msg("race: nothing ran");
        goto out;
    }
    /* Afterwards: the whole view and the whole live disk. */
    buf = xmalloc((size_t)r.size);
    ret = qsnap_view_pread(r.view, buf, (size_t)r.size, 0);
    if (ret < 0) {
        rc = ck_fail(r.img, "final view read", ret);
        goto out;
    }
    {
        uint8_t *want = xmalloc((size_t)r.size);
        gen_fill(r.base_seed, 0, want, (size_t)r.size);
        ret = memcmp(buf, want, (size_t)r.size);
        free(want);
        if (ret != 0) {
            msg("race: the snapshot's content changed");
            goto out;
        }
    }
    ret = qsnap_pread(r.img, buf, (size_t)r.size, 0);
    if (ret < 0) {
        rc = ck_fail(r.img, "final live read", ret);
        goto out;
    }
    if (memcmp(buf, r.model, (size_t)r.size) != 0) {
        msg("race: the live disk differs from what was written");
        goto out;
    }
    rc = 0;
out:
    free(buf);
    if (fd >= 0) {
        close(fd);
    }
    if (r.view) {
        qsnap_view_close(r.view);
    }
    free(r.model);
    if (close_qcow2(r.img, argv[1])) {
        rc = 1;
    }
    return rc;
}

/* ------------------------------------------------------------------ */

static void usage(FILE *f)
{
    fputs("Usage: " PROG " COMMAND ARGS...\n"
          "\n"
          "  poke FILE OFFSET WIDTH VALUE   big-endian integer (1/2/4/8 B)\n"
          "  peek FILE OFFSET WIDTH\n"
          "  flip FILE OFFSET               invert one byte\n"
          "  layout FILE                    header and snapshots, key=value\n"
          "  refcounted FILE                clusters with refcount > 0\n"
          "  vmpatch FILE SNAPSHOT WHAT...  damage a VM state container\n"
          "  view-dump IMAGE SNAPSHOT OUT   snapshot disk through a view\n"
          "  section-read IMAGE SNAPSHOT SECTION OUT\n"
          "  bigstate IMAGE NAME SIZE SEED SAMPLES\n"
          "  abort IMAGE NAME BYTES sections|raw\n"
          "  hold IMAGE NAME BYTES\n"
          "  race IMAGE SECONDS SEED EXPECT.raw [--snapshots]\n"
          "\n"
          "Numbers accept 0x prefixes and k/M/G/T suffixes.  Exit status:\n"
          "0 success, 1 failure, 2 usage, 3 not applicable.\n",
          f);
}

int main(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {
        {"poke", cmd_poke},
        {"peek", cmd_peek},
        {"flip", cmd_flip},
        {"layout", cmd_layout},
        {"refcounted", cmd_refcounted},
        {"vmpatch", cmd_vmpatch},
        {"view-dump", cmd_view_dump},
        {"section-read", cmd_section_read},
        {"bigstate", cmd_bigstate},
        {"abort", cmd_abort},
        {"hold", cmd_hold},
        {"race", cmd_race},
    };

    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (strcmp(argv[1], cmds[i].name) == 0) {
            return cmds[i].fn(argc - 1, argv + 1);
        }
    }
    msg("unknown command '%s'", argv[1]);
    usage(stderr);
    return 2;
}
