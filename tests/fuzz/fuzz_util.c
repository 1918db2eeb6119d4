/*
 * fuzz_util.c - scratch files, bounded walks and API promise checks for
 * the fuzz harnesses (see fuzz_util.h).
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include "fuzz_util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* One disk (the active one or a snapshot view) gets at most this much. */
#define FZ_DISK_BYTES (16ull << 20)
/* Ranges without data: only the first few are read (and must be zero). */
#define FZ_HOLES_READ 8
/* Sections of one container walked at most. */
#define FZ_MAX_SECTIONS 64

static char scratch_dir[PATH_MAX];
static uint8_t read_buf[FZ_STEP];
static uint8_t shift_buf[FZ_STEP];
static const uint8_t zero_buf[FZ_STEP];

static void remove_scratch(void);

void fz_die(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fputs("fuzz setup: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    remove_scratch(); /* abort() skips atexit */
    abort();
}

void fz_bug(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fputs("API promise broken: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    remove_scratch(); /* abort() skips atexit */
    abort();
}

void fz_trace(const char *fmt, ...)
{
    static int on = -1;
    va_list ap;

    if (on < 0) {
        const char *v = getenv("QSNAP_FUZZ_TRACE");
        on = v && v[0] && strcmp(v, "0") != 0;
    }
    if (!on) {
        return;
    }
    va_start(ap, fmt);
    fputs("trace: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static void remove_scratch(void)
{
    DIR *d;
    struct dirent *e;
    char path[PATH_MAX];

    if (!scratch_dir[0] || !(d = opendir(scratch_dir))) {
        return;
    }
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) {
            continue;
        }
        if (snprintf(path, sizeof(path), "%s/%s", scratch_dir, e->d_name) <
            (int)sizeof(path)) {
            unlink(path);
        }
    }
    closedir(d);
    rmdir(scratch_dir);
    scratch_dir[0] = '\0';
}

static bool usable_dir(const char *dir)
{
    struct stat st;

    return dir && dir[0] && stat(dir, &st) == 0 && S_ISDIR(st.st_mode) &&
           access(dir, W_OK | X_OK) == 0;
}

static const char *scratch(void)
{
    const char *parent;

    if (scratch_dir[0]) {
        return scratch_dir;
    }
    parent = getenv("QSNAP_FUZZ_DIR");
    if (!usable_dir(parent)) {
        parent = "/dev/shm";
    }
    if (!usable_dir(parent)) {
        parent = getenv("TMPDIR");
    }
    if (!usable_dir(parent)) {
        parent = "/tmp";
    }
    if (snprintf(scratch_dir, sizeof(scratch_dir), "%s/qsnap-fuzz.XXXXXX",
                 parent) >= (int)sizeof(scratch_dir)) {
        fz_die("scratch directory name too long under %s", parent);
    }
    if (!mkdtemp(scratch_dir)) {
        fz_die("mkdtemp %s: %s", scratch_dir, strerror(errno));
    }
    atexit(remove_scratch);
    return scratch_dir;
}

void fz_path(const char *name, char *buf, size_t len)
{
    if (snprintf(buf, len, "%s/%s", scratch(), name) >= (int)len) {
        fz_die("path %s/%s too long", scratch(), name);
    }
}

void fz_put(const char *path, const void *data, size_t len)
{
    const uint8_t *p = data;
    const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

    if (fd < 0) {
        fz_die("open %s: %s", path, strerror(errno));
    }
    while (len > 0) {
        const ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            fz_die("write %s: %s", path, n < 0 ? strerror(errno) : "short");
        }
        p += n;
        len -= (size_t)n;
    }
    if (close(fd) < 0) {
        fz_die("close %s: %s", path, strerror(errno));
    }
}

int fz_slurp(const char *path, uint8_t **data, size_t *len)
{
    struct stat st;
    uint8_t *buf;
    size_t done = 0;
    int ret = 0;
    const int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        return -errno;
    }
    if (fstat(fd, &st) < 0) {
        ret = -errno;
        close(fd);
        return ret;
    }
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size > SIZE_MAX / 2) {
        close(fd);
        return -EINVAL;
    }
    /* One byte more than needed so an empty file still gets a buffer. */
    buf = malloc((size_t)st.st_size + 1);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }
    while (done < (size_t)st.st_size) {
        const ssize_t n = read(fd, buf + done, (size_t)st.st_size - done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            ret = n < 0 ? -errno : -EIO;
            break;
        }
        done += (size_t)n;
    }
    close(fd);
    if (ret < 0) {
        free(buf);
        return ret;
    }
    *data = buf;
    *len = done;
    return 0;
}

void fz_seed_out(const char *name, const void *data, size_t len)
{
    const char *dir = getenv("QSNAP_FUZZ_SEED_OUT");
    char path[PATH_MAX];

    if (!dir || !dir[0]) {
        return;
    }
    if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path)) {
        fz_die("seed path %s/%s too long", dir, name);
    }
    fz_put(path, data, len);
}

int fz_fd_count(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *e;
    int n = 0;

    if (!d) {
        return -1;
    }
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] != '.') {
            n++;
        }
    }
    closedir(d);
    return n - 1; /* the directory's own descriptor */
}

void fz_fd_check(int before)
{
    const int after = fz_fd_count();

    if (before >= 0 && after >= 0 && after != before) {
        fz_bug("%d file descriptors open before the input, %d after", before,
               after);
    }
}

/* Aborts unless the len bytes at s hold a NUL. */
static void check_string(const char *what, const char *s, size_t len)
{
    if (!s) {
        fz_bug("%s is NULL", what);
    }
    if (!memchr(s, '\0', len)) {
        fz_bug("%s is not NUL-terminated within %zu bytes", what, len);
    }
}

void fz_touch_errmsg(const qsnap_image *img)
{
    const char *msg = qsnap_errmsg(img);

    if (!msg) {
        fz_bug("qsnap_errmsg returned NULL");
    }
    /* strlen lets AddressSanitizer see a message without its NUL. */
    if (strlen(msg) > 1u << 20) {
        fz_bug("qsnap_errmsg longer than 1 MiB");
    }
}

qsnap_image *fz_open(const char *path, unsigned flags, uint64_t cache_size)
{
    struct qsnap_open_opts o;
    qsnap_image *img = NULL;
    char err[1024];
    int rc;

    err[0] = '\0';
    qsnap_open_opts_init(&o);
    o.flags = flags;
    o.format = QSNAP_FMT_QCOW2;
    o.cache_size = cache_size;
    rc = qsnap_open(path, &o, &img, err, sizeof(err));
    check_string("qsnap_open's message", err, sizeof(err));
    if (rc < 0) {
        if (img) {
            fz_bug("qsnap_open failed (%d) but returned a handle", rc);
        }
        fz_trace("open (flags %#x): %s", flags, err);
        return NULL;
    }
    if (!img) {
        fz_bug("qsnap_open succeeded without a handle");
    }
    return img;
}

void fz_make_base(void)
{
    struct qsnap_create_opts co;
    char path[PATH_MAX];
    char err[256];
    uint8_t buf[4096];
    qsnap_image *img;

    fz_path("base.qcow2", path, sizeof(path));
    qsnap_create_opts_init(&co);
    co.size = 4u << 20;
    co.cluster_size = 4096;
    if (qsnap_create(path, &co, err, sizeof(err)) < 0) {
        fz_die("create %s: %s", path, err);
    }
    img = fz_open(path, QSNAP_OPEN_RDWR, 0);
    if (!img) {
        fz_die("open %s", path);
    }
    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = (uint8_t)(i * 13 + 1);
    }
    if (qsnap_pwrite(img, buf, sizeof(buf), 0) < 0 ||
        qsnap_pwrite(img, buf, sizeof(buf), 1u << 20) < 0 ||
        qsnap_close(img) < 0) {
        fz_die("write %s", path);
    }
}

void fz_close(qsnap_image *img)
{
    /* The handle is freed even when the final flush fails. */
    if (qsnap_close(img) < 0) {
        fz_trace("close failed");
    }
}

void fz_walk_meta(qsnap_image *img, struct fz_budget *b)
{
    struct qsnap_info info;
    struct qsnap_snapshot_info *snaps = NULL;
    struct qsnap_layer_info *layers = NULL;
    uint32_t n = 0;
    uint64_t off;

    memset(&info, 0, sizeof(info));
    info.struct_size = sizeof(info);
    if (qsnap_get_info(img, &info) < 0) {
        fz_touch_errmsg(img);
        return;
    }
    check_string("info.backing_file", info.backing_file,
                 sizeof(info.backing_file));
    check_string("info.backing_fmt", info.backing_fmt,
                 sizeof(info.backing_fmt));
    check_string("info.filename", info.filename, sizeof(info.filename));

    if (qsnap_snapshot_list(img, &snaps, &n) == 0) {
        if (n != info.nb_snapshots) {
            fz_bug("snapshot list has %u entries, info says %u", n,
                   info.nb_snapshots);
        }
        for (uint32_t i = 0; i < n; i++) {
            if (!snaps[i].id || !snaps[i].name) {
                fz_bug("snapshot %u has a NULL id or name", i);
            }
            (void)strlen(snaps[i].id);
            (void)strlen(snaps[i].name);
        }
        qsnap_snapshot_list_free(snaps, n);
    } else {
        fz_touch_errmsg(img);
    }

    n = 0;
    if (qsnap_chain_list(img, &layers, &n) == 0) {
        for (uint32_t i = 0; i < n; i++) {
            check_string("layer filename", layers[i].filename,
                         sizeof(layers[i].filename));
            check_string("layer backing_name", layers[i].backing_name,
                         sizeof(layers[i].backing_name));
            check_string("layer backing_fmt", layers[i].backing_fmt,
                         sizeof(layers[i].backing_fmt));
        }
        free(layers);
    } else {
        fz_touch_errmsg(img);
    }

    for (off = 0; off < info.virtual_size && b->calls > 0;) {
        uint64_t pnum = 0;
        unsigned flags = 0;
        const uint64_t left = info.virtual_size - off;

        b->calls--;
        if (qsnap_block_status(img, off, left, &pnum, &flags, NULL, NULL) < 0) {
            fz_touch_errmsg(img);
            break;
        }
        if (pnum == 0 || pnum > left) {
            fz_bug("block status at %" PRIu64 " gave length %" PRIu64
                   " of %" PRIu64,
                   off, pnum, left);
        }
        off += pnum;
    }
}

struct check_ctx {
    uint64_t reports;
};

static void check_report(void *opaque, int level, const char *msg)
{
    struct check_ctx *c = opaque;

    if (level < 0 || level > 2) {
        fz_bug("check reported level %d", level);
    }
    check_string("check report", msg, strlen(msg) + 1);
    if (c->reports < 20) {
        fz_trace("check report %d: %s", level, msg);
    }
    c->reports++;
}

int64_t fz_check(qsnap_image *img, unsigned flags)
{
    struct qsnap_check_result res;
    struct check_ctx c = {0};

    memset(&res, 0, sizeof(res));
    res.struct_size = sizeof(res);
    if (qsnap_check(img, flags, &res, check_report, &c) < 0) {
        fz_touch_errmsg(img);
        fz_trace("check (flags %#x): %s", flags, qsnap_errmsg(img));
        return -1;
    }
    fz_trace("check (flags %#x): %" PRIu64 " corruptions, %" PRIu64
             " leaks, %" PRIu64 " fixed",
             flags, res.corruptions, res.leaks,
             res.corruptions_fixed + res.leaks_fixed);
    return (int64_t)(res.corruptions > INT64_MAX ? INT64_MAX : res.corruptions);
}

/* ------------------------------------------------------------------ */
/* Reading disks                                                       */
/* ------------------------------------------------------------------ */

/* The active disk or a snapshot view, behind one interface. */
struct disk {
    qsnap_image *img;
    qsnap_view *view;
    uint64_t size;
};

static int disk_status(const struct disk *d, uint64_t off, uint64_t len,
                       uint64_t *pnum, unsigned *flags)
{
    if (d->img) {
        uint64_t host_off = 0;
        int depth = -1;
        return qsnap_block_status(d->img, off, len, pnum, flags, &host_off,
                                  &depth);
    }
    return qsnap_view_block_status(d->view, off, len, pnum, flags);
}

static int disk_preadv(const struct disk *d, const struct iovec *iov, int n,
                       uint64_t off)
{
    if (d->img) {
        return qsnap_preadv(d->img, iov, n, off);
    }
    return qsnap_view_preadv(d->view, iov, n, off);
}

static int disk_pread(const struct disk *d, void *buf, size_t len, uint64_t off)
{
    if (d->img) {
        return qsnap_pread(d->img, buf, len, off);
    }
    return qsnap_view_pread(d->view, buf, len, off);
}

static void disk_errmsg(const struct disk *d)
{
    if (d->img) {
        fz_touch_errmsg(d->img);
    }
}

/*
 * Reads len bytes at off into read_buf as three uneven pieces, so request
 * splitting is exercised too.
 */
static int read_split(const struct disk *d, size_t len, uint64_t off)
{
    struct iovec iov[3];
    int n = 0;

    if (len < 3) {
        iov[n].iov_base = read_buf;
        iov[n++].iov_len = len;
    } else {
        const size_t a = len / 3 | 1;
        const size_t b = len / 2 + 1;
        iov[n].iov_base = read_buf;
        iov[n++].iov_len = a;
        iov[n].iov_base = read_buf + a;
        iov[n++].iov_len = b - a;
        iov[n].iov_base = read_buf + b;
        iov[n++].iov_len = len - b;
    }
    return disk_preadv(d, iov, n, off);
}

/*
 * Reads [off, off + len) in FZ_STEP requests.  With zero set the bytes must
 * read as zeros.  The first request is read again one byte further on, and
 * both reads must agree.  Returns -1 once a read fails.
 */
static int read_range(const struct disk *d, uint64_t off, uint64_t len,
                      bool zero, struct fz_budget *b)
{
    bool first = true;

    while (len > 0 && b->bytes > 0 && b->calls > 0) {
        size_t n = FZ_STEP;
        if (n > len) {
            n = (size_t)len;
        }
        if (n > b->bytes) {
            n = (size_t)b->bytes;
        }
        b->calls--;
        b->bytes -= n;
        if (read_split(d, n, off) < 0) {
            disk_errmsg(d);
            return -1;
        }
        if (zero && memcmp(read_buf, zero_buf, n) != 0) {
            fz_bug("block status reports zeros at %" PRIu64
                   " but the bytes read are not",
                   off);
        }
        if (first && n > 1 && d->size - off > 1) {
            size_t m = n;
            if (m > d->size - off - 1) {
                m = (size_t)(d->size - off - 1);
            }
            if (disk_pread(d, shift_buf, m, off + 1) == 0 &&
                memcmp(shift_buf, read_buf + 1, m < n - 1 ? m : n - 1) != 0) {
                fz_bug("reads at %" PRIu64 " and %" PRIu64
                       " disagree on the same bytes",
                       off, off + 1);
            }
        }
        first = false;
        off += n;
        len -= n;
    }
    return 0;
}

static void read_disk(const struct disk *d, struct fz_budget *b)
{
    const uint64_t cap = b->bytes < FZ_DISK_BYTES ? b->bytes : FZ_DISK_BYTES;
    struct fz_budget mine = {.bytes = cap, .calls = b->calls};
    unsigned holes = 0;
    uint64_t off = 0;

    while (off < d->size && mine.calls > 0 && mine.bytes > 0) {
        uint64_t pnum = 0;
        unsigned flags = 0;
        uint64_t want;
        const uint64_t left = d->size - off;

        mine.calls--;
        if (disk_status(d, off, left, &pnum, &flags) < 0) {
            disk_errmsg(d);
            break;
        }
        if (pnum == 0 || pnum > left) {
            fz_bug("block status at %" PRIu64 " gave length %" PRIu64
                   " of %" PRIu64,
                   off, pnum, left);
        }
        want = pnum;
        if (!(flags & QSNAP_BS_DATA)) {
            want =
                holes < FZ_HOLES_READ ? (pnum < FZ_STEP ? pnum : FZ_STEP) : 0;
            holes++;
        }
        if (want > 0 &&
            read_range(d, off, want, flags & QSNAP_BS_ZERO, &mine) < 0) {
            break;
        }
        off += pnum;
    }
    fz_trace("%s of %" PRIu64 " bytes: read %" PRIu64 ", walked to %" PRIu64,
             d->img ? "disk" : "view", d->size, cap - mine.bytes, off);
    b->calls = mine.calls;
    b->bytes -= cap - mine.bytes;
}

void fz_read_image(qsnap_image *img, struct fz_budget *b)
{
    struct qsnap_info info;
    struct disk d = {.img = img};

    memset(&info, 0, sizeof(info));
    info.struct_size = sizeof(info);
    if (qsnap_get_info(img, &info) < 0) {
        fz_touch_errmsg(img);
        return;
    }
    d.size = info.virtual_size;
    read_disk(&d, b);
    /* Just past the end: refused, never read. */
    if (d.size < UINT64_MAX && qsnap_pread(img, read_buf, 1, d.size) == 0) {
        fz_bug("a read at the virtual size %" PRIu64 " succeeded", d.size);
    }
}

void fz_read_view(qsnap_view *view, struct fz_budget *b)
{
    struct disk d = {.view = view};

    d.size = qsnap_view_size(view);
    read_disk(&d, b);
    if (d.size < UINT64_MAX &&
        qsnap_view_pread(view, read_buf, 1, d.size) == 0) {
        fz_bug("a view read at its size %" PRIu64 " succeeded", d.size);
    }
}

/* ------------------------------------------------------------------ */
/* VM state                                                            */
/* ------------------------------------------------------------------ */

static void touch_vs_errmsg(const qsnap_vmstate *vs)
{
    const char *msg = qsnap_vmstate_errmsg(vs);

    if (!msg) {
        fz_bug("qsnap_vmstate_errmsg returned NULL");
    }
    (void)strlen(msg);
}

/*
 * Reads section s in chunks.  Reads go by name, and a damaged container
 * may hold two sections of one name (the first is read): only a section
 * whose name is unique must refuse a read at its end.
 */
static void walk_section(qsnap_vmstate *vs, const struct qsnap_section_info *s,
                         bool unique, struct fz_budget *b)
{
    uint64_t off = 0;

    while (off < s->size && b->bytes > 0 && b->calls > 0) {
        size_t n = FZ_STEP;
        if (n > s->size - off) {
            n = (size_t)(s->size - off);
        }
        if (n > b->bytes) {
            n = (size_t)b->bytes;
        }
        b->calls--;
        b->bytes -= n;
        if (qsnap_vmstate_section_pread(vs, s->name, read_buf, n, off) < 0) {
            touch_vs_errmsg(vs);
            break;
        }
        off += n;
    }
    /* A few bytes across the middle: two chunks when it is a boundary. */
    if (s->size >= 16 && b->calls > 0) {
        b->calls--;
        if (qsnap_vmstate_section_pread(vs, s->name, read_buf, 16,
                                        s->size / 2 - 8) < 0) {
            touch_vs_errmsg(vs);
        }
    }
    if (unique && s->size < UINT64_MAX &&
        qsnap_vmstate_section_pread(vs, s->name, read_buf, 1, s->size) == 0) {
        fz_bug("section '%s' read at its size %" PRIu64 " succeeded", s->name,
               s->size);
    }
}

int fz_walk_vmstate(qsnap_image *img, const char *id_or_name,
                    struct fz_budget *b)
{
    qsnap_vmstate *vs = NULL;
    uint64_t size;
    uint64_t off = 0;
    int rc = qsnap_vmstate_open(img, id_or_name, &vs);

    if (rc < 0) {
        fz_touch_errmsg(img);
        fz_trace("vmstate open %s: %s", id_or_name, qsnap_errmsg(img));
        return rc;
    }
    size = qsnap_vmstate_size(vs);
    fz_trace("vmstate %s: %" PRIu64 " bytes, %s", id_or_name, size,
             qsnap_vmstate_has_sections(vs) ? "sections" : "raw");
    while (off < size && b->bytes > 0 && b->calls > 0) {
        size_t n = FZ_STEP;
        if (n > size - off) {
            n = (size_t)(size - off);
        }
        if (n > b->bytes) {
            n = (size_t)b->bytes;
        }
        b->calls--;
        b->bytes -= n;
        if (qsnap_vmstate_pread(vs, read_buf, n, off) < 0) {
            touch_vs_errmsg(vs);
            break;
        }
        off += n;
    }
    if (qsnap_vmstate_has_sections(vs)) {
        struct qsnap_section_info *list = NULL;
        uint32_t n = 0;
        char missing[300];

        /* Names are at most 255 bytes: no section has this one. */
        memset(missing, 'x', sizeof(missing) - 1);
        missing[sizeof(missing) - 1] = '\0';
        if (qsnap_vmstate_sections(vs, &list, &n) == 0) {
            fz_trace("vmstate %s: %u sections", id_or_name, n);
            for (uint32_t i = 0; i < n; i++) {
                check_string("section name", list[i].name,
                             sizeof(list[i].name));
                if (i < FZ_MAX_SECTIONS) {
                    bool unique = true;
                    for (uint32_t j = 0; j < n && unique; j++) {
                        unique =
                            j == i || strcmp(list[i].name, list[j].name) != 0;
                    }
                    walk_section(vs, &list[i], unique, b);
                }
            }
            free(list);
        } else {
            touch_vs_errmsg(vs);
        }
        if (qsnap_vmstate_section_pread(vs, missing, read_buf, 1, 0) == 0) {
            fz_bug("a read of a section with a %zu-byte name succeeded",
                   sizeof(missing) - 1);
        }
    }
    qsnap_vmstate_close(vs);
    return 0;
}

void fz_walk_snapshots(qsnap_image *img, bool views, bool vmstate,
                       struct fz_budget *b)
{
    struct qsnap_snapshot_info *list = NULL;
    uint32_t n = 0;

    if (qsnap_snapshot_list(img, &list, &n) < 0) {
        fz_touch_errmsg(img);
        return;
    }
    for (uint32_t i = 0; i < n && b->calls > 0; i++) {
        if (views) {
            qsnap_view *view = NULL;
            if (qsnap_view_open(img, list[i].id, &view) == 0) {
                fz_read_view(view, b);
                qsnap_view_close(view);
            } else {
                fz_touch_errmsg(img);
            }
            if (i == 0 && qsnap_view_open(img, list[i].name, &view) == 0) {
                qsnap_view_close(view);
            }
        }
        if (vmstate && list[i].vm_state_size > 0) {
            fz_walk_vmstate(img, list[i].id, b);
        }
    }
    qsnap_snapshot_list_free(list, n);
}
