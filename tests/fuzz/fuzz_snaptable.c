/*
 * fuzz_snaptable.c - fuzz target: the snapshot table of a valid image.
 *
 * At start-up a small image is made through the library (4 KiB clusters,
 * 1 MiB disk): data, a checkpoint with raw VM state, a plain snapshot, a
 * checkpoint with a section container.  Its snapshot table is moved to
 * the end of the file, so any table fits there, and the clusters it left
 * are freed in the refcount block.
 *
 * Input: a big-endian u16 nb_snapshots, then the table's bytes.  They are
 * placed at that cluster-aligned end, the header's nb_snapshots and
 * snapshots_offset point at them and the refcounts of the clusters they
 * cover are set to 1, so with a well-formed table the image checks clean.
 * The image is opened read-only: snapshot list, a view of every snapshot
 * (read in part), the VM state of every snapshot that has one, check.
 * Then read-write: when it checks clean, a new snapshot is made, which
 * rewrites the table, and every old entry must survive it unchanged.
 *
 * With QSNAP_FUZZ_SEED_OUT set, the start-up writes the original table
 * (whole, and each entry alone) there as seeds.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "qs_endian.h"

#define CLUSTER 4096u
#define DISK_SIZE (1u << 20)
/* Table bytes used at most (longer inputs are cut). */
#define MAX_TABLE (64u * 1024u)
#define READ_BUDGET (4ull << 20)

/* Header fields (docs/interop/qcow2.txt). */
#define H_CLUSTER_BITS 20
#define H_RT_OFF 48
#define H_NB_SNAP 60
#define H_SNAP_OFF 64
#define H_REFCOUNT_ORDER 96

static char img_path[PATH_MAX];
static uint8_t *image;   /* the template, then the table */
static size_t table_off; /* where the table goes: the template's end */
static size_t refblock;  /* offset of the first refcount block */

static void fill(uint8_t *buf, size_t len, unsigned seed)
{
    for (size_t i = 0; i < len; i++) {
        buf[i] = (uint8_t)(seed + i * 31 + (i >> 9));
    }
}

/* Builds the image with a few snapshots through the public API. */
static void make_source(const char *path)
{
    struct qsnap_create_opts co;
    qsnap_checkpoint *ck;
    qsnap_image *img;
    uint8_t buf[20000];
    char err[256];

    qsnap_create_opts_init(&co);
    co.size = DISK_SIZE;
    co.cluster_size = CLUSTER;
    if (qsnap_create(path, &co, err, sizeof(err)) < 0) {
        fz_die("create %s: %s", path, err);
    }
    img = fz_open(path, QSNAP_OPEN_RDWR, 0);
    if (!img) {
        fz_die("open %s", path);
    }
    fill(buf, sizeof(buf), 1);
    if (qsnap_pwrite(img, buf, 8192, 0) < 0 ||
        qsnap_pwrite(img, buf, 4096, 300u << 10) < 0) {
        fz_die("write: %s", qsnap_errmsg(img));
    }
    memcpy(buf, "QEVM", 4);
    if (qsnap_checkpoint_begin(img, "ck-raw", NULL, QSNAP_CHECKPOINT_RAW, &ck) <
            0 ||
        qsnap_checkpoint_write(ck, buf, 10000) < 0 ||
        qsnap_checkpoint_commit(ck) < 0) {
        fz_die("raw checkpoint: %s", qsnap_errmsg(img));
    }
    if (qsnap_pwrite(img, buf, 4096, 500u << 10) < 0 ||
        qsnap_snapshot_create(img, "plain", NULL) < 0 ||
        qsnap_pwrite(img, buf + 7, 4096, 0) < 0) {
        fz_die("snapshot: %s", qsnap_errmsg(img));
    }
    memset(buf + 4096, 0, 8192);
    if (qsnap_checkpoint_begin(img, "ck-sections", NULL,
                               QSNAP_CHECKPOINT_SECTIONS, &ck) < 0) {
        fz_die("checkpoint: %s", qsnap_errmsg(img));
    }
    if (qsnap_checkpoint_section_begin(ck, "mem") < 0 ||
        qsnap_checkpoint_section_write(ck, buf, sizeof(buf)) < 0 ||
        qsnap_checkpoint_section_end(ck) < 0 ||
        qsnap_checkpoint_section_begin(ck, "dev") < 0 ||
        qsnap_checkpoint_section_write(ck, "{\"cpu\":0}", 9) < 0 ||
        qsnap_checkpoint_section_end(ck) < 0) {
        qsnap_checkpoint_abort(ck);
        fz_die("sections: %s", qsnap_errmsg(img));
    }
    if (qsnap_checkpoint_commit(ck) < 0 || qsnap_close(img) < 0) {
        fz_die("commit: %s", path);
    }
}

/* Sets the 16-bit refcount of host cluster idx in the image buffer. */
static void set_refcount(uint64_t idx, uint16_t v)
{
    if (idx >= CLUSTER / 2) {
        fz_die("cluster %llu is outside the first refcount block",
               (unsigned long long)idx);
    }
    qs_be16_store(image + refblock + 2 * idx, v);
}

/* Length of the table entry at p (padded), or 0 if it runs past end. */
static size_t entry_len(const uint8_t *p, const uint8_t *end)
{
    size_t len;

    if (end - p < 40) {
        return 0;
    }
    len = 40 + (size_t)qs_be32_load(p + 36) + qs_be16_load(p + 12) + qs_be16_load(p + 14);
    len = (len + 7) & ~(size_t)7;
    return len <= (size_t)(end - p) ? len : 0;
}

static void write_seeds(const uint8_t *table, size_t len, uint32_t nb)
{
    uint8_t *seed = malloc(len + 2);
    const uint8_t *p = table;
    char name[32];

    if (!seed) {
        fz_die("out of memory");
    }
    qs_be16_store(seed, (uint16_t)nb);
    memcpy(seed + 2, table, len);
    fz_seed_out("table-all", seed, len + 2);
    qs_be16_store(seed, 0);
    fz_seed_out("table-none", seed, 2);
    for (uint32_t i = 0; i < nb; i++) {
        const size_t n = entry_len(p, table + len);
        qs_be16_store(seed, 1);
        memcpy(seed + 2, p, n);
        snprintf(name, sizeof(name), "table-entry-%u", i);
        fz_seed_out(name, seed, n + 2);
        p += n;
    }
    free(seed);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    char src[PATH_MAX];
    uint8_t *file;
    size_t len;
    const uint8_t *p;

    (void)argc;
    (void)argv;
    fz_path("img.qcow2", img_path, sizeof(img_path));
    fz_path("source.qcow2", src, sizeof(src));
    make_source(src);
    if (fz_slurp(src, &file, &len) < 0) {
        fz_die("read %s", src);
    }
    if (qs_be32_load(file + H_CLUSTER_BITS) != 12 ||
        qs_be32_load(file + H_REFCOUNT_ORDER) != 4) {
        fz_die("%s: unexpected cluster or refcount size", src);
    }
    const uint32_t nb = qs_be32_load(file + H_NB_SNAP);
    const uint64_t snap_off = qs_be64_load(file + H_SNAP_OFF);
    const uint64_t rt_off = qs_be64_load(file + H_RT_OFF);
    if (nb != 3 || snap_off >= len || rt_off >= len) {
        fz_die("%s: unexpected header", src);
    }
    refblock = (size_t)(qs_be64_load(file + rt_off) & 0x00fffffffffffe00ull);
    if (!refblock || refblock >= len) {
        fz_die("%s: no first refcount block", src);
    }
    p = file + snap_off;
    for (uint32_t i = 0; i < nb; i++) {
        const size_t n = entry_len(p, file + len);
        if (n == 0) {
            fz_die("%s: snapshot entry %u runs past the end", src, i);
        }
        p += n;
    }
    const size_t table_len = (size_t)(p - (file + snap_off));
    write_seeds(file + snap_off, table_len, nb);

    table_off = (len + CLUSTER - 1) & ~(size_t)(CLUSTER - 1);
    image = calloc(1, table_off + MAX_TABLE);
    if (!image) {
        fz_die("out of memory");
    }
    memcpy(image, file, len);
    free(file);
    /* The old table's clusters are free now. */
    for (uint64_t c = snap_off / CLUSTER;
         c < (snap_off + table_len + CLUSTER - 1) / CLUSTER; c++) {
        set_refcount(c, 0);
    }
    return 0;
}

/* The fields a rewrite of the table must keep. */
static bool same_entry(const struct qsnap_snapshot_info *a,
                       const struct qsnap_snapshot_info *b)
{
    return strcmp(a->id, b->id) == 0 && strcmp(a->name, b->name) == 0 &&
           a->date_sec == b->date_sec && a->date_nsec == b->date_nsec &&
           a->vm_clock_ns == b->vm_clock_ns &&
           a->vm_state_size == b->vm_state_size &&
           a->disk_size == b->disk_size && a->icount == b->icount &&
           a->l1_size == b->l1_size;
}

/* A new snapshot rewrites the table: the old entries must survive. */
static void rewrite_table(qsnap_image *img)
{
    struct qsnap_snapshot_info *before = NULL;
    struct qsnap_snapshot_info *after = NULL;
    uint32_t n_before = 0;
    uint32_t n_after = 0;

    if (qsnap_snapshot_list(img, &before, &n_before) < 0) {
        return;
    }
    if (qsnap_snapshot_create(img, "fuzz-new", NULL) == 0) {
        if (qsnap_snapshot_list(img, &after, &n_after) < 0) {
            fz_bug("no snapshot list after creating a snapshot");
        }
        if (n_after != n_before + 1) {
            fz_bug("%u snapshots before a create, %u after", n_before, n_after);
        }
        for (uint32_t i = 0; i < n_before; i++) {
            if (!same_entry(&before[i], &after[i])) {
                fz_bug("snapshot %u ('%s') changed when the table was "
                       "rewritten",
                       i, before[i].id);
            }
        }
        qsnap_snapshot_list_free(after, n_after);
    } else {
        fz_touch_errmsg(img);
    }
    qsnap_snapshot_list_free(before, n_before);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const int fds = fz_fd_count();
    struct fz_budget b = {.bytes = READ_BUDGET, .calls = 1u << 12};
    const uint16_t nb = size >= 2 ? qs_be16_load(data) : 0;
    size_t len = size >= 2 ? size - 2 : 0;
    qsnap_image *img;

    if (len > MAX_TABLE) {
        len = MAX_TABLE;
    }
    const size_t padded = (len + CLUSTER - 1) & ~(size_t)(CLUSTER - 1);
    memset(image + table_off, 0, MAX_TABLE);
    if (len > 0) {
        memcpy(image + table_off, data + 2, len);
    }
    qs_be32_store(image + H_NB_SNAP, nb);
    qs_be64_store(image + H_SNAP_OFF, table_off);
    for (size_t c = 0; c < padded / CLUSTER; c++) {
        set_refcount(table_off / CLUSTER + c, 1);
    }
    fz_put(img_path, image, table_off + padded);
    for (size_t c = 0; c < padded / CLUSTER; c++) {
        set_refcount(table_off / CLUSTER + c, 0);
    }

    if ((img = fz_open(img_path, QSNAP_OPEN_NO_BACKING, 0)) != NULL) {
        fz_walk_meta(img, &b);
        fz_walk_snapshots(img, true, true, &b);
        fz_check(img, 0);
        fz_close(img);
    }
    img = fz_open(img_path, QSNAP_OPEN_RDWR | QSNAP_OPEN_NO_BACKING, 0);
    if (img) {
        if (fz_check(img, 0) == 0) {
            rewrite_table(img);
        }
        fz_close(img);
    }
    fz_fd_check(fds);
    return 0;
}
