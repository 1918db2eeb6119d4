/*
 * check_image.c - the public API (image.c) over in-memory and real files:
 * creation options, open/close, guest I/O at any offset and with many
 * iovecs, argument and permission checks, resize, consistency after long
 * operation sequences, dirty images, I/O errors and simulated power loss.
 */
#include "config.h"

#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "unit_util.h"

#define ICS 4096u       /* cluster size of most memory images */
#define DISK (8u << 20) /* their virtual size */

static char *dir; /* temporary directory of a test case */
static qsnap_image *img;
static qs_io *mem;

/* Unchecked (run by the parent): the directory goes even if tests fail. */
static void dir_setup(void)
{
    dir = unit_tmpdir();
    ck_assert_ptr_nonnull(dir);
}

static void dir_teardown(void)
{
    unit_rmtree(dir);
    dir = NULL;
}

static void setup(void)
{
    img = NULL;
    mem = NULL;
}

static void teardown(void)
{
    qsnap_close(img);
    img = NULL;
    qs_io_close(mem);
    mem = NULL;
}

/* A path in the test directory (two rotating buffers). */
static const char *tpath(const char *name)
{
    static char bufs[2][4200];
    static int k;
    k ^= 1;
    snprintf(bufs[k], sizeof(bufs[k]), "%s/%s", dir, name);
    return bufs[k];
}

static void opts_mem(struct qsnap_create_opts *o)
{
    qsnap_create_opts_init(o);
    o->size = DISK;
    o->cluster_size = ICS;
}

/* Makes `mem` from options and opens it read-write into `img`. */
static void mem_image(const struct qsnap_create_opts *o)
{
    char err[512] = "";
    ck_assert_msg(unit_make_image(o, &mem, err, sizeof(err)) == 0, "%s", err);
    memio_ref(mem);
    ck_assert_msg(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)) == 0,
                  "%s", err);
}

/* Closes `img` and opens `mem` again with `flags`. */
static int mem_reopen(unsigned flags)
{
    char err[512] = "";
    const int c = qsnap_close(img);
    img = NULL;
    memio_ref(mem);
    const int ret = unit_open(mem, flags, &img, err, sizeof(err));
    ck_assert_msg(ret == 0, "reopen: %s", err);
    return c;
}

static struct qsnap_check_result check_now(void)
{
    struct qsnap_check_result r;
    ck_assert_int_eq(unit_check(img, &r), 0);
    ck_assert_uint_eq(r.check_errors, 0);
    return r;
}

/* Creates a file image (memory-image options) in the test's directory
 * and opens it read-write into `img`, with `flags` added. */
static void file_image(const char *name, unsigned flags)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    char err[512] = "";
    ck_assert_msg(qsnap_create(tpath(name), &o, err, sizeof(err)) == 0, "%s",
                  err);
    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    oo.flags = QSNAP_OPEN_RDWR | flags;
    ck_assert_msg(qsnap_open(tpath(name), &oo, &img, err, sizeof(err)) == 0,
                  "%s", err);
}

static void assert_clean(void)
{
    const struct qsnap_check_result r = check_now();
    ck_assert_uint_eq(r.corruptions, 0);
    ck_assert_uint_eq(r.leaks, 0);
}

static struct qsnap_info info_of(qsnap_image *i)
{
    struct qsnap_info inf;
    memset(&inf, 0, sizeof(inf));
    inf.struct_size = sizeof(inf);
    ck_assert_int_eq(qsnap_get_info(i, &inf), 0);
    return inf;
}

/* Reads the whole disk and compares it with `model`. */
static void assert_content(const uint8_t *model, uint64_t size)
{
    const size_t chunk = 1u << 20;
    uint8_t *b = malloc(chunk);
    ck_assert_ptr_nonnull(b);
    for (uint64_t off = 0; off < size; off += chunk) {
        const size_t n = (size_t)QS_MIN(chunk, size - off);
        ck_assert_int_eq(qsnap_pread(img, b, n, off), 0);
        if (memcmp(b, model + off, n) != 0) {
            size_t i = 0;
            while (b[i] == model[off + i]) {
                i++;
            }
            ck_abort_msg("guest byte 0x%" PRIx64 " is 0x%02x, want 0x%02x",
                         off + i, b[i], model[off + i]);
        }
    }
    free(b);
}

/* ------------------------------------------------------------ operations */

enum op_kind {
    OP_WRITE,
    OP_ZERO,
    OP_ZERO_UNMAP,
    OP_DISCARD,
    OP_COMPRESSED,
    OP_FLUSH,
    OP_KINDS
};

struct op {
    enum op_kind kind;
    uint64_t off;
    uint64_t len;
    uint64_t seed;
};

static void op_data(const struct op *o, uint8_t *buf)
{
    if (o->kind == OP_COMPRESSED) {
        for (uint64_t i = 0; i < o->len; i++) {
            buf[i] = (uint8_t)(o->seed * 31 + i / 64);
        }
    } else {
        unit_fill(buf, (size_t)o->len, o->seed, o->off);
    }
}

static int op_run(qsnap_image *i, const struct op *o)
{
    switch (o->kind) {
    case OP_WRITE:
    case OP_COMPRESSED: {
        uint8_t *b = malloc(o->len ? (size_t)o->len : 1);
        ck_assert_ptr_nonnull(b);
        op_data(o, b);
        const int ret =
            o->kind == OP_WRITE
                ? qsnap_pwrite(i, b, (size_t)o->len, o->off)
                : qsnap_write_compressed(i, b, (size_t)o->len, o->off);
        free(b);
        return ret;
    }
    case OP_ZERO:
        return qsnap_write_zeroes(i, o->off, o->len, 0);
    case OP_ZERO_UNMAP:
        return qsnap_write_zeroes(i, o->off, o->len, QSNAP_ZERO_MAY_UNMAP);
    case OP_DISCARD:
        return qsnap_discard(i, o->off, o->len);
    case OP_FLUSH:
        return qsnap_flush(i);
    default:
        return -EINVAL;
    }
}

static void op_model(uint8_t *model, const struct op *o)
{
    switch (o->kind) {
    case OP_WRITE:
    case OP_COMPRESSED:
        op_data(o, model + o->off);
        break;
    case OP_ZERO:
    case OP_ZERO_UNMAP:
    case OP_DISCARD:
        memset(model + o->off, 0, (size_t)o->len);
        break;
    default:
        break;
    }
}

/* A random operation inside a disk of `size` bytes, clusters of `cs`. */
static void op_random(uint64_t *rs, uint64_t size, uint64_t cs, bool compressed,
                      struct op *o)
{
    const unsigned r = (unsigned)(unit_rand(rs) % 100);
    o->seed = unit_rand(rs) | 1;
    if (r < 50) {
        o->kind = OP_WRITE;
    } else if (r < 58) {
        o->kind = OP_ZERO;
    } else if (r < 64) {
        o->kind = OP_ZERO_UNMAP;
    } else if (r < 74) {
        o->kind = OP_DISCARD;
    } else if (r < 84 && compressed) {
        o->kind = OP_COMPRESSED;
    } else if (r < 90) {
        o->kind = OP_FLUSH;
    } else {
        o->kind = OP_WRITE;
    }
    if (o->kind == OP_COMPRESSED) {
        o->off = (unit_rand(rs) % (size / cs)) * cs;
        o->len = cs;
        return;
    }
    /* Mostly small and unaligned, sometimes a few clusters. */
    const uint64_t max = (unit_rand(rs) % 4 == 0) ? 5 * cs : cs / 2;
    o->len = 1 + unit_rand(rs) % max;
    if (o->len > size) {
        o->len = size;
    }
    o->off = unit_rand(rs) % (size - o->len + 1);
    if (unit_rand(rs) % 3 == 0) {
        o->off &= ~(cs - 1);
    }
}

/* ------------------------------------------------------------ create */

struct create_case {
    const char *what;
    uint32_t cluster_size;
    int version;
    int refcount_bits;
    bool lazy;
    int compression;
    int prealloc;
};

static const struct create_case create_cases[] = {
    {"defaults", 65536, 3, 16, false, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_OFF},
    {"v2", 65536, 2, 16, false, QSNAP_COMPRESSION_ZLIB, QSNAP_PREALLOC_OFF},
    {"512-byte clusters", 512, 3, 16, false, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_OFF},
    {"2 MiB clusters", 2u << 20, 3, 16, false, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_OFF},
    {"1-bit refcounts", 65536, 3, 1, false, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_OFF},
    {"64-bit refcounts", 4096, 3, 64, false, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_OFF},
    {"lazy refcounts", 65536, 3, 16, true, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_OFF},
    {"zstd", 65536, 3, 16, false, QSNAP_COMPRESSION_ZSTD, QSNAP_PREALLOC_OFF},
    {"prealloc metadata", 65536, 3, 16, false, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_METADATA},
    {"prealloc falloc", 65536, 3, 16, false, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_FALLOC},
    {"prealloc full", 65536, 3, 16, false, QSNAP_COMPRESSION_ZLIB,
     QSNAP_PREALLOC_FULL},
};
#define N_CREATE (int)(sizeof(create_cases) / sizeof(create_cases[0]))

START_TEST(test_create_options)
{
    const struct create_case *c = &create_cases[_i];
    const uint64_t size = (3u << 20) + 1536; /* not cluster-aligned */
    struct qsnap_create_opts o;
    qsnap_create_opts_init(&o);
    o.size = size;
    o.cluster_size = c->cluster_size;
    o.version = c->version;
    o.refcount_bits = c->refcount_bits;
    o.lazy_refcounts = c->lazy;
    o.compression_type = c->compression;
    o.prealloc = c->prealloc;
    char err[512] = "";
    const char *p = tpath("created.qcow2");
    ck_assert_msg(qsnap_create(p, &o, err, sizeof(err)) == 0, "%s: %s", c->what,
                  err);

    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    oo.flags = QSNAP_OPEN_RDWR;
    ck_assert_msg(qsnap_open(p, &oo, &img, err, sizeof(err)) == 0, "%s: %s",
                  c->what, err);
    struct qsnap_info inf = info_of(img);
    ck_assert_int_eq(inf.format, QSNAP_FMT_QCOW2);
    ck_assert_uint_eq(inf.virtual_size, size);
    ck_assert_uint_eq(inf.cluster_size, c->cluster_size);
    ck_assert_int_eq(inf.version, c->version);
    ck_assert_int_eq(inf.refcount_bits, c->refcount_bits);
    ck_assert_int_eq(inf.lazy_refcounts, c->lazy);
    ck_assert_int_eq(inf.compression_type, c->compression);
    ck_assert(!inf.dirty);
    ck_assert(!inf.corrupt);
    ck_assert(!inf.read_only);
    ck_assert_str_eq(inf.filename, p);
    assert_clean();

    /* The header says the same. */
    ck_assert_uint_eq(img->hdr.version, (unsigned)c->version);
    ck_assert_uint_eq(img->hdr.refcount_order,
                      (unsigned)__builtin_ctz((unsigned)c->refcount_bits));
    ck_assert_uint_eq(!!(img->hdr.incompat & QS_INCOMPAT_COMPRESSION),
                      c->compression == QSNAP_COMPRESSION_ZSTD);

    uint64_t pnum;
    unsigned flags;
    ck_assert_int_eq(
        qsnap_block_status(img, 0, size, &pnum, &flags, NULL, NULL), 0);
    if (c->prealloc == QSNAP_PREALLOC_OFF) {
        ck_assert(!(flags & QSNAP_BS_ALLOCATED));
        ck_assert(flags & QSNAP_BS_ZERO);
    } else {
        ck_assert(flags & QSNAP_BS_ALLOCATED);
        ck_assert_uint_ge(inf.file_size, size);
    }
    if (c->prealloc == QSNAP_PREALLOC_FULL) {
        ck_assert_uint_ge(inf.disk_size, size);
    }

    /* It reads as zeros and takes data anywhere, the last byte too. */
    uint8_t b[3000], r[3000];
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), size - sizeof(r)), 0);
    ck_assert(unit_all(r, sizeof(r), 0));
    unit_fill(b, sizeof(b), 5, 0);
    ck_assert_int_eq(qsnap_pwrite(img, b, sizeof(b), size - sizeof(b)), 0);
    ck_assert_int_eq(qsnap_pwrite(img, b, sizeof(b), 12345), 0);
    ck_assert_int_eq(qsnap_close(img), 0);
    img = NULL;

    oo.flags = 0;
    ck_assert_int_eq(qsnap_open(p, &oo, &img, err, sizeof(err)), 0);
    ck_assert(info_of(img).read_only);
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), size - sizeof(r)), 0);
    ck_assert_mem_eq(r, b, sizeof(b));
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), 12345), 0);
    ck_assert_mem_eq(r, b, sizeof(b));
    assert_clean();
}
END_TEST

struct bad_create {
    const char *what;
    uint32_t cluster_size;
    int version;
    int refcount_bits;
    bool lazy;
    int compression;
    const char *needle; /* the option the message must name */
};

static const struct bad_create bad_creates[] = {
    {"cluster 1000", 1000, 3, 16, false, 0, "cluster_size"},
    {"cluster 256", 256, 3, 16, false, 0, "cluster_size"},
    {"cluster 4 MiB", 4u << 20, 3, 16, false, 0, "cluster_size"},
    {"version 4", 65536, 4, 16, false, 0, "version"},
    {"refcount_bits 3", 65536, 3, 3, false, 0, "refcount_bits"},
    {"refcount_bits 128", 65536, 3, 128, false, 0, "refcount_bits"},
    {"v2 refcount_bits 8", 65536, 2, 8, false, 0, "refcount_bits"},
    {"v2 lazy", 65536, 2, 16, true, 0, "lazy_refcounts"},
    {"v2 zstd", 65536, 2, 16, false, 1, "zstd"},
    {"compression 9", 65536, 3, 16, false, 9, "compression_type"},
};
#define N_BAD_CREATE (int)(sizeof(bad_creates) / sizeof(bad_creates[0]))

START_TEST(test_create_invalid)
{
    const struct bad_create *c = &bad_creates[_i];
    struct qsnap_create_opts o;
    qsnap_create_opts_init(&o);
    o.size = 1 << 20;
    o.cluster_size = c->cluster_size;
    o.version = c->version;
    o.refcount_bits = c->refcount_bits;
    o.lazy_refcounts = c->lazy;
    o.compression_type = c->compression;
    char err[512] = "";
    const char *p = tpath("bad.qcow2");
    ck_assert_int_eq(qsnap_create(p, &o, err, sizeof(err)), -EINVAL);
    ck_assert_msg(strstr(err, c->needle) != NULL, "%s: '%s'", c->what, err);
    ck_assert_msg(strstr(err, p) != NULL, "%s: '%s'", c->what, err);
    struct stat st;
    ck_assert_int_ne(stat(p, &st), 0); /* nothing left behind */
}
END_TEST

START_TEST(test_create_backing)
{
    char err[512] = "";
    struct qsnap_create_opts o;
    qsnap_create_opts_init(&o);
    o.format = QSNAP_FMT_RAW;
    o.size = 1 << 20;
    ck_assert_int_eq(qsnap_create(tpath("base.raw"), &o, err, sizeof(err)), 0);
    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    oo.flags = QSNAP_OPEN_RDWR;
    oo.format = QSNAP_FMT_RAW;
    qsnap_image *base;
    ck_assert_int_eq(
        qsnap_open(tpath("base.raw"), &oo, &base, err, sizeof(err)), 0);
    uint8_t b[10000], r[10000];
    unit_fill(b, sizeof(b), 9, 0);
    ck_assert_int_eq(qsnap_pwrite(base, b, sizeof(b), 5000), 0);
    ck_assert_int_eq(qsnap_close(base), 0);

    qsnap_create_opts_init(&o);
    o.backing_file = "base.raw"; /* relative to the overlay */
    o.backing_fmt = "raw";
    ck_assert_msg(qsnap_create(tpath("top.qcow2"), &o, err, sizeof(err)) == 0,
                  "%s", err);
    qsnap_open_opts_init(&oo);
    oo.flags = QSNAP_OPEN_RDWR;
    ck_assert_msg(qsnap_open(tpath("top.qcow2"), &oo, &img, err, sizeof(err)) ==
                      0,
                  "%s", err);
    const struct qsnap_info inf = info_of(img);
    ck_assert_uint_eq(inf.virtual_size, 1 << 20); /* from the backing */
    ck_assert_str_eq(inf.backing_file, "base.raw");
    ck_assert_str_eq(inf.backing_fmt, "raw");
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), 5000), 0);
    ck_assert_mem_eq(r, b, sizeof(b));

    /* A partial write over backing data keeps the rest of the cluster. */
    uint8_t p[10];
    memset(p, 0xee, sizeof(p));
    ck_assert_int_eq(qsnap_pwrite(img, p, sizeof(p), 6000), 0);
    memcpy(b + 1000, p, sizeof(p));
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), 5000), 0);
    ck_assert_mem_eq(r, b, sizeof(b));
    /* Discard over a backing file still reads zeros. */
    ck_assert_int_eq(qsnap_discard(img, 0, 65536), 0);
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), 5000), 0);
    ck_assert(unit_all(r, sizeof(r), 0));
    assert_clean();
}
END_TEST

/* ------------------------------------------------------------ open */

START_TEST(test_open_close_mem)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    mem_image(&o);
    const struct qsnap_info inf = info_of(img);
    ck_assert_uint_eq(inf.virtual_size, DISK);
    ck_assert_uint_eq(inf.cluster_size, ICS);
    ck_assert_str_eq(inf.filename, UNIT_IMAGE_NAME);
    const size_t before = memio_size(mem);
    ck_assert_int_eq(qsnap_close(img), 0);
    img = NULL;
    /* Opening and closing an empty image writes nothing. */
    ck_assert_uint_eq(memio_size(mem), before);
    ck_assert_uint_eq(memio_refs(mem), 1);
    mem_reopen(0);
    ck_assert(info_of(img).read_only);
    assert_clean();
}
END_TEST

START_TEST(test_open_errors)
{
    char err[512] = "";
    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    const char *p = tpath("missing.qcow2");
    ck_assert_int_eq(qsnap_open(p, &oo, &img, err, sizeof(err)), -ENOENT);
    ck_assert_ptr_nonnull(strstr(err, p));
    ck_assert_ptr_null(img);

    /* Not qcow2 when qcow2 is demanded. */
    FILE *f = fopen(tpath("junk"), "wb");
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < 1000; i++) {
        fputc('j', f);
    }
    fclose(f);
    oo.format = QSNAP_FMT_QCOW2;
    ck_assert_int_eq(qsnap_open(tpath("junk"), &oo, &img, err, sizeof(err)),
                     -EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "magic"));
    /* Probing takes it as raw. */
    oo.format = QSNAP_FMT_AUTO;
    ck_assert_int_eq(qsnap_open(tpath("junk"), &oo, &img, err, sizeof(err)), 0);
    ck_assert_int_eq(info_of(img).format, QSNAP_FMT_RAW);
    ck_assert_uint_eq(info_of(img).virtual_size, 1000);
    ck_assert_int_eq(qsnap_close(img), 0);
    img = NULL;

    /* Bad arguments. */
    oo.flags = QSNAP_OPEN_RDWR | QSNAP_OPEN_FORCE_SHARE;
    ck_assert_int_eq(qsnap_open(tpath("junk"), &oo, &img, err, sizeof(err)),
                     -EINVAL);
    qsnap_open_opts_init(&oo);
    oo.format = 7;
    ck_assert_int_eq(qsnap_open(tpath("junk"), &oo, &img, err, sizeof(err)),
                     -EINVAL);
    ck_assert_int_eq(qsnap_open(NULL, &oo, &img, err, sizeof(err)), -EINVAL);
    ck_assert_int_eq(qsnap_close(NULL), 0);
}
END_TEST

/*
 * qs_open_io() owns the io "also on error" (qs_int.h): every failure must
 * close it, including the argument checks made before anything is read.
 */
START_TEST(test_open_io_owns_io_on_error)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    char err[512] = "";
    ck_assert_int_eq(unit_make_image(&o, &mem, err, sizeof(err)), 0);
    struct qsnap_open_opts oo;

    /* Corrupt header: decode fails, the io is closed. */
    qs_io *junk = memio_new_copy("QFI\xfbjunkjunkjunk", 16);
    ck_assert_ptr_nonnull(junk);
    memio_ref(junk);
    ck_assert_int_lt(unit_open(junk, 0, &img, err, sizeof(err)), 0);
    ck_assert_uint_eq(memio_refs(junk), 1);
    qs_io_close(junk);

    /* Read-write with force-share is refused: still closed. */
    memio_ref(mem);
    ck_assert_int_eq(unit_open(mem, QSNAP_OPEN_RDWR | QSNAP_OPEN_FORCE_SHARE,
                               &img, err, sizeof(err)),
                     -EINVAL);
    ck_assert_msg(memio_refs(mem) == 1,
                  "qs_open_io kept the io after refusing the flags");

    /* Unknown format: likewise. */
    qsnap_open_opts_init(&oo);
    oo.format = 9;
    memio_ref(mem);
    ck_assert_int_eq(
        qs_open_io(UNIT_IMAGE_NAME, mem, &oo, &img, err, sizeof(err)), -EINVAL);
    ck_assert_msg(memio_refs(mem) == 1,
                  "qs_open_io kept the io after refusing the format");
    img = NULL;
}
END_TEST

/* ------------------------------------------------------------ guest I/O */

START_TEST(test_odd_offsets)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    mem_image(&o);
    uint8_t *model = calloc(1, DISK);
    ck_assert_ptr_nonnull(model);
    uint64_t rs = 0x1234567;
    uint8_t *b = malloc(4 * ICS);
    ck_assert_ptr_nonnull(b);

    /* Offsets and lengths around every kind of boundary. */
    static const uint64_t lens[] = {1,    2,    511,  512,   513,  4095,
                                    4096, 4097, 8191, 12289, 16000};
    const uint64_t l2_span = (uint64_t)ICS * (ICS / 8);
    const uint64_t starts[] = {0,       1,           511,     ICS - 1,     ICS,
                               ICS + 1, l2_span - 3, l2_span, DISK - 16000};
    uint64_t seed = 1;
    for (size_t s = 0; s < sizeof(starts) / sizeof(starts[0]); s++) {
        for (size_t l = 0; l < sizeof(lens) / sizeof(lens[0]); l++) {
            const struct op op = {OP_WRITE, starts[s], lens[l], seed++};
            ck_assert_int_eq(op_run(img, &op), 0);
            op_model(model, &op);
            ck_assert_int_eq(qsnap_pread(img, b, lens[l], starts[s]), 0);
            ck_assert_mem_eq(b, model + starts[s], lens[l]);
        }
    }
    /* Random ones. */
    for (int i = 0; i < 300; i++) {
        const uint64_t len = 1 + unit_rand(&rs) % (3 * ICS);
        const uint64_t off = unit_rand(&rs) % (DISK - len);
        const struct op op = {OP_WRITE, off, len, seed++};
        ck_assert_int_eq(op_run(img, &op), 0);
        op_model(model, &op);
        const uint64_t rl = 1 + unit_rand(&rs) % (4 * ICS - 1);
        const uint64_t ro = unit_rand(&rs) % (DISK - rl);
        ck_assert_int_eq(qsnap_pread(img, b, rl, ro), 0);
        ck_assert_mem_eq(b, model + ro, rl);
    }
    /* Zero-length requests are fine anywhere inside, even at the end. */
    ck_assert_int_eq(qsnap_pread(img, b, 0, DISK), 0);
    ck_assert_int_eq(qsnap_pwrite(img, b, 0, DISK), 0);
    assert_content(model, DISK);
    assert_clean();
    mem_reopen(0);
    assert_content(model, DISK);
    free(model);
    free(b);
}
END_TEST

/* Cuts `len` bytes into `n` iovecs of irregular sizes (some empty). */
static void cut_iov(uint8_t *base, uint64_t len, struct iovec *iov, int n,
                    uint64_t *rs)
{
    uint64_t left = len;
    for (int i = 0; i < n; i++) {
        uint64_t take = 0;
        if (i == n - 1) {
            take = left;
        } else if (left && unit_rand(rs) % 5) {
            take = QS_MIN(left, 1 + unit_rand(rs) % (2 * len / n + 1));
        }
        iov[i].iov_base = base;
        iov[i].iov_len = take;
        base += take;
        left -= take;
    }
}

static void vectors_on(qsnap_image *i, uint64_t disk, int n_iov)
{
    const uint64_t len = 3 * ICS + 1001;
    uint8_t *w = malloc(len), *r = malloc(len);
    struct iovec *iov = calloc((size_t)n_iov, sizeof(*iov));
    ck_assert_ptr_nonnull(w);
    ck_assert_ptr_nonnull(r);
    ck_assert_ptr_nonnull(iov);
    uint64_t rs = 77;
    for (int round = 0; round < 8; round++) {
        const uint64_t off = unit_rand(&rs) % (disk - len);
        unit_fill(w, len, (uint64_t)round + 1, off);
        cut_iov(w, len, iov, n_iov, &rs);
        ck_assert_int_eq(qsnap_pwritev(i, iov, n_iov, off), 0);
        memset(r, 0, len);
        cut_iov(r, len, iov, n_iov, &rs); /* a different layout */
        ck_assert_int_eq(qsnap_preadv(i, iov, n_iov, off), 0);
        ck_assert_mem_eq(r, w, len);
        ck_assert_int_eq(qsnap_pread(i, r, len, off), 0);
        ck_assert_mem_eq(r, w, len);
    }
    /* No iovecs at all is a zero-length request. */
    ck_assert_int_eq(qsnap_preadv(i, NULL, 0, 0), 0);
    ck_assert_int_eq(qsnap_pwritev(i, NULL, 0, 0), 0);
    ck_assert_int_eq(qsnap_preadv(i, iov, -1, 0), -EINVAL);
    free(w);
    free(r);
    free(iov);
}

START_TEST(test_vectors_mem)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    mem_image(&o);
    vectors_on(img, DISK, 3);
    vectors_on(img, DISK, 100);
    assert_clean();
}
END_TEST

START_TEST(test_vectors_file)
{
    /* More iovecs than IOV_MAX, through the POSIX back-end. */
    file_image("v.qcow2", 0);
    vectors_on(img, DISK, 1500);
    /* The writeback hint changes nothing a reader can see. */
    ck_assert_int_eq(qsnap_start_writeback(img), 0);
    ck_assert_int_eq(qsnap_start_writeback(NULL), -EINVAL);
    vectors_on(img, DISK, 7);
    assert_clean();
}
END_TEST

START_TEST(test_alloc_buf_direct)
{
    /* Small buffers are page-aligned, from 1 MiB up 2 MiB-aligned, and
     * both carry O_DIRECT requests through a NOCACHE handle. */
    const size_t big = 4u << 20;
    uint8_t *mib = qsnap_alloc_buf(1u << 20);
    ck_assert_ptr_nonnull(mib);
    ck_assert_uint_eq((uintptr_t)mib % (2u << 20), 0);
    memset(mib, 1, 1u << 20);
    qsnap_free_buf(mib);
    uint8_t *small = qsnap_alloc_buf(4096);
    uint8_t *w = qsnap_alloc_buf(big);
    uint8_t *r = qsnap_alloc_buf(big);
    ck_assert_ptr_nonnull(small);
    ck_assert_ptr_nonnull(w);
    ck_assert_ptr_nonnull(r);
    ck_assert_uint_eq((uintptr_t)small % 4096, 0);
    ck_assert_uint_eq((uintptr_t)w % (2u << 20), 0);
    ck_assert_uint_eq((uintptr_t)r % (2u << 20), 0);
    for (size_t i = 0; i < big; i++) {
        w[i] = (uint8_t)(i * 7 + i / 4096);
    }
    memset(small, 0x5a, 4096);

    file_image("d.qcow2", QSNAP_OPEN_NOCACHE);
    ck_assert_int_eq(qsnap_pwrite(img, w, big, 0), 0);
    ck_assert_int_eq(qsnap_pwrite(img, small, 4096, big), 0);
    ck_assert_int_eq(qsnap_pread(img, r, big, 0), 0);
    ck_assert_mem_eq(r, w, big);
    ck_assert_int_eq(qsnap_pread(img, r, 4096, big), 0);
    ck_assert_mem_eq(r, small, 4096);
    assert_clean();
    qsnap_free_buf(small);
    qsnap_free_buf(w);
    qsnap_free_buf(r);
    qsnap_free_buf(NULL);
}
END_TEST

/* Pages of [off, off + len) of `path` in the page cache.  (Not at offset
 * 0: valgrind reads the start of every file mapped, to look for ELF.) */
static size_t resident_pages(const char *path, off_t off, size_t len)
{
    const int fd = open(path, O_RDONLY);
    ck_assert_int_ge(fd, 0);
    void *m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, off);
    ck_assert_ptr_ne(m, MAP_FAILED);
    unsigned char vec[256];
    ck_assert_uint_le(len / 4096, sizeof(vec));
    ck_assert_int_eq(mincore(m, len, vec), 0);
    size_t n = 0;
    for (size_t i = 0; i < len / 4096; i++) {
        n += vec[i] & 1;
    }
    munmap(m, len);
    close(fd);
    return n;
}

START_TEST(test_bulk_writes)
{
    /* Bulk writes (VM state) land like plain ones, aligned or not, and
     * stay coherent with buffered I/O over the same bytes.  On a disk
     * file system with O_DIRECT an aligned one goes past the page cache:
     * none of its pages is resident afterwards (a buffered write would
     * leave them all there). */
    const char *path = tpath("bulk");
    const size_t len = 512u << 10;
    char err[256];
    qs_io *io;
    ck_assert_int_eq(qs_io_open_posix(path, QS_IO_RDWR | QS_IO_CREATE, &io, err,
                                      sizeof(err)),
                     0);
    uint8_t *a = qs_alloc_buf(len);
    uint8_t *b = qs_alloc_buf(len);
    uint8_t *r = qs_alloc_buf(len + 8192);
    ck_assert(a && b && r);
    for (size_t i = 0; i < len; i++) {
        a[i] = (uint8_t)(i * 13 + 1);
        b[i] = (uint8_t)(i * 7 + i / 4096);
    }
    /* b at [len, 2 len), in two pieces. */
    struct iovec v[2] = {{b, len / 2}, {b + len / 2, len / 2}};
    ck_assert_int_eq(qs_io_pwritev_bulk(io, v, 2, len), 0);

    /* Where O_DIRECT is known to skip the cache: ext2/3/4 and XFS (tmpfs
     * keeps its data there, btrfs may fall back to buffered I/O). */
    struct statfs fs;
    ck_assert_int_eq(statfs(path, &fs), 0);
    if (fs.f_type == EXT4_SUPER_MAGIC || fs.f_type == XFS_SUPER_MAGIC) {
        ck_assert_uint_eq(resident_pages(path, (off_t)len, len), 0);
    } else {
        fprintf(stderr,
                "test_bulk_writes: %s is on file system 0x%lx; page "
                "cache residency not checked\n",
                dir, (unsigned long)fs.f_type);
    }
    /* Unaligned: buffer, length and offset (buffered underneath). */
    struct iovec u = {a + 1, 5000};
    ck_assert_int_eq(qs_io_pwritev_bulk(io, &u, 1, 2 * len + 3), 0);
    ck_assert_int_eq(qs_io_pread(io, r, len + 8192, len), 0);
    ck_assert_mem_eq(r, b, len);
    ck_assert_uint_eq(r[len], 0);
    ck_assert_mem_eq(r + len + 3, a + 1, 5000);
    /* Buffered over bulk, then bulk over buffered, on one page. */
    ck_assert_int_eq(qs_io_pwrite(io, a, 100, len + 4096 + 7), 0);
    struct iovec w = {a, 4096};
    ck_assert_int_eq(qs_io_pwritev_bulk(io, &w, 1, len + 8192), 0);
    ck_assert_int_eq(qs_io_flush(io), 0);
    ck_assert_int_eq(qs_io_pread(io, r, 3 * 4096, len + 4096), 0);
    ck_assert_mem_eq(r, b + 4096, 7);
    ck_assert_mem_eq(r + 7, a, 100);
    ck_assert_mem_eq(r + 107, b + 4096 + 107, 4096 - 107);
    ck_assert_mem_eq(r + 4096, a, 4096);
    ck_assert_mem_eq(r + 8192, b + 3 * 4096, 4096);
    qs_io_close(io);
    free(a);
    free(b);
    free(r);
}
END_TEST

static uint64_t host_size(const char *name)
{
    struct stat st;
    ck_assert_int_eq(stat(tpath(name), &st), 0);
    return (uint64_t)st.st_size;
}

START_TEST(test_reserve_ahead)
{
    /* Growing the image reserves host space past its last cluster; small
     * writes into fresh clusters there leave the zeros around them
     * unwritten; closing cuts off what is left of the reservation. */
    file_image("r.qcow2", 0);
    uint8_t *model = calloc(1, DISK);
    ck_assert_ptr_nonnull(model);
    uint8_t buf[1024];
    for (unsigned c = 0; c < 256; c++) {
        /* Every third cluster: head, middle or tail of it, or two. */
        const uint64_t off = (uint64_t)c * 3 * ICS + (c % 5) * 1024 +
                             (c % 7 == 0 ? ICS - 512 : 0);
        memset(buf, (int)(c + 1), sizeof(buf));
        ck_assert_int_eq(qsnap_pwrite(img, buf, sizeof(buf), off), 0);
        memcpy(model + off, buf, sizeof(buf));
    }
    /* Into a cluster between two written ones, and over one whole. */
    memset(buf, 0x77, sizeof(buf));
    ck_assert_int_eq(qsnap_pwrite(img, buf, sizeof(buf), 4 * ICS + 100), 0);
    memcpy(model + 4 * ICS + 100, buf, sizeof(buf));
    assert_content(model, DISK);
    const struct qsnap_check_result r = check_now();
    ck_assert_uint_eq(r.corruptions, 0);
    ck_assert_uint_eq(r.leaks, 0);
    ck_assert_uint_gt(host_size("r.qcow2"), r.image_end_offset);
    ck_assert_uint_eq(host_size("r.qcow2") % (1u << 20), 0);

    ck_assert_int_eq(qsnap_close(img), 0);
    img = NULL;
    ck_assert_uint_eq(host_size("r.qcow2"), r.image_end_offset);
    struct qsnap_open_opts oo;
    char err[512] = "";
    qsnap_open_opts_init(&oo);
    ck_assert_msg(qsnap_open(tpath("r.qcow2"), &oo, &img, err, sizeof(err)) ==
                      0,
                  "%s", err);
    assert_content(model, DISK);
    assert_clean();
    free(model);
}
END_TEST

/*
 * Allocating writes from many threads into the same clusters: thread t
 * owns sector t of every cluster, so every cluster is allocated by one of
 * them while the others wait for it, and then written in place.  Half the
 * clusters start shared with a snapshot, so their first write copies.
 */
#define MT_THREADS 6
#define MT_CLUSTERS 64
#define MT_ROUNDS 3

struct mt_arg {
    unsigned t;
    int failed;
};

static uint8_t mt_byte(unsigned t, unsigned c, unsigned round)
{
    return (uint8_t)(1 + t * 31 + c * 7 + round * 101);
}

static void *mt_writer(void *opaque)
{
    struct mt_arg *a = opaque;
    uint8_t buf[512];
    for (unsigned round = 0; round < MT_ROUNDS; round++) {
        for (unsigned i = 0; i < MT_CLUSTERS; i++) {
            /* Each thread walks the clusters in its own order. */
            const unsigned c = (i * 13 + a->t * 5) % MT_CLUSTERS;
            memset(buf, mt_byte(a->t, c, round), sizeof(buf));
            if (qsnap_pwrite(img, buf, sizeof(buf),
                             (uint64_t)c * ICS + a->t * 512) < 0) {
                a->failed = 1;
            }
        }
    }
    return NULL;
}

START_TEST(test_concurrent_allocating_writes)
{
    file_image("mt.qcow2", 0);
    uint8_t *c0 = malloc(ICS);
    ck_assert_ptr_nonnull(c0);
    memset(c0, 0xee, ICS);
    for (unsigned c = 0; c < MT_CLUSTERS; c += 2) {
        ck_assert_int_eq(qsnap_pwrite(img, c0, ICS, (uint64_t)c * ICS), 0);
    }
    ck_assert_int_eq(qsnap_snapshot_create(img, "before", NULL), 0);

    pthread_t th[MT_THREADS];
    struct mt_arg args[MT_THREADS];
    for (unsigned t = 0; t < MT_THREADS; t++) {
        args[t] = (struct mt_arg){.t = t};
        ck_assert_int_eq(pthread_create(&th[t], NULL, mt_writer, &args[t]),
                         0);
    }
    for (unsigned t = 0; t < MT_THREADS; t++) {
        pthread_join(th[t], NULL);
        ck_assert_int_eq(args[t].failed, 0);
    }

    uint8_t *got = malloc(ICS);
    ck_assert_ptr_nonnull(got);
    for (unsigned c = 0; c < MT_CLUSTERS; c++) {
        ck_assert_int_eq(qsnap_pread(img, got, ICS, (uint64_t)c * ICS), 0);
        for (unsigned t = 0; t < MT_THREADS; t++) {
            const uint8_t want = mt_byte(t, c, MT_ROUNDS - 1);
            for (unsigned b = 0; b < 512; b++) {
                ck_assert_msg(got[t * 512 + b] == want,
                              "cluster %u sector %u byte %u: %u, want %u", c,
                              t, b, got[t * 512 + b], want);
            }
        }
        /* The rest of the cluster kept what was there before. */
        const uint8_t rest = c % 2 == 0 ? 0xee : 0;
        for (size_t b = MT_THREADS * 512; b < ICS; b++) {
            ck_assert_msg(got[b] == rest, "cluster %u byte %zu: %u, want %u",
                          c, b, got[b], rest);
        }
    }
    /* The snapshot still holds the old content. */
    qsnap_view *v;
    ck_assert_int_eq(qsnap_view_open(img, "before", &v), 0);
    for (unsigned c = 0; c < MT_CLUSTERS; c++) {
        ck_assert_int_eq(qsnap_view_pread(v, got, ICS, (uint64_t)c * ICS), 0);
        for (size_t b = 0; b < ICS; b++) {
            ck_assert_uint_eq(got[b], c % 2 == 0 ? 0xee : 0);
        }
    }
    qsnap_view_close(v);
    assert_clean();
    free(got);
    free(c0);
}
END_TEST

START_TEST(test_out_of_range)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    mem_image(&o);
    uint8_t b[100];
    memset(b, 1, sizeof(b));
    ck_assert_int_eq(qsnap_pread(img, b, 20, DISK - 10), -EINVAL);
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), UNIT_IMAGE_NAME));
    ck_assert_int_eq(qsnap_pwrite(img, b, 20, DISK - 10), -EINVAL);
    ck_assert_int_eq(qsnap_pread(img, b, 1, DISK), -EINVAL);
    ck_assert_int_eq(qsnap_pwrite(img, b, 1, DISK + 4096), -EINVAL);
    ck_assert_int_eq(qsnap_pread(img, b, 1, UINT64_MAX), -EINVAL);
    ck_assert_int_eq(qsnap_pwrite(img, b, 2, UINT64_MAX - 1), -EINVAL);
    ck_assert_int_eq(qsnap_write_zeroes(img, DISK - 10, 20, 0), -EINVAL);
    ck_assert_int_eq(qsnap_discard(img, DISK, 1), -EINVAL);
    ck_assert_int_eq(qsnap_discard(img, 10, UINT64_MAX), -EINVAL);
    uint8_t *c = calloc(1, ICS);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(qsnap_write_compressed(img, c, ICS, DISK), -EINVAL);
    /* Unaligned or partial compressed writes. */
    ck_assert_int_eq(qsnap_write_compressed(img, c, ICS, 512), -EINVAL);
    ck_assert_int_eq(qsnap_write_compressed(img, c, ICS - 1, 0), -EINVAL);
    free(c);
    /* The last bytes are in range. */
    ck_assert_int_eq(qsnap_pwrite(img, b, 10, DISK - 10), 0);
    ck_assert_int_eq(qsnap_pread(img, b, 10, DISK - 10), 0);
    /* Nothing was written by the refused calls. */
    uint8_t z[20];
    ck_assert_int_eq(qsnap_pread(img, z, 10, DISK - 20), 0);
    ck_assert(unit_all(z, 10, 0));
    assert_clean();
}
END_TEST

START_TEST(test_read_only)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    mem_image(&o);
    uint8_t b[4096];
    unit_fill(b, sizeof(b), 3, 0);
    ck_assert_int_eq(qsnap_pwrite(img, b, sizeof(b), 0), 0);
    mem_reopen(0);
    const size_t size = memio_size(mem);
    memio_log_start(mem);

    ck_assert_int_eq(qsnap_pwrite(img, b, 10, 0), -EROFS);
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), UNIT_IMAGE_NAME));
    struct iovec v = {b, 10};
    ck_assert_int_eq(qsnap_pwritev(img, &v, 1, 0), -EROFS);
    ck_assert_int_eq(qsnap_write_zeroes(img, 0, 4096, 0), -EROFS);
    ck_assert_int_eq(qsnap_discard(img, 0, 4096), -EROFS);
    ck_assert_int_eq(qsnap_write_compressed(img, b, ICS, 0), -EROFS);
    ck_assert_int_eq(qsnap_resize(img, DISK * 2, 0), -EROFS);
    struct qsnap_check_result r;
    memset(&r, 0, sizeof(r));
    r.struct_size = sizeof(r);
    ck_assert_int_eq(qsnap_check(img, QSNAP_CHECK_REPAIR_LEAKS, &r, NULL, NULL),
                     -EROFS);
    ck_assert_int_eq(qsnap_flush(img), 0);
    /* Reads work; the file was not touched. */
    uint8_t c[4096];
    ck_assert_int_eq(qsnap_pread(img, c, sizeof(c), 0), 0);
    ck_assert_mem_eq(c, b, sizeof(b));
    ck_assert_int_lt(memio_log_find(mem, 0, UNIT_OP_WRITE, 0, UINT64_MAX), 0);
    ck_assert_int_lt(memio_log_find(mem, 0, UNIT_OP_TRUNCATE, 0, 0), 0);
    ck_assert_uint_eq(memio_size(mem), size);
}
END_TEST

START_TEST(test_resize)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    o.cluster_size = 512; /* small L2 spans: growing needs a new L1 */
    o.size = 1 << 20;
    mem_image(&o);
    const uint32_t l1_before = img->l1_size;
    uint8_t b[5000], r[5000];
    unit_fill(b, sizeof(b), 8, 0);
    ck_assert_int_eq(qsnap_pwrite(img, b, sizeof(b), (1 << 20) - 5000), 0);

    /* Grow: old data stays, new space reads as zeros and takes data.
     * An odd size is rounded up to whole 512-byte sectors, as QEMU's. */
    const uint64_t asked = (64u << 20) + 7;
    const uint64_t big = (asked + 511) & ~(uint64_t)511;
    ck_assert_int_eq(qsnap_resize(img, asked, 0), 0);
    ck_assert_uint_eq(info_of(img).virtual_size, big);
    ck_assert_uint_gt(img->l1_size, l1_before);
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), (1 << 20) - 5000), 0);
    ck_assert_mem_eq(r, b, sizeof(b));
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), big - sizeof(r)), 0);
    ck_assert(unit_all(r, sizeof(r), 0));
    ck_assert_int_eq(qsnap_pwrite(img, b, sizeof(b), big - sizeof(b)), 0);
    assert_clean();
    mem_reopen(QSNAP_OPEN_RDWR);
    ck_assert_uint_eq(info_of(img).virtual_size, big);
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), big - sizeof(r)), 0);
    ck_assert_mem_eq(r, b, sizeof(b));

    /* Shrinking needs the flag, and nothing allocated past the end. */
    ck_assert_int_eq(qsnap_resize(img, 2 << 20, 0), -EINVAL);
    ck_assert_ptr_nonnull(strstr(qsnap_errmsg(img), UNIT_IMAGE_NAME));
    ck_assert_int_eq(qsnap_resize(img, 2 << 20, QSNAP_RESIZE_SHRINK), -EINVAL);
    ck_assert_uint_eq(info_of(img).virtual_size, big);
    ck_assert_int_eq(qsnap_discard(img, 2 << 20, big - (2 << 20)), 0);
    ck_assert_int_eq(qsnap_resize(img, 2 << 20, QSNAP_RESIZE_SHRINK), 0);
    ck_assert_uint_eq(info_of(img).virtual_size, 2 << 20);
    ck_assert_int_eq(qsnap_pread(img, r, 1, 2 << 20), -EINVAL);
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), (1 << 20) - 5000), 0);
    ck_assert_mem_eq(r, b, sizeof(b));
    /* Same size is a no-op; growing again shows zeros, not old data. */
    ck_assert_int_eq(qsnap_resize(img, 2 << 20, 0), 0);
    ck_assert_int_eq(qsnap_resize(img, big, 0), 0);
    ck_assert_int_eq(qsnap_pread(img, r, sizeof(r), big - sizeof(r)), 0);
    ck_assert(unit_all(r, sizeof(r), 0));
    assert_clean();
    mem_reopen(0);
    assert_clean();
}
END_TEST

/* ------------------------------------------------------------ sequences */

struct seq_case {
    const char *what;
    uint32_t cluster_size;
    int version;
    int refcount_bits;
    bool lazy;
    int compression;
};

static const struct seq_case seq_cases[] = {
    {"v3 zlib", ICS, 3, 16, false, QSNAP_COMPRESSION_ZLIB},
    {"v3 zstd", ICS, 3, 16, false, QSNAP_COMPRESSION_ZSTD},
    {"v2", ICS, 2, 16, false, QSNAP_COMPRESSION_ZLIB},
    {"lazy", ICS, 3, 16, true, QSNAP_COMPRESSION_ZLIB},
    {"512-byte clusters, 2-bit refcounts", 512, 3, 2, false,
     QSNAP_COMPRESSION_ZLIB},
    {"64 KiB clusters, 64-bit refcounts", 65536, 3, 64, false,
     QSNAP_COMPRESSION_ZSTD},
};
#define N_SEQ (int)(sizeof(seq_cases) / sizeof(seq_cases[0]))

START_TEST(test_random_ops_clean)
{
    const struct seq_case *c = &seq_cases[_i];
    struct qsnap_create_opts o;
    opts_mem(&o);
    o.cluster_size = c->cluster_size;
    o.version = c->version;
    o.refcount_bits = c->refcount_bits;
    o.lazy_refcounts = c->lazy;
    o.compression_type = c->compression;
    mem_image(&o);
    uint8_t *model = calloc(1, DISK);
    ck_assert_ptr_nonnull(model);
    uint64_t rs = 0xfeed + (uint64_t)_i;
    /* Compressed clusters share host clusters: 2-bit refcounts would
     * overflow, which is a refusal, not a bug, so leave them out. */
    const bool comp = c->refcount_bits >= 16;

    for (int i = 0; i < 400; i++) {
        struct op op;
        op_random(&rs, DISK, c->cluster_size, comp, &op);
        const int ret = op_run(img, &op);
        ck_assert_msg(
            ret == 0,
            "%s: op %d kind %d off %" PRIu64 " len %" PRIu64 ": %d (%s)",
            c->what, i, op.kind, op.off, op.len, ret, qsnap_errmsg(img));
        op_model(model, &op);
        if (i % 100 == 99) {
            const struct qsnap_check_result r = check_now();
            ck_assert_msg(r.corruptions == 0 && r.leaks == 0,
                          "%s: after op %d: %" PRIu64 " corruptions, %" PRIu64
                          " leaks",
                          c->what, i, r.corruptions, r.leaks);
            ck_assert_int_eq(mem_reopen(QSNAP_OPEN_RDWR), 0);
            assert_content(model, DISK);
        }
    }
    assert_clean();
    ck_assert_int_eq(mem_reopen(0), 0);
    assert_content(model, DISK);
    assert_clean();
    ck_assert(!info_of(img).dirty);
    free(model);
}
END_TEST

/* ------------------------------------------------------------ dirty */

struct drop_blocks {
    const struct qsnap_image *img;
};

/* Keeps every pending write except those to a refcount block. */
static bool keep_not_refblock(void *opaque, size_t idx, enum qs_fault_op op,
                              uint64_t off, uint64_t len)
{
    const struct drop_blocks *d = opaque;
    (void)idx;
    if (op != QS_FAULT_WRITE) {
        return true;
    }
    for (uint64_t i = 0; i < d->img->rt_size; i++) {
        const uint64_t b = d->img->rt[i] & QS_RT_OFFSET_MASK;
        if (b && off < b + d->img->cluster_size && b < off + len) {
            return false;
        }
    }
    return true;
}

START_TEST(test_dirty_rebuild)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    o.lazy_refcounts = true;
    char err[512] = "";
    ck_assert_int_eq(unit_make_image(&o, &mem, err, sizeof(err)), 0);
    qs_io *fio = qs_faultio_new(memio_ref(mem));
    ck_assert_ptr_nonnull(fio);
    ck_assert_int_eq(unit_open(fio, QSNAP_OPEN_RDWR, &img, err, sizeof(err)),
                     0);

    uint8_t *model = calloc(1, DISK);
    ck_assert_ptr_nonnull(model);
    const struct op a = {OP_WRITE, 0, 8 * ICS, 1};
    ck_assert_int_eq(op_run(img, &a), 0);
    op_model(model, &a);
    ck_assert_int_eq(qsnap_flush(img), 0);
    ck_assert(info_of(img).dirty); /* lazy: dirty until closed */
    struct qs_mapping m0, m5;
    ck_assert_int_eq(qs_map(img, 0, ICS, &m0), 0);
    ck_assert_int_eq(qs_map(img, 5 * ICS, ICS, &m5), 0);
    ck_assert_int_eq(m5.type, QS_C_NORMAL);
    const struct op d = {OP_DISCARD, 4 * ICS, 4 * ICS, 0};
    ck_assert_int_eq(op_run(img, &d), 0);
    op_model(model, &d);
    ck_assert_int_eq(qsnap_flush(img), 0);

    /* Power loss: the handle can only be freed, the dirty bit stays. */
    ck_assert_int_ge(qs_faultio_crash(fio, NULL, NULL), 0);
    ck_assert_int_lt(qsnap_close(img), 0);
    img = NULL;
    ck_assert_uint_eq(memio_refs(mem), 1);
    uint8_t *raw = memio_data(mem, NULL);
    ck_assert_uint_ne(qs_be64_load(raw + 72) & QS_INCOMPAT_DIRTY, 0);

    /* Lazy refcounts let refcounts lag behind the tables: one increment
     * and one decrement that never reached the disk. */
    const uint64_t rt_off = qs_be64_load(raw + 48);
    const uint64_t blk = qs_be64_load(raw + rt_off) & QS_RT_OFFSET_MASK;
    ck_assert_uint_ne(blk, 0);
    qs_be16_store(raw + blk + 2 * (m0.host_off / ICS), 0);
    qs_be16_store(raw + blk + 2 * (m5.host_off / ICS), 2);

    /* As it is: a reference without a refcount, and a leak. */
    memio_ref(mem);
    ck_assert_int_eq(unit_open(mem, QSNAP_OPEN_CHECK, &img, err, sizeof(err)),
                     0);
    ck_assert(info_of(img).dirty);
    const struct qsnap_check_result r = check_now();
    ck_assert_uint_ge(r.corruptions, 1);
    ck_assert_uint_ge(r.leaks, 1);
    ck_assert_int_eq(qsnap_close(img), 0);
    img = NULL;

    /* A read-write open recomputes the refcounts first. */
    memio_ref(mem);
    ck_assert_msg(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)) == 0,
                  "%s", err);
    ck_assert(!info_of(img).dirty);
    assert_clean();
    assert_content(model, DISK);
    /* And it stays usable. */
    const struct op c = {OP_WRITE, 100 * ICS, 2 * ICS, 3};
    ck_assert_int_eq(op_run(img, &c), 0);
    op_model(model, &c);
    ck_assert_int_eq(mem_reopen(0), 0);
    ck_assert(!info_of(img).dirty);
    ck_assert_uint_eq(
        qs_be64_load(memio_data(mem, NULL) + 72) & QS_INCOMPAT_DIRTY, 0);
    assert_clean();
    assert_content(model, DISK);
    free(model);
}
END_TEST

/* ------------------------------------------------------------ I/O errors */

/*
 * Per-cluster digests of the guest content after each operation since
 * the last successful flush: after a failure, every cluster must show one
 * of those states (or the failed operation's), never anything else.
 */
struct states {
    uint64_t n_clusters;
    uint64_t cs;
    uint64_t *cur; /* digests of the model as it is now */
    uint64_t *h;   /* n states x n_clusters */
    size_t n;
    size_t cap;
};

static uint64_t digest(const uint8_t *p, uint64_t len)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    uint64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        h = (h ^ w) * UINT64_C(0x100000001b3);
        h ^= h >> 29;
    }
    for (; i < len; i++) {
        h = (h ^ p[i]) * UINT64_C(0x100000001b3);
    }
    return h;
}

static void states_init(struct states *s, const uint8_t *model, uint64_t size,
                        uint64_t cs)
{
    memset(s, 0, sizeof(*s));
    s->n_clusters = size / cs;
    s->cs = cs;
    s->cur = malloc(s->n_clusters * sizeof(*s->cur));
    ck_assert_ptr_nonnull(s->cur);
    for (uint64_t c = 0; c < s->n_clusters; c++) {
        s->cur[c] = digest(model + c * cs, cs);
    }
}

static void states_free(struct states *s)
{
    free(s->cur);
    free(s->h);
}

/* The model changed in [off, off+len): refresh those digests. */
static void states_touch(struct states *s, const uint8_t *model, uint64_t off,
                         uint64_t len)
{
    if (!len) {
        return;
    }
    for (uint64_t c = off / s->cs; c <= (off + len - 1) / s->cs; c++) {
        s->cur[c] = digest(model + c * s->cs, s->cs);
    }
}

static void states_reset(struct states *s)
{
    s->n = 0;
}

/* Records the current model as a possible state. */
static void states_add(struct states *s)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 8;
        s->h = realloc(s->h, s->cap * s->n_clusters * sizeof(*s->h));
        ck_assert_ptr_nonnull(s->h);
    }
    memcpy(s->h + s->n * s->n_clusters, s->cur,
           s->n_clusters * sizeof(*s->cur));
    s->n++;
}

static void states_assert(const struct states *s, const char *what)
{
    uint8_t *b = malloc(s->cs);
    ck_assert_ptr_nonnull(b);
    for (uint64_t c = 0; c < s->n_clusters; c++) {
        const int ret = qsnap_pread(img, b, s->cs, c * s->cs);
        ck_assert_msg(ret == 0, "%s: reading cluster %" PRIu64 ": %d %s", what,
                      c, ret, qsnap_errmsg(img));
        const uint64_t h = digest(b, s->cs);
        bool ok = false;
        for (size_t k = 0; k < s->n && !ok; k++) {
            ok = s->h[k * s->n_clusters + c] == h;
        }
        ck_assert_msg(
            ok,
            "%s: guest bytes %" PRIu64 "+%" PRIu64 " hold content they "
            "never had",
            what, c * s->cs, s->cs);
    }
    free(b);
}

/* Applies `o` to the model and records the resulting state. */
static void states_step(struct states *s, uint8_t *model, const struct op *o)
{
    op_model(model, o);
    if (o->kind == OP_FLUSH) {
        states_reset(s);
    } else {
        states_touch(s, model, o->off, o->len);
    }
    states_add(s);
}

/* A fixed workload touching every kind of metadata change, on a 2 MiB
 * disk with 1 KiB clusters (an L2 table spans 128 KiB). */
#define WCS 1024u
#define WDISK (2u << 20)
static const struct op workload[] = {
    {OP_WRITE, 0, 3 * WCS + 100, 1},
    {OP_WRITE, 10 * WCS + 5, 2 * WCS, 2},
    {OP_FLUSH, 0, 0, 0},
    {OP_WRITE, WCS + 7, 100, 3}, /* in place */
    {OP_ZERO, 2 * WCS, WCS, 0},
    {OP_DISCARD, 10 * WCS, 3 * WCS, 0},
    {OP_WRITE, 1000 * WCS + 1, 2 * WCS + 3, 4}, /* another L2 table */
    {OP_COMPRESSED, 20 * WCS, WCS, 5},
    {OP_COMPRESSED, 21 * WCS, WCS, 6},
    {OP_FLUSH, 0, 0, 0},
    {OP_WRITE, 20 * WCS + 10, 10, 7}, /* over a compressed cluster */
    {OP_ZERO_UNMAP, 0, WCS, 0},
    {OP_WRITE, 1500 * WCS, 4 * WCS, 8},
    {OP_FLUSH, 0, 0, 0},
};
#define N_WORK (sizeof(workload) / sizeof(workload[0]))

struct fault_case {
    const char *what;
    enum qs_fault_op op;
    int err;
    bool sticky;
};

static const struct fault_case fault_cases[] = {
    {"write EIO", QS_FAULT_WRITE, EIO, false},
    {"write ENOSPC", QS_FAULT_WRITE, ENOSPC, false},
    {"write EIO, device dead", QS_FAULT_WRITE, EIO, true},
    {"flush EIO", QS_FAULT_FLUSH, EIO, false},
    {"flush EIO, device dead", QS_FAULT_FLUSH, EIO, true},
    {"punch EIO", QS_FAULT_PUNCH, EIO, false},
};
#define N_FAULT (int)(sizeof(fault_cases) / sizeof(fault_cases[0]))

START_TEST(test_fault_injection)
{
    const struct fault_case *fc = &fault_cases[_i];
    struct qsnap_create_opts o;
    opts_mem(&o);
    o.size = WDISK;
    o.cluster_size = WCS;
    char err[512] = "";
    qs_io *base;
    ck_assert_int_eq(unit_make_image(&o, &base, err, sizeof(err)), 0);
    uint8_t *model = malloc(WDISK);
    ck_assert_ptr_nonnull(model);
    int runs_with_fault = 0;

    for (unsigned long n = 1; n < 400; n++) {
        mem = memio_clone(base);
        ck_assert_ptr_nonnull(mem);
        qs_io *fio = qs_faultio_new(memio_ref(mem));
        ck_assert_int_eq(
            unit_open(fio, QSNAP_OPEN_RDWR, &img, err, sizeof(err)), 0);
        qs_faultio_fail_nth(fio, fc->op, n, fc->err, fc->sticky);
        memset(model, 0, WDISK);
        struct states st;
        states_init(&st, model, WDISK, WCS);
        states_add(&st);

        int failed_at = -1, ret = 0;
        for (size_t k = 0; k < N_WORK; k++) {
            ret = op_run(img, &workload[k]);
            if (ret < 0) {
                /* It may have happened in part. */
                failed_at = (int)k;
                op_model(model, &workload[k]);
                states_touch(&st, model, workload[k].off, workload[k].len);
                states_add(&st);
                break;
            }
            states_step(&st, model, &workload[k]);
        }
        const bool injected = qs_faultio_injected(fio) > 0;
        if (failed_at >= 0) {
            ck_assert_msg(injected,
                          "%s, n=%lu: op %d failed with %d (%s) "
                          "but no fault was injected",
                          fc->what, n, failed_at, ret, qsnap_errmsg(img));
            ck_assert_msg(ret == -fc->err, "%s, n=%lu: op %d returned %d",
                          fc->what, n, failed_at, ret);
        }
        qsnap_close(img); /* may fail: the device may be gone */
        img = NULL;
        if (!injected) {
            /* The fault lies past the workload: every case was seen. */
            states_free(&st);
            qs_io_close(mem);
            mem = NULL;
            break;
        }
        runs_with_fault++;

        ck_assert_uint_eq(memio_refs(mem), 1);
        memio_ref(mem);
        ck_assert_msg(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)) ==
                          0,
                      "%s, n=%lu: reopen: %s", fc->what, n, err);
        const struct qsnap_check_result r = check_now();
        ck_assert_msg(r.corruptions == 0,
                      "%s, n=%lu (op %d): %" PRIu64 " corruptions", fc->what, n,
                      failed_at, r.corruptions);
        char what[128];
        snprintf(what, sizeof(what), "%s, n=%lu, op %d", fc->what, n,
                 failed_at);
        states_assert(&st, what);
        states_free(&st);
        ck_assert_int_eq(qsnap_close(img), 0);
        img = NULL;
        qs_io_close(mem);
        mem = NULL;
    }
    if (fc->op != QS_FAULT_PUNCH) {
        ck_assert_int_ge(runs_with_fault, 3);
    }
    qs_io_close(base);
    free(model);
}
END_TEST

START_TEST(test_close_aborts_checkpoint)
{
    /* Closing an image with a checkpoint still open (its container's
     * threads busy with 12 MiB of state) aborts it: no snapshot, nothing
     * left in use, a consistent image. */
    file_image("ck.qcow2", 0);
    const size_t len = 12u << 20;
    uint8_t *state = malloc(len);
    ck_assert_ptr_nonnull(state);
    uint64_t x = 88172645463325252ull;
    for (size_t i = 0; i < len; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        memcpy(state + i, &x, 8);
    }
    qsnap_checkpoint *ck;
    ck_assert_int_eq(
        qsnap_checkpoint_begin(img, "ck", NULL, QSNAP_CHECKPOINT_SECTIONS, &ck),
        0);
    ck_assert_int_eq(qsnap_checkpoint_section_begin(ck, "ram"), 0);
    ck_assert_int_eq(qsnap_checkpoint_section_write(ck, state, len), 0);
    ck_assert_int_eq(qsnap_close(img), 0);
    img = NULL;
    free(state);

    char err[512];
    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    o.flags = QSNAP_OPEN_RDWR;
    ck_assert_int_eq(qsnap_open(tpath("ck.qcow2"), &o, &img, err, sizeof(err)),
                     0);
    struct qsnap_snapshot_info *list;
    uint32_t count;
    ck_assert_int_eq(qsnap_snapshot_list(img, &list, &count), 0);
    ck_assert_uint_eq(count, 0);
    qsnap_snapshot_list_free(list, count);
    const struct qsnap_check_result r = check_now();
    ck_assert_uint_eq(r.corruptions, 0);
    ck_assert_uint_eq(r.leaks, 0);
}
END_TEST

START_TEST(test_switch_flush_fails)
{
    /* A checkpoint's VM state lies past the disk, so writing it grows the
     * L1 table: a header switch.  When the flush after such a switch
     * fails, the file already names the new table: the handle must take
     * no more writes (saying why), and the reopened image is consistent,
     * whichever flush failed. */
    qs_io *base;
    ck_assert_int_eq(unit_make_simple(1u << 20, 4096, 3, 16, &base), 0);
    const size_t len = 3u << 20;
    uint8_t *state = malloc(len);
    ck_assert_ptr_nonnull(state);
    for (size_t i = 0; i < len; i++) {
        state[i] = (uint8_t)(i * 31 + i / 4096);
    }
    char err[512] = "";
    int switch_failures = 0;
    unsigned long n = 1;
    for (; n < 200; n++) {
        mem = memio_clone(base);
        ck_assert_ptr_nonnull(mem);
        qs_io *fio = qs_faultio_new(memio_ref(mem));
        ck_assert_int_eq(
            unit_open(fio, QSNAP_OPEN_RDWR, &img, err, sizeof(err)), 0);
        qs_faultio_fail_nth(fio, QS_FAULT_FLUSH, n, EIO, false);
        qsnap_checkpoint *ck;
        int ret =
            qsnap_checkpoint_begin(img, "ck", NULL, QSNAP_CHECKPOINT_RAW, &ck);
        if (ret == 0) {
            ret = qsnap_checkpoint_write(ck, state, len);
            ret = ret == 0 ? qsnap_checkpoint_commit(ck)
                           : (qsnap_checkpoint_abort(ck), ret);
        }
        const bool injected = qs_faultio_injected(fio) > 0;
        if (img->switch_failed) {
            switch_failures++;
            ck_assert_int_eq(ret, -EIO);
            ck_assert_int_eq(qsnap_pwrite(img, state, 4096, 0), -EROFS);
            ck_assert_msg(strstr(qsnap_errmsg(img), "reopen the image"),
                          "n=%lu: %s", n, qsnap_errmsg(img));
        }
        qsnap_close(img);
        img = NULL;
        if (!injected) {
            ck_assert_int_eq(ret, 0);
            qs_io_close(mem);
            mem = NULL;
            break;
        }
        memio_ref(mem);
        ret = unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err));
        ck_assert_msg(ret == 0, "n=%lu: reopen: %s", n, err);
        const struct qsnap_check_result r = check_now();
        ck_assert_msg(r.corruptions == 0, "n=%lu: %" PRIu64 " corruptions", n,
                      r.corruptions);
        ck_assert_int_eq(qsnap_close(img), 0);
        img = NULL;
        qs_io_close(mem);
        mem = NULL;
    }
    ck_assert_uint_lt(n, 200);
    ck_assert_int_ge(switch_failures, 1);
    qs_io_close(base);
    free(state);
}
END_TEST

START_TEST(test_disk_full)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    mem_image(&o);
    /* The disk fills at a known size: no space reserved ahead (a failed
     * reservation is harmless, see fault_ops.sh). */
    img->reserve_off = true;
    uint8_t *model = calloc(1, DISK);
    ck_assert_ptr_nonnull(model);
    const struct op first = {OP_WRITE, 0, 8 * ICS, 1};
    ck_assert_int_eq(op_run(img, &first), 0);
    op_model(model, &first);
    ck_assert_int_eq(qsnap_flush(img), 0);
    memio_set_max_size(mem, memio_size(mem) + 20 * ICS);

    int ret = 0;
    uint64_t off = 16 * ICS;
    for (int i = 0; i < 100 && ret == 0; i++, off += 3 * ICS) {
        const struct op op = {OP_WRITE, off, 2 * ICS + 1, 10 + (uint64_t)i};
        ret = op_run(img, &op);
        if (ret == 0) {
            ret = qsnap_flush(img);
        }
        if (ret == 0) {
            op_model(model, &op);
        }
    }
    ck_assert_int_eq(ret, -ENOSPC);
    qsnap_close(img);
    img = NULL;
    memio_set_max_size(mem, 0);
    memio_ref(mem);
    ck_assert_int_eq(unit_open(mem, QSNAP_OPEN_RDWR, &img, NULL, 0), 0);
    const struct qsnap_check_result r = check_now();
    ck_assert_uint_eq(r.corruptions, 0);
    /* Everything flushed before the disk filled up is there. */
    uint8_t *b = malloc(off);
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(qsnap_pread(img, b, off - 3 * ICS, 0), 0);
    ck_assert_mem_eq(b, model, off - 3 * ICS);
    free(b);
    free(model);
}
END_TEST

/* ------------------------------------------------------------ power loss */

/* Drops the pending writes that overlap [off, off+len). */
struct drop_range {
    uint64_t off;
    uint64_t len;
};

static bool keep_outside(void *opaque, size_t idx, enum qs_fault_op op,
                         uint64_t off, uint64_t len)
{
    const struct drop_range *d = opaque;
    (void)idx;
    return op != QS_FAULT_WRITE || off >= d->off + d->len || d->off >= off + len;
}

/*
 * Power fails during the flush that makes new clusters durable, and the
 * disk's cache had written the L2 table but not the refcount block.
 * Without lazy refcounts this must not be possible: the refcount block
 * has to be on disk (flushed) before the L2 table is written.
 */
START_TEST(test_crash_refcount_before_l2)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    char err[512] = "";
    ck_assert_int_eq(unit_make_image(&o, &mem, err, sizeof(err)), 0);
    qs_io *fio = qs_faultio_new(memio_ref(mem));
    ck_assert_int_eq(unit_open(fio, QSNAP_OPEN_RDWR, &img, err, sizeof(err)),
                     0);
    const struct op a = {OP_WRITE, 0, ICS, 1};
    ck_assert_int_eq(op_run(img, &a), 0);
    ck_assert_int_eq(qsnap_flush(img), 0);

    ck_assert_int_eq(qs_faultio_set_volatile(fio, true), 0);
    const struct op b = {OP_WRITE, 5 * ICS, 2 * ICS, 2};
    ck_assert_int_eq(op_run(img, &b), 0);
    qs_faultio_fail_nth(fio, QS_FAULT_FLUSH, 1, EIO, true);
    ck_assert_int_eq(qsnap_flush(img), -EIO);
    struct drop_blocks d = {img};
    qs_faultio_crash(fio, keep_not_refblock, &d);
    qsnap_close(img);
    img = NULL;

    memio_ref(mem);
    ck_assert_int_eq(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)),
                     0);
    const struct qsnap_check_result r = check_now();
    ck_assert_msg(r.corruptions == 0,
                  "%" PRIu64 " corruptions: an L2 table reached the disk "
                  "before the refcount block counting its clusters",
                  r.corruptions);
}
END_TEST

/*
 * A partial write over a compressed cluster copies it to a new cluster.
 * If the power fails before that copy is on disk, the guest must still
 * see the old (flushed) data, not whatever the new cluster holds: the new
 * cluster's data has to be flushed before the L2 entry pointing to it.
 */
START_TEST(test_crash_cow_keeps_old_data)
{
    struct qsnap_create_opts o;
    opts_mem(&o);
    char err[512] = "";
    ck_assert_int_eq(unit_make_image(&o, &mem, err, sizeof(err)), 0);
    qs_io *fio = qs_faultio_new(memio_ref(mem));
    ck_assert_int_eq(unit_open(fio, QSNAP_OPEN_RDWR, &img, err, sizeof(err)),
                     0);
    uint8_t *old = malloc(ICS), *b = malloc(ICS);
    ck_assert_ptr_nonnull(old);
    ck_assert_ptr_nonnull(b);
    const struct op c = {OP_COMPRESSED, 3 * ICS, ICS, 9};
    op_data(&c, old);
    ck_assert_int_eq(op_run(img, &c), 0);
    ck_assert_int_eq(qsnap_flush(img), 0);

    ck_assert_int_eq(qs_faultio_set_volatile(fio, true), 0);
    const struct op w = {OP_WRITE, 3 * ICS + 100, 50, 10};
    ck_assert_int_eq(op_run(img, &w), 0);
    struct qs_mapping m;
    ck_assert_int_eq(qs_map(img, 3 * ICS, ICS, &m), 0);
    ck_assert_int_eq(m.type, QS_C_NORMAL);
    qs_faultio_fail_nth(fio, QS_FAULT_FLUSH, 1, EIO, true);
    ck_assert_int_eq(qsnap_flush(img), -EIO);
    struct drop_range d = {m.host_off, ICS};
    ck_assert_int_ge(qs_faultio_crash(fio, keep_outside, &d), 1);
    qsnap_close(img);
    img = NULL;

    memio_ref(mem);
    ck_assert_int_eq(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)),
                     0);
    const int rr = qsnap_pread(img, b, ICS, 3 * ICS);
    ck_assert_msg(rr == 0, "reading guest cluster 3 after the crash: %d (%s)",
                  rr, qsnap_errmsg(img));
    uint8_t *patched = malloc(ICS);
    ck_assert_ptr_nonnull(patched);
    memcpy(patched, old, ICS);
    unit_fill(patched + 100, 50, 10, 3 * ICS + 100);
    ck_assert_msg(memcmp(b, old, ICS) == 0 || memcmp(b, patched, ICS) == 0,
                  "guest cluster 3 lost its flushed data (first bytes "
                  "%02x %02x, want %02x %02x)",
                  b[0], b[1], old[0], old[1]);
    free(old);
    free(b);
    free(patched);
}
END_TEST

START_TEST(test_crash_random)
{
    /* Random operations on a disk with a write cache; the power fails
     * during a random flush (or after the last operation) and the cache
     * keeps a random subset of what it held.  The image must open, check
     * without corruptions, and show only content it had since the last
     * completed flush.  "Content" is judged per 512-byte sector, as a disk
     * does: two unflushed in-place writes to different sectors of one
     * cluster may survive independently of each other. */
    const bool lazy = _i % 2;
    struct qsnap_create_opts o;
    opts_mem(&o);
    o.size = 2u << 20;
    o.lazy_refcounts = lazy;
    char err[512] = "";
    ck_assert_int_eq(unit_make_image(&o, &mem, err, sizeof(err)), 0);
    qs_io *fio = qs_faultio_new(memio_ref(mem));
    ck_assert_int_eq(unit_open(fio, QSNAP_OPEN_RDWR, &img, err, sizeof(err)),
                     0);
    ck_assert_int_eq(qs_faultio_set_volatile(fio, true), 0);

    uint64_t rs = 0x9e3779b9 + (uint64_t)_i * 7919;
    uint8_t *model = calloc(1, o.size);
    ck_assert_ptr_nonnull(model);
    struct states st;
    states_init(&st, model, o.size, 512);
    states_add(&st);
    const int n_ops = 20 + (int)(unit_rand(&rs) % 80);
    const unsigned long fail_flush = 1 + unit_rand(&rs) % 6;
    qs_faultio_fail_nth(fio, QS_FAULT_FLUSH, fail_flush, EIO, true);
    for (int i = 0; i < n_ops; i++) {
        struct op op;
        op_random(&rs, o.size, ICS, true, &op);
        const int ret = op_run(img, &op);
        if (ret < 0) {
            /* Power lost in this operation's flush. */
            ck_assert_int_eq(ret, -EIO);
            ck_assert_uint_eq(qs_faultio_injected(fio), 1);
            op_model(model, &op);
            states_touch(&st, model, op.off, op.len);
            states_add(&st);
            break;
        }
        states_step(&st, model, &op);
    }
    const int dropped = qs_faultio_crash_random(fio, unit_rand(&rs), 50);
    ck_assert_int_ge(dropped, 0);
    qsnap_close(img);
    img = NULL;

    memio_ref(mem);
    ck_assert_msg(unit_open(mem, QSNAP_OPEN_RDWR, &img, err, sizeof(err)) == 0,
                  "seed %d: %s", _i, err);
    const struct qsnap_check_result r = check_now();
    ck_assert_msg(
        r.corruptions == 0,
        "seed %d (%s, %d ops, %d writes dropped): %" PRIu64 " corruptions", _i,
        lazy ? "lazy" : "not lazy", n_ops, dropped, r.corruptions);
    char what[64];
    snprintf(what, sizeof(what), "seed %d (%s)", _i,
             lazy ? "lazy" : "not lazy");
    states_assert(&st, what);
    states_free(&st);
    free(model);
}
END_TEST

/* Power-loss runs: 240, or UNIT_CRASH_RUNS (check-valgrind runs fewer,
 * the plain and sanitizer builds run them all). */
static int crash_runs(void)
{
    const char *e = getenv("UNIT_CRASH_RUNS");
    const int n = e ? atoi(e) : 0;
    return n > 0 ? n : 240;
}

static Suite *image_suite(void)
{
    Suite *s = suite_create("image");
    TCase *tc = tcase_create("create");
    tcase_add_unchecked_fixture(tc, dir_setup, dir_teardown);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_loop_test(tc, test_create_options, 0, N_CREATE);
    tcase_add_loop_test(tc, test_create_invalid, 0, N_BAD_CREATE);
    tcase_add_test(tc, test_create_backing);
    suite_add_tcase(s, tc);

    tc = tcase_create("io");
    tcase_add_unchecked_fixture(tc, dir_setup, dir_teardown);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_open_close_mem);
    tcase_add_test(tc, test_open_errors);
    tcase_add_test(tc, test_open_io_owns_io_on_error);
    tcase_add_test(tc, test_odd_offsets);
    tcase_add_test(tc, test_vectors_mem);
    tcase_add_test(tc, test_vectors_file);
    tcase_add_test(tc, test_alloc_buf_direct);
    tcase_add_test(tc, test_bulk_writes);
    tcase_add_test(tc, test_reserve_ahead);
    tcase_add_test(tc, test_concurrent_allocating_writes);
    tcase_add_test(tc, test_out_of_range);
    tcase_add_test(tc, test_read_only);
    tcase_add_test(tc, test_resize);
    tcase_add_loop_test(tc, test_random_ops_clean, 0, N_SEQ);
    suite_add_tcase(s, tc);

    tc = tcase_create("failures");
    tcase_add_unchecked_fixture(tc, dir_setup, dir_teardown);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_dirty_rebuild);
    tcase_add_loop_test(tc, test_fault_injection, 0, N_FAULT);
    tcase_add_test(tc, test_disk_full);
    tcase_add_test(tc, test_switch_flush_fails);
    tcase_add_test(tc, test_close_aborts_checkpoint);
    tcase_add_test(tc, test_crash_refcount_before_l2);
    tcase_add_test(tc, test_crash_cow_keeps_old_data);
    tcase_add_loop_test(tc, test_crash_random, 0, crash_runs());
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(image_suite());
    srunner_run_all(sr, CK_NORMAL);
    const int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
