/*
 * fuzz_vmstate.c - fuzz target: the VM state section container
 * (docs/vmstate-format.md).
 *
 * Each input is stored as the raw VM state of a new checkpoint in a copy
 * of a small image (qsnap_checkpoint_begin/write/commit), so it lands in
 * the VM state area exactly as a VMM's state would.  Then the state is
 * opened: the raw bytes must read back as stored, and when they parse as
 * a section container every section is read in chunks (and across a
 * chunk boundary, and past its end, which must fail).
 *
 * Checksums would stop almost every mutated container at the door, so
 * for inputs of even length that begin with the container's magic the
 * harness first makes them right (superblock, directory, each section's
 * chunk table, and each chunk whose bytes it can decode), as far as the
 * fields it needs lie inside the input.  Odd-length inputs are stored as
 * they are, so damaged checksums are still tried.
 *
 * With QSNAP_FUZZ_SEED_OUT set, the start-up also stores a few containers
 * through the section API (zstd, raw and all-zero chunks, sections of
 * several chunks, an empty section) and writes their raw bytes there as
 * seeds.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>
#include <zstd.h>

#include "fuzz_util.h"
#include "qs_endian.h"

#define CLUSTER 4096u
#define DISK_SIZE (1u << 20)
/* State bytes stored at most (longer inputs are cut). */
#define MAX_STATE (1u << 20)
#define READ_BUDGET (8ull << 20)
/* Chunks longer than this keep their checksum. */
#define FIX_MAX_CHUNK (1u << 20)

static const char vms_magic[8] = {'Q', 'S', 'N', 'A', 'P', 'V', 'M', 'S'};

static char img_path[PATH_MAX];
static uint8_t *image; /* the image every input starts from */
static size_t image_len;
static uint8_t *fix_buf; /* FIX_MAX_CHUNK bytes: a decoded chunk */

/*
 * Sets the checksum of chunk c (record r) of a section of `size` bytes to
 * that of its decoded bytes, when they can be decoded from buf.
 */
static void fix_chunk(const uint8_t *buf, size_t len, uint8_t *r,
                      uint32_t chunk_size, uint64_t size, uint64_t c)
{
    const uint64_t off = qs_be64_load(r);
    const uint32_t stored = qs_be32_load(r + 8);
    uint64_t clen;

    if (chunk_size == 0 || c > size / chunk_size) {
        return;
    }
    clen = size - c * chunk_size;
    if (clen > chunk_size) {
        clen = chunk_size;
    }
    if (clen > FIX_MAX_CHUNK) {
        return;
    }
    switch (qs_be32_load(r + 12)) {
    case 0: /* zero */
        memset(fix_buf, 0, clen);
        break;
    case 1: /* zstd */
        if (off > len || stored > len - off ||
            ZSTD_decompress(fix_buf, (size_t)clen, buf + off, stored) != clen) {
            return;
        }
        break;
    case 2: /* raw */
        if (off > len || clen > len - off) {
            return;
        }
        memcpy(fix_buf, buf + off, clen);
        break;
    default:
        return;
    }
    qs_be64_store(r + 16, XXH64(fix_buf, (size_t)clen, 0));
}

/* Makes the checksums of the container in buf right (see the top). */
static void fix_checksums(uint8_t *buf, size_t len)
{
    const uint32_t chunk_size = qs_be32_load(buf + 12);
    const uint32_t n_sections = qs_be32_load(buf + 16);
    const uint64_t dir_off = qs_be64_load(buf + 24);
    const uint64_t dir_size = qs_be64_load(buf + 32);

    if (dir_off <= len && dir_size <= len - dir_off) {
        uint8_t *dir = buf + dir_off;
        uint64_t pos = 0;

        for (uint32_t i = 0; i < n_sections && dir_size - pos >= 32; i++) {
            uint8_t *p = dir + pos;
            const uint64_t name_pad = ((uint64_t)qs_be16_load(p) + 7) & ~7ull;
            const uint64_t size = qs_be64_load(p + 8);
            const uint64_t n_chunks = qs_be64_load(p + 16);
            const uint64_t room = dir_size - pos - 32;

            if (name_pad > room || n_chunks > (room - name_pad) / 24) {
                break;
            }
            uint8_t *recs = p + 32 + name_pad;
            for (uint64_t c = 0; c < n_chunks; c++) {
                fix_chunk(buf, len, recs + 24 * c, chunk_size, size, c);
            }
            qs_be64_store(p + 24, XXH64(recs, (size_t)n_chunks * 24, size));
            pos += 32 + name_pad + n_chunks * 24;
        }
        qs_be64_store(buf + 40, XXH64(dir, (size_t)dir_size, 0));
    }
    qs_be64_store(buf + 56, XXH64(buf, 56, 0));
}

static qsnap_image *open_rw(const char *path)
{
    qsnap_image *img =
        fz_open(path, QSNAP_OPEN_RDWR | QSNAP_OPEN_NO_BACKING, 0);
    if (!img) {
        fz_die("open %s", path);
    }
    return img;
}

static void make_image(const char *path)
{
    struct qsnap_create_opts co;
    qsnap_image *img;
    uint8_t buf[8192];
    char err[256];

    qsnap_create_opts_init(&co);
    co.size = DISK_SIZE;
    co.cluster_size = CLUSTER;
    if (qsnap_create(path, &co, err, sizeof(err)) < 0) {
        fz_die("create %s: %s", path, err);
    }
    img = open_rw(path);
    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = (uint8_t)(i * 5 + 11);
    }
    if (qsnap_pwrite(img, buf, sizeof(buf), 64u << 10) < 0 ||
        qsnap_close(img) < 0) {
        fz_die("write %s", path);
    }
}

/* A pseudo-random byte stream: incompressible, so stored raw. */
static void noise(uint8_t *buf, size_t len, uint32_t seed)
{
    for (size_t i = 0; i < len; i++) {
        seed = seed * 1103515245u + 12345u;
        buf[i] = (uint8_t)(seed >> 16);
    }
}

struct section {
    const char *name;
    size_t len;
    int kind; /* 0 zeros, 1 a compressible pattern, 2 noise */
};

/* Stores sections in a new image and writes its raw state as a seed. */
static void seed_container(const char *seed_name, const struct section *s,
                           int n)
{
    char path[PATH_MAX];
    qsnap_checkpoint *ck;
    qsnap_vmstate *vs;
    qsnap_image *img;
    uint8_t *buf;
    uint64_t size;

    fz_path("seed.qcow2", path, sizeof(path));
    make_image(path);
    img = open_rw(path);
    if (qsnap_checkpoint_begin(img, "seed", NULL, QSNAP_CHECKPOINT_SECTIONS,
                               &ck) < 0) {
        fz_die("checkpoint: %s", qsnap_errmsg(img));
    }
    for (int i = 0; i < n; i++) {
        buf = calloc(1, s[i].len + 1);
        if (!buf) {
            fz_die("out of memory");
        }
        if (s[i].kind == 1) {
            for (size_t j = 0; j < s[i].len; j++) {
                buf[j] = (uint8_t)((j / 64) % 7 * 17);
            }
        } else if (s[i].kind == 2) {
            noise(buf, s[i].len, (uint32_t)i + 1);
        }
        if (qsnap_checkpoint_section_begin(ck, s[i].name) < 0 ||
            qsnap_checkpoint_section_write(ck, buf, s[i].len) < 0 ||
            qsnap_checkpoint_section_end(ck) < 0) {
            qsnap_checkpoint_abort(ck);
            fz_die("section %s: %s", s[i].name, qsnap_errmsg(img));
        }
        free(buf);
    }
    if (qsnap_checkpoint_commit(ck) < 0 ||
        qsnap_vmstate_open(img, "seed", &vs) < 0) {
        fz_die("commit: %s", qsnap_errmsg(img));
    }
    size = qsnap_vmstate_size(vs);
    if (size > MAX_STATE || !(buf = malloc((size_t)size + 1))) {
        fz_die("seed container of %llu bytes", (unsigned long long)size);
    }
    if (qsnap_vmstate_pread(vs, buf, (size_t)size, 0) < 0) {
        fz_die("read the seed container: %s", qsnap_vmstate_errmsg(vs));
    }
    fz_seed_out(seed_name, buf, (size_t)size);
    free(buf);
    qsnap_vmstate_close(vs);
    if (qsnap_close(img) < 0) {
        fz_die("close %s", path);
    }
}

static void write_seeds(void)
{
    static const struct section one[] = {
        {"state", 300, 1},
    };
    static const struct section mixed[] = {
        {"memory", 300u << 10, 1}, {"zeros", 256u << 10, 0}, {"noise", 5000, 2},
        {"empty", 0, 0},           {"vm.json", 40, 1},
    };
    const char *dir = getenv("QSNAP_FUZZ_SEED_OUT");

    if (!dir || !dir[0]) {
        return;
    }
    seed_container("container-one", one, 1);
    seed_container("container-mixed", mixed, 5);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char path[PATH_MAX];

    (void)argc;
    (void)argv;
    write_seeds();
    fz_path("img.qcow2", img_path, sizeof(img_path));
    fz_path("template.qcow2", path, sizeof(path));
    make_image(path);
    if (fz_slurp(path, &image, &image_len) < 0) {
        fz_die("read %s", path);
    }
    fix_buf = malloc(FIX_MAX_CHUNK);
    if (!fix_buf) {
        fz_die("out of memory");
    }
    return 0;
}

/* The raw bytes must read back exactly as they were stored. */
static void check_raw(qsnap_image *img, const uint8_t *data, size_t size)
{
    qsnap_vmstate *vs = NULL;
    uint8_t *buf;

    if (qsnap_vmstate_open(img, "fuzz", &vs) < 0) {
        fz_touch_errmsg(img);
        return;
    }
    if (qsnap_vmstate_size(vs) != size) {
        fz_bug("%zu bytes of VM state stored, %llu reported", size,
               (unsigned long long)qsnap_vmstate_size(vs));
    }
    buf = malloc(size + 1);
    if (!buf) {
        fz_die("out of memory");
    }
    if (qsnap_vmstate_pread(vs, buf, size, 0) == 0 &&
        memcmp(buf, data, size) != 0) {
        fz_bug("the VM state reads back differently from what was stored");
    }
    free(buf);
    qsnap_vmstate_close(vs);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const int fds = fz_fd_count();
    struct fz_budget b = {.bytes = READ_BUDGET, .calls = 1u << 14};
    qsnap_checkpoint *ck = NULL;
    uint8_t *fixed = NULL;
    qsnap_image *img;

    if (size > MAX_STATE) {
        size = MAX_STATE;
    }
    if (size % 2 == 0 && size >= 64 &&
        memcmp(data, vms_magic, sizeof(vms_magic)) == 0) {
        fixed = malloc(size);
        if (!fixed) {
            fz_die("out of memory");
        }
        memcpy(fixed, data, size);
        fix_checksums(fixed, size);
        data = fixed;
    }
    fz_put(img_path, image, image_len);
    img = open_rw(img_path);
    if (qsnap_checkpoint_begin(img, "fuzz", NULL, QSNAP_CHECKPOINT_RAW, &ck) <
        0) {
        fz_die("checkpoint: %s", qsnap_errmsg(img));
    }
    /* In three writes of uneven length, as a VMM streams its state. */
    const size_t cut1 = size / 3;
    const size_t cut2 = size - size / 5;
    if (size > 0 &&
        (qsnap_checkpoint_write(ck, data, cut1) < 0 ||
         qsnap_checkpoint_write(ck, data + cut1, cut2 - cut1) < 0 ||
         qsnap_checkpoint_write(ck, data + cut2, size - cut2) < 0)) {
        fz_die("checkpoint write: %s", qsnap_errmsg(img));
    }
    if (qsnap_checkpoint_commit(ck) < 0) {
        fz_die("checkpoint commit: %s", qsnap_errmsg(img));
    }
    if (size > 0) {
        check_raw(img, data, size);
    }
    fz_walk_vmstate(img, "fuzz", &b);
    fz_close(img);
    free(fixed);
    fz_fd_check(fds);
    return 0;
}
