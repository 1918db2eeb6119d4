/*
 * crash_writer.c - a workload to crash, and the judge of what it left.
 *
 *   crash-writer init    DIR SEED
 *   crash-writer run     DIR SEED N_OPS
 *   crash-writer verify  DIR SEED
 *   crash-writer recover IMAGE
 *
 * `init` creates an image in DIR (options drawn from SEED) and an empty
 * journal; `run` does that too if there is no journal yet, and performs
 * N_OPS operations drawn from SEED: guest writes, zero writes, discards
 * and flushes, and either internal snapshots, snapshot deletes and
 * checkpoints with VM state (even seeds; a quarter of the checkpoints
 * hold 10 to 20 MiB, the others under 1 MiB) or external checkpoints pushed
 * as overlays and merged away on delete (odd seeds).  Before each
 * operation it appends "B k" to DIR/journal and after it "D k".  It stops
 * at the first failure (exit 3), so it can be killed (SIGKILL) or have its
 * power cut (QSNAP_FAULT=powercut:...) anywhere.
 *
 * `verify` replays the same operations on a model, up to the last one the
 * journal shows begun, and checks what is on disk:
 *   - the live disk: every 512-byte sector holds content it had at or
 *     after the last durable point (a completed flush, snapshot, checkpoint,
 *     push or merge) - so everything flushed before the crash reads back;
 *   - every completed snapshot or checkpoint is listed, reads back exactly
 *     (VM state too), and no other snapshot exists except the one the
 *     crash interrupted (which, if present, must also be exact);
 *   - every external checkpoint below the top still shows exactly what it
 *     did when it was frozen, and a merged one is gone.
 * `verify` also lists in DIR/files the images that must pass a check.
 * `recover` opens IMAGE read-write (without its backing files) and closes
 * it, which is how a dirty image gets its refcounts rebuilt.
 * Exit status: 0 good, 1 a check failed, 2 usage or set-up error.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <qsnap.h>

#define PROG "crash-writer"
#define DISK (4u << 20)
#define SECTOR 512u
#define N_SECT (DISK / SECTOR)
#define MAX_SNAPS 4
#define MAX_LAYERS 5
#define RAM_CHUNK (128u << 10)
#define BIG_RAM (10u << 20) /* a large checkpoint's ram: 10 to 20 MiB */

static void die(int code, const char *fmt, ...)
    __attribute__((format(printf, 2, 3), noreturn));

static void die(int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(code);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        die(2, "out of memory");
    }
    return p;
}

/* ------------------------------------------------------------------ */
/* Deterministic data                                                 */
/* ------------------------------------------------------------------ */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    return x ^ (x >> 31);
}

static uint64_t rnd(uint64_t *s)
{
    *s += UINT64_C(0x9e3779b97f4a7c15);
    return mix64(*s);
}

/* Bytes of stream `seed` at positions pos .. pos+len-1. */
static void fill(uint8_t *buf, size_t len, uint64_t seed, uint64_t pos)
{
    for (size_t i = 0; i < len; i++) {
        buf[i] = (uint8_t)(mix64(seed ^ ((pos + i) * 0x9e3779b97f4a7c15)) >> 56);
    }
}

static uint64_t hash_sector(const uint8_t *p)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325);
    for (size_t i = 0; i < SECTOR; i++) {
        h = (h ^ p[i]) * UINT64_C(0x100000001b3);
    }
    return h;
}

/* ------------------------------------------------------------------ */
/* The plan: operations drawn from the seed                           */
/* ------------------------------------------------------------------ */

enum kind {
    K_WRITE,
    K_ZERO,
    K_DISCARD,
    K_FLUSH,
    K_SNAP,       /* internal snapshot */
    K_UNSNAP,     /* delete one */
    K_CHECKPOINT, /* snapshot with VM state (section container) */
    K_PUSH,       /* external checkpoint: a new overlay on top */
    K_MERGE,      /* delete an external checkpoint, merging it */
};

static const char *const kind_names[] = {
    "write", "zero", "discard", "flush", "snapshot",
    "snapshot-delete", "checkpoint", "push", "merge",
};

struct op {
    enum kind kind;
    uint64_t off, len; /* data ops; K_CHECKPOINT: ram bytes in len */
    uint64_t seed;
    int target; /* snapshot or layer number */
};

struct plan {
    uint64_t rs;
    bool chain;
    uint32_t cluster_size;
    int version;
    int refcount_bits;
    bool lazy;
    int next_no;
    int snaps[MAX_SNAPS]; /* live snapshot numbers */
    int n_snaps;
    int layers[MAX_LAYERS]; /* external layers, base first, top last */
    int n_layers;
};

static void plan_init(struct plan *p, uint64_t seed)
{
    static const uint32_t sizes[] = {512, 4096, 65536, 2048, 65536};
    static const int widths[] = {16, 4, 64, 8};
    memset(p, 0, sizeof(*p));
    p->rs = seed * 7919 + 1;
    p->chain = seed % 2;
    p->cluster_size = sizes[rnd(&p->rs) % 5];
    /* v2 has no dirty bit to cover a snapshot operation (see
     * docs/reliability.md): it runs with external checkpoints only. */
    p->version = p->chain && rnd(&p->rs) % 3 == 0 ? 2 : 3;
    p->refcount_bits = widths[rnd(&p->rs) % 4];
    if (p->version == 2) {
        p->refcount_bits = 16; /* v2 knows no other width */
    }
    p->lazy = p->version == 3 && rnd(&p->rs) % 3 == 0;
    p->layers[p->n_layers++] = p->next_no++; /* the base */
}

static void remove_at(int *a, int *n, int i)
{
    memmove(a + i, a + i + 1, (size_t)(*n - i - 1) * sizeof(*a));
    (*n)--;
}

/* Draws the next operation and updates the plan as if it succeeded. */
static void plan_next(struct plan *p, struct op *o)
{
    memset(o, 0, sizeof(*o));
    o->seed = rnd(&p->rs) | 1;
    const unsigned r = (unsigned)(rnd(&p->rs) % 100);
    if (r < 55) {
        o->kind = K_WRITE;
    } else if (r < 62) {
        o->kind = K_ZERO;
    } else if (r < 69) {
        o->kind = K_DISCARD;
    } else if (r < 82) {
        o->kind = K_FLUSH;
    } else if (!p->chain) {
        o->kind = r < 89 ? K_SNAP : r < 95 ? K_UNSNAP : K_CHECKPOINT;
        if (o->kind != K_UNSNAP && p->n_snaps == MAX_SNAPS) {
            o->kind = K_UNSNAP;
        }
        if (o->kind == K_UNSNAP && p->n_snaps == 0) {
            o->kind = K_SNAP;
        }
    } else {
        o->kind = r < 91 ? K_PUSH : K_MERGE;
        if (o->kind == K_PUSH && p->n_layers == MAX_LAYERS) {
            o->kind = K_MERGE;
        }
        if (o->kind == K_MERGE && p->n_layers < 2) {
            o->kind = K_PUSH;
        }
    }

    switch (o->kind) {
    case K_WRITE:
    case K_ZERO:
    case K_DISCARD: {
        const uint64_t cs = p->cluster_size;
        const uint64_t max = rnd(&p->rs) % 4 == 0 ? 6 * cs : cs;
        o->len = 1 + rnd(&p->rs) % max;
        o->off = rnd(&p->rs) % (DISK - o->len + 1);
        if (rnd(&p->rs) % 3 == 0) {
            o->off -= o->off % cs;
        }
        break;
    }
    case K_SNAP:
    case K_CHECKPOINT:
        o->target = p->next_no++;
        p->snaps[p->n_snaps++] = o->target;
        o->len = rnd(&p->rs) % (6 * RAM_CHUNK);
        if (o->kind == K_CHECKPOINT && rnd(&p->rs) % 4 == 0) {
            /* More than the container's 4 MiB output buffers hold, so
             * that its writer thread is caught in mid-stream too. */
            o->len = BIG_RAM + rnd(&p->rs) % BIG_RAM;
        }
        break;
    case K_UNSNAP: {
        const int i = (int)(rnd(&p->rs) % (uint64_t)p->n_snaps);
        o->target = p->snaps[i];
        remove_at(p->snaps, &p->n_snaps, i);
        break;
    }
    case K_PUSH:
        o->target = p->next_no++;
        p->layers[p->n_layers++] = o->target;
        break;
    case K_MERGE: {
        const int i = (int)(rnd(&p->rs) % (uint64_t)(p->n_layers - 1));
        o->target = p->layers[i];
        remove_at(p->layers, &p->n_layers, i);
        break;
    }
    default:
        break;
    }
}

/* ------------------------------------------------------------------ */
/* Names                                                              */
/* ------------------------------------------------------------------ */

static char dir[2048];

static void snap_name(char *buf, size_t len, const struct op *o)
{
    snprintf(buf, len, "s%d", o->target);
}

static void layer_path(char *buf, size_t len, int no)
{
    snprintf(buf, len, "%s/layer%d.qcow2", dir, no);
}

/* VM state of a checkpoint: a "ram" section of o->len bytes with every
 * other chunk zero, and a small "dev" section. */
static uint64_t dev_len(const struct op *o)
{
    return 1 + o->seed % 3000;
}

static void ram_bytes(const struct op *o, uint8_t *buf, uint64_t off,
                      size_t len)
{
    for (size_t i = 0; i < len;) {
        const uint64_t pos = off + i;
        const size_t room = (size_t)(RAM_CHUNK - pos % RAM_CHUNK);
        const size_t n = len - i < room ? len - i : room;
        if ((pos / RAM_CHUNK) % 2) {
            memset(buf + i, 0, n);
        } else {
            fill(buf + i, n, o->seed, pos);
        }
        i += n;
    }
}

/* ------------------------------------------------------------------ */
/* run                                                                */
/* ------------------------------------------------------------------ */

static int journal_fd = -1;

static void journal(char tag, int k)
{
    char line[32];
    const int n = snprintf(line, sizeof(line), "%c %d\n", tag, k);
    if (write(journal_fd, line, (size_t)n) != n) {
        die(2, "writing the journal: %s", strerror(errno));
    }
}

static int open_rw(const char *path, qsnap_image **img)
{
    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    oo.flags = QSNAP_OPEN_RDWR;
    char err[1024];
    const int ret = qsnap_open(path, &oo, img, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, PROG ": %s\n", err);
    }
    return ret;
}

static int save_checkpoint(qsnap_image *img, const struct op *o,
                           const char *name)
{
    qsnap_checkpoint *ck;
    int ret = qsnap_checkpoint_begin(img, name, NULL,
                                     QSNAP_CHECKPOINT_SECTIONS, &ck);
    if (ret < 0) {
        return ret;
    }
    uint8_t *buf = xmalloc(RAM_CHUNK);
    ret = qsnap_checkpoint_section_begin(ck, "ram");
    for (uint64_t off = 0; ret == 0 && off < o->len; off += RAM_CHUNK) {
        const size_t n = (size_t)(o->len - off < RAM_CHUNK ? o->len - off
                                                           : RAM_CHUNK);
        ram_bytes(o, buf, off, n);
        ret = qsnap_checkpoint_section_write(ck, buf, n);
    }
    if (ret == 0) {
        ret = qsnap_checkpoint_section_end(ck);
    }
    if (ret == 0) {
        ret = qsnap_checkpoint_section_begin(ck, "dev");
    }
    if (ret == 0) {
        fill(buf, (size_t)dev_len(o), o->seed, 1u << 30);
        ret = qsnap_checkpoint_section_write(ck, buf, (size_t)dev_len(o));
    }
    if (ret == 0) {
        ret = qsnap_checkpoint_section_end(ck);
    }
    free(buf);
    if (ret < 0) {
        qsnap_checkpoint_abort(ck);
        return ret;
    }
    return qsnap_checkpoint_commit(ck);
}

static int run_op(qsnap_image **imgp, const struct op *o, int top_no)
{
    qsnap_image *img = *imgp;
    char name[64];
    char path[4200];
    char top[4200];
    switch (o->kind) {
    case K_WRITE: {
        uint8_t *buf = xmalloc((size_t)o->len);
        fill(buf, (size_t)o->len, o->seed, o->off);
        const int ret = qsnap_pwrite(img, buf, (size_t)o->len, o->off);
        free(buf);
        return ret;
    }
    case K_ZERO:
        return qsnap_write_zeroes(img, o->off, o->len,
                                  o->seed % 2 ? QSNAP_ZERO_MAY_UNMAP : 0);
    case K_DISCARD:
        return qsnap_discard(img, o->off, o->len);
    case K_FLUSH:
        return qsnap_flush(img);
    case K_SNAP:
        snap_name(name, sizeof(name), o);
        return qsnap_snapshot_create(img, name, NULL);
    case K_UNSNAP:
        snap_name(name, sizeof(name), o);
        return qsnap_snapshot_delete(img, name);
    case K_CHECKPOINT:
        snap_name(name, sizeof(name), o);
        return save_checkpoint(img, o, name);
    case K_PUSH:
        layer_path(path, sizeof(path), o->target);
        return qsnap_overlay_push(imgp, path, NULL);
    case K_MERGE: {
        layer_path(top, sizeof(top), top_no);
        layer_path(path, sizeof(path), o->target);
        int ret = qsnap_close(img);
        *imgp = NULL;
        if (ret < 0) {
            return ret;
        }
        char err[1024];
        ret = qsnap_checkpoint_delete(top, path, QSNAP_MERGE_AUTO, NULL, NULL,
                                      err, sizeof(err));
        if (ret < 0) {
            fprintf(stderr, PROG ": merge: %s\n", err);
            return ret;
        }
        return open_rw(top, imgp);
    }
    }
    return -EINVAL;
}

/* Makes the image and an empty journal (the journal appears once the
 * image is complete: no journal, no workload to judge). */
static void cmd_init(uint64_t seed)
{
    struct plan p;
    plan_init(&p, seed);
    struct qsnap_create_opts co;
    qsnap_create_opts_init(&co);
    co.size = DISK;
    co.cluster_size = p.cluster_size;
    co.version = p.version;
    co.refcount_bits = p.refcount_bits;
    co.lazy_refcounts = p.lazy;
    char path[4200];
    layer_path(path, sizeof(path), p.layers[0]);
    char err[1024];
    if (qsnap_create(path, &co, err, sizeof(err)) < 0) {
        die(2, "%s", err);
    }
    snprintf(path, sizeof(path), "%s/journal", dir);
    const int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        die(2, "%s: %s", path, strerror(errno));
    }
    close(fd);
    printf("seed %" PRIu64 ": %s, cluster %u, v%d, refcount %d bits%s\n",
           seed, p.chain ? "external checkpoints" : "internal snapshots",
           p.cluster_size, p.version, p.refcount_bits,
           p.lazy ? ", lazy refcounts" : "");
    fflush(stdout);
}

static int cmd_run(uint64_t seed, int n_ops)
{
    char path[4200];
    snprintf(path, sizeof(path), "%s/journal", dir);
    if (access(path, F_OK) != 0) {
        cmd_init(seed);
    }
    journal_fd = open(path, O_WRONLY | O_APPEND);
    if (journal_fd < 0) {
        die(2, "%s: %s", path, strerror(errno));
    }
    struct plan p;
    plan_init(&p, seed);
    layer_path(path, sizeof(path), p.layers[0]);
    qsnap_image *img;
    if (open_rw(path, &img) < 0) {
        return 3; /* the power may fail while it opens */
    }

    for (int k = 0; k < n_ops; k++) {
        struct op o;
        plan_next(&p, &o);
        journal('B', k);
        const int ret = run_op(&img, &o, p.layers[p.n_layers - 1]);
        if (ret < 0) {
            fprintf(stderr, PROG ": operation %d (%s) failed: %s%s%s\n", k,
                    kind_names[o.kind], strerror(-ret), img ? ": " : "",
                    img ? qsnap_errmsg(img) : "");
            if (img) {
                qsnap_close(img);
            }
            return 3;
        }
        journal('D', k);
    }
    if (qsnap_close(img) < 0) {
        return 3;
    }
    journal('E', n_ops);
    return 0;
}

/* ------------------------------------------------------------------ */
/* verify                                                             */
/* ------------------------------------------------------------------ */

/* What each sector may hold: the hashes it had since the last durable
 * point. */
struct sector_set {
    uint64_t *h;
    uint32_t n, cap;
    bool dirty;
};

struct model {
    uint8_t *cur;
    struct sector_set *sets;
    uint32_t *dirty; /* sectors with more than one candidate */
    uint32_t n_dirty;
};

static void set_push(struct sector_set *s, uint64_t h)
{
    for (uint32_t i = 0; i < s->n; i++) {
        if (s->h[i] == h) {
            return;
        }
    }
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 4;
        s->h = realloc(s->h, s->cap * sizeof(*s->h));
        if (!s->h) {
            die(2, "out of memory");
        }
    }
    s->h[s->n++] = h;
}

static void model_init(struct model *m)
{
    m->cur = calloc(1, DISK);
    m->sets = calloc(N_SECT, sizeof(*m->sets));
    m->dirty = calloc(N_SECT, sizeof(*m->dirty));
    if (!m->cur || !m->sets || !m->dirty) {
        die(2, "out of memory");
    }
    const uint64_t zero = hash_sector(m->cur);
    for (uint32_t s = 0; s < N_SECT; s++) {
        set_push(&m->sets[s], zero);
    }
}

static void model_apply(struct model *m, const struct op *o)
{
    if (o->kind == K_WRITE) {
        fill(m->cur + o->off, (size_t)o->len, o->seed, o->off);
    } else {
        memset(m->cur + o->off, 0, (size_t)o->len);
    }
    for (uint64_t s = o->off / SECTOR; s <= (o->off + o->len - 1) / SECTOR;
         s++) {
        struct sector_set *set = &m->sets[s];
        set_push(set, hash_sector(m->cur + s * SECTOR));
        if (!set->dirty) {
            set->dirty = true;
            m->dirty[m->n_dirty++] = (uint32_t)s;
        }
    }
}

/* Everything written so far is on disk. */
static void model_durable(struct model *m)
{
    for (uint32_t i = 0; i < m->n_dirty; i++) {
        struct sector_set *set = &m->sets[m->dirty[i]];
        set->n = 0;
        set_push(set, hash_sector(m->cur + (uint64_t)m->dirty[i] * SECTOR));
        set->dirty = false;
    }
    m->n_dirty = 0;
}

static uint8_t *copy_disk(const struct model *m)
{
    uint8_t *c = xmalloc(DISK);
    memcpy(c, m->cur, DISK);
    return c;
}

/* A snapshot or layer the model expects, and how sure it is. */
struct expect {
    int no;
    enum kind kind; /* K_SNAP, K_CHECKPOINT; K_PUSH for layers */
    struct op op;
    uint8_t *disk;
    bool maybe;   /* the crash interrupted its creation or deletion */
    bool deleted; /* must be gone (or maybe gone, with `maybe`) */
};

static int failures;

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PROG ": FAIL: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    failures++;
}

static void check_live(qsnap_image *img, const struct model *m,
                       const char *what)
{
    uint8_t *buf = xmalloc(DISK);
    const int ret = qsnap_pread(img, buf, DISK, 0);
    if (ret < 0) {
        fail("%s: reading the live disk: %s", what, qsnap_errmsg(img));
        free(buf);
        return;
    }
    int bad = 0;
    for (uint32_t s = 0; s < N_SECT; s++) {
        const struct sector_set *set = &m->sets[s];
        const uint64_t h = hash_sector(buf + (uint64_t)s * SECTOR);
        bool ok = false;
        for (uint32_t i = 0; i < set->n && !ok; i++) {
            ok = set->h[i] == h;
        }
        if (!ok && bad++ < 5) {
            fail("%s: guest bytes %" PRIu64 "+%u hold content they never "
                 "had since the last durable point (%u candidates)",
                 what, (uint64_t)s * SECTOR, SECTOR, set->n);
        }
    }
    if (bad > 5) {
        fail("%s: %d sectors wrong in all", what, bad);
    }
    free(buf);
}

static bool same_disk(const uint8_t *a, const uint8_t *b, uint64_t *first)
{
    for (uint64_t i = 0; i < DISK; i++) {
        if (a[i] != b[i]) {
            *first = i;
            return false;
        }
    }
    return true;
}

static void check_vmstate(qsnap_image *img, const char *name,
                          const struct op *o)
{
    qsnap_vmstate *vs;
    int ret = qsnap_vmstate_open(img, name, &vs);
    if (ret < 0) {
        fail("checkpoint %s: VM state: %s", name, qsnap_errmsg(img));
        return;
    }
    const uint64_t want[2] = {o->len, dev_len(o)};
    const char *const names[2] = {"ram", "dev"};
    struct qsnap_section_info *list = NULL;
    uint32_t n = 0;
    ret = qsnap_vmstate_sections(vs, &list, &n);
    if (ret < 0 || n != 2) {
        fail("checkpoint %s: %u sections (%s), want 2", name, n,
             qsnap_vmstate_errmsg(vs));
    }
    for (int i = 0; ret == 0 && i < 2 && n == 2; i++) {
        if (strcmp(list[i].name, names[i]) || list[i].size != want[i]) {
            fail("checkpoint %s: section %d is '%s' of %" PRIu64
                 " bytes, want '%s' of %" PRIu64,
                 name, i, list[i].name, list[i].size, names[i], want[i]);
            continue;
        }
        uint8_t *got = xmalloc((size_t)want[i]);
        uint8_t *exp = xmalloc((size_t)want[i]);
        if (i == 0) {
            ram_bytes(o, exp, 0, (size_t)want[i]);
        } else {
            fill(exp, (size_t)want[i], o->seed, 1u << 30);
        }
        if (qsnap_vmstate_section_pread(vs, names[i], got, (size_t)want[i],
                                        0) < 0) {
            fail("checkpoint %s: reading section %s: %s", name, names[i],
                 qsnap_vmstate_errmsg(vs));
        } else if (memcmp(got, exp, (size_t)want[i])) {
            fail("checkpoint %s: section %s differs", name, names[i]);
        }
        free(got);
        free(exp);
    }
    free(list);
    qsnap_vmstate_close(vs);
}

static void check_snapshots(qsnap_image *img, struct expect *ex, int n_ex)
{
    struct qsnap_snapshot_info *list;
    uint32_t n;
    if (qsnap_snapshot_list(img, &list, &n) < 0) {
        fail("listing snapshots: %s", qsnap_errmsg(img));
        return;
    }
    uint8_t *buf = xmalloc(DISK);
    for (uint32_t i = 0; i < n; i++) {
        struct expect *e = NULL;
        for (int j = 0; j < n_ex && !e; j++) {
            char name[64];
            snap_name(name, sizeof(name), &ex[j].op);
            if (strcmp(name, list[i].name) == 0) {
                e = &ex[j];
            }
        }
        if (!e || (e->deleted && !e->maybe)) {
            fail("snapshot '%s' exists but should not", list[i].name);
            continue;
        }
        e->deleted = false; /* seen */
        e->maybe = false;
        qsnap_view *v;
        uint64_t first;
        if (qsnap_view_open(img, list[i].name, &v) < 0) {
            fail("snapshot '%s': %s", list[i].name, qsnap_errmsg(img));
        } else if (qsnap_view_pread(v, buf, DISK, 0) < 0) {
            fail("snapshot '%s': reading: %s", list[i].name,
                 qsnap_errmsg(img));
        } else if (!same_disk(buf, e->disk, &first)) {
            fail("snapshot '%s' differs at guest byte %" PRIu64,
                 list[i].name, first);
        }
        if (v) {
            qsnap_view_close(v);
        }
        if (e->kind == K_CHECKPOINT) {
            check_vmstate(img, list[i].name, &e->op);
        }
    }
    for (int j = 0; j < n_ex; j++) {
        if (!ex[j].deleted && !ex[j].maybe) {
            bool seen = false;
            char name[64];
            snap_name(name, sizeof(name), &ex[j].op);
            for (uint32_t i = 0; i < n && !seen; i++) {
                seen = strcmp(name, list[i].name) == 0;
            }
            if (!seen) {
                fail("snapshot '%s' was made but is missing", name);
            }
        }
    }
    free(buf);
    qsnap_snapshot_list_free(list, n);
}

static void check_layer(const struct expect *e)
{
    char path[4200];
    layer_path(path, sizeof(path), e->no);
    if (e->deleted) {
        if (!e->maybe && access(path, F_OK) == 0) {
            fail("%s: merged away but still there", path);
        }
        return;
    }
    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    char err[1024];
    qsnap_image *img;
    if (qsnap_open(path, &oo, &img, err, sizeof(err)) < 0) {
        fail("%s", err);
        return;
    }
    uint8_t *buf = xmalloc(DISK);
    uint64_t first;
    if (qsnap_pread(img, buf, DISK, 0) < 0) {
        fail("%s: reading: %s", path, qsnap_errmsg(img));
    } else if (!same_disk(buf, e->disk, &first)) {
        fail("%s: no longer shows what it did when frozen (guest byte "
             "%" PRIu64 ")",
             path, first);
    }
    free(buf);
    qsnap_close(img);
}

static int cmd_verify(uint64_t seed)
{
    char path[4200];
    snprintf(path, sizeof(path), "%s/journal", dir);
    FILE *j = fopen(path, "r");
    if (!j) {
        die(2, "%s: %s", path, strerror(errno));
    }
    int last_begun = -1;
    int last_done = -1;
    char tag;
    int k;
    while (fscanf(j, " %c %d", &tag, &k) == 2) {
        if (tag == 'B') {
            last_begun = k;
        } else if (tag == 'D') {
            last_done = k;
        }
    }
    fclose(j);
    const int inflight = last_begun != last_done ? last_begun : -1;

    struct plan p;
    plan_init(&p, seed);
    struct model m;
    model_init(&m);
    struct expect ex[512];
    int n_ex = 0;
    ex[n_ex++] = (struct expect){.no = p.layers[0], .kind = K_PUSH};
    int top_no = p.layers[0];
    int top_ex = 0;

    for (k = 0; k <= last_begun; k++) {
        struct op o;
        plan_next(&p, &o);
        const bool done = k != inflight;
        struct expect *e = NULL;
        switch (o.kind) {
        case K_WRITE:
        case K_ZERO:
        case K_DISCARD:
            model_apply(&m, &o);
            break;
        case K_FLUSH:
            if (done) {
                model_durable(&m);
            }
            break;
        case K_SNAP:
        case K_CHECKPOINT:
        case K_PUSH:
            if (n_ex == (int)(sizeof(ex) / sizeof(ex[0]))) {
                die(2, "too many snapshots to follow");
            }
            e = &ex[n_ex++];
            *e = (struct expect){o.target, o.kind, o, copy_disk(&m), !done,
                                 false};
            if (o.kind == K_PUSH) {
                /* The old top is frozen now; the new one starts equal. */
                free(ex[top_ex].disk);
                ex[top_ex].disk = copy_disk(&m);
                ex[top_ex].maybe = false;
                if (done) {
                    top_no = o.target;
                    top_ex = n_ex - 1;
                } else {
                    e->maybe = true;
                    e->deleted = true; /* not checked */
                }
            }
            if (done) {
                model_durable(&m);
            }
            break;
        case K_UNSNAP:
        case K_MERGE:
            for (int i = 0; i < n_ex; i++) {
                if (ex[i].no == o.target) {
                    ex[i].deleted = true;
                    ex[i].maybe = !done;
                }
            }
            if (done && o.kind == K_MERGE) {
                model_durable(&m);
            }
            break;
        }
    }

    /* The files that must be intact, for the caller's qemu-img check:
     * the top, and every layer not gone or going (an interrupted push may
     * leave a half-made overlay nobody points to). */
    snprintf(path, sizeof(path), "%s/files", dir);
    FILE *fl = fopen(path, "w");
    if (!fl) {
        die(2, "%s: %s", path, strerror(errno));
    }
    for (int i = 0; i < (p.chain ? n_ex : 1); i++) {
        if (i == top_ex || !ex[i].deleted) {
            layer_path(path, sizeof(path), ex[i].no);
            fprintf(fl, "%s\n", path);
        }
    }
    fclose(fl);

    layer_path(path, sizeof(path), top_no);
    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    char err[1024];
    qsnap_image *img;
    if (qsnap_open(path, &oo, &img, err, sizeof(err)) < 0) {
        fail("%s", err);
        return 1;
    }
    char what[4300];
    snprintf(what, sizeof(what), "%s after operation %d%s", path, last_begun,
             inflight >= 0 ? " (interrupted)" : "");
    check_live(img, &m, what);
    if (!p.chain) {
        check_snapshots(img, ex + 1, n_ex - 1);
    }
    qsnap_close(img);
    if (p.chain) {
        for (int i = 0; i < n_ex; i++) {
            if (i != top_ex) {
                check_layer(&ex[i]);
            }
        }
    }
    for (int i = 0; i < n_ex; i++) {
        free(ex[i].disk);
    }
    for (uint32_t s = 0; s < N_SECT; s++) {
        free(m.sets[s].h);
    }
    free(m.sets);
    free(m.dirty);
    free(m.cur);
    if (failures) {
        fprintf(stderr, PROG ": seed %" PRIu64 ": %d checks failed\n", seed,
                failures);
        return 1;
    }
    printf("seed %" PRIu64 ": %d operations begun%s, all checks passed\n",
           seed, last_begun + 1, inflight >= 0 ? " (last interrupted)" : "");
    return 0;
}

static int cmd_recover(const char *path)
{
    struct qsnap_open_opts oo;
    qsnap_open_opts_init(&oo);
    oo.flags = QSNAP_OPEN_RDWR | QSNAP_OPEN_NO_BACKING;
    char err[1024];
    qsnap_image *img;
    if (qsnap_open(path, &oo, &img, err, sizeof(err)) < 0) {
        fprintf(stderr, PROG ": %s\n", err);
        return 1;
    }
    return qsnap_close(img) < 0 ? 1 : 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "recover") == 0) {
        return cmd_recover(argv[2]);
    }
    if (argc >= 4) {
        snprintf(dir, sizeof(dir), "%s", argv[2]);
        const uint64_t seed = strtoull(argv[3], NULL, 0);
        if (strcmp(argv[1], "run") == 0 && argc == 5) {
            return cmd_run(seed, atoi(argv[4]));
        }
        if (strcmp(argv[1], "init") == 0 && argc == 4) {
            cmd_init(seed);
            return 0;
        }
        if (strcmp(argv[1], "verify") == 0 && argc == 4) {
            return cmd_verify(seed);
        }
    }
    fprintf(stderr, "usage: " PROG " init DIR SEED\n"
                    "       " PROG " run DIR SEED N_OPS\n"
                    "       " PROG " verify DIR SEED\n"
                    "       " PROG " recover IMAGE\n");
    return 2;
}
