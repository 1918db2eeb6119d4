/*
 * cache.c - write-back metadata caches (see qs_cache.h for invariants).
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "qs_int.h"

struct entry {
    uint64_t off; /* host offset; UINT64_MAX = empty slot */
    uint8_t *data;
    unsigned pin;
    bool dirty;
    bool referenced;
    struct entry *hnext;
};

struct qs_cache {
    struct qsnap_image *img;
    const char *what;
    size_t n;
    uint8_t *slab; /* n clusters, entry i owns slab[i * cluster_size] */
    struct entry *entries;
    struct entry **buckets;
    size_t n_buckets; /* power of two */
    size_t hand;      /* CLOCK hand */
    size_t n_dirty;
    bool unflushed; /* entries written since the last dependency flush */
    qs_cache *dep;
};

#define EMPTY UINT64_MAX

static size_t hash_off(const qs_cache *c, uint64_t off)
{
    uint64_t h = (off >> 9) * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 32) & (c->n_buckets - 1);
}

qs_cache *qs_cache_new(struct qsnap_image *img, size_t n, const char *what)
{
    qs_cache *c = calloc(1, sizeof(*c));
    if (!c) {
        return NULL;
    }
    c->img = img;
    c->what = what;
    c->n = n < 4 ? 4 : n;
    c->n_buckets = 1;
    while (c->n_buckets < c->n * 2) {
        c->n_buckets <<= 1;
    }
    c->entries = calloc(c->n, sizeof(*c->entries));
    c->buckets = calloc(c->n_buckets, sizeof(*c->buckets));
    c->slab = qs_alloc_buf(c->n * img->cluster_size);
    if (!c->entries || !c->buckets || !c->slab) {
        qs_cache_free(c);
        return NULL;
    }
    for (size_t i = 0; i < c->n; i++) {
        c->entries[i].off = EMPTY;
        c->entries[i].data = c->slab + i * img->cluster_size;
    }
    return c;
}

void qs_cache_free(qs_cache *c)
{
    if (!c) {
        return;
    }
    free(c->slab);
    free(c->entries);
    free(c->buckets);
    free(c);
}

void qs_cache_set_dependency(qs_cache *c, qs_cache *dep)
{
    c->dep = dep;
}

static struct entry *lookup(qs_cache *c, uint64_t off)
{
    for (struct entry *e = c->buckets[hash_off(c, off)]; e; e = e->hnext) {
        if (e->off == off) {
            return e;
        }
    }
    return NULL;
}

static void unhash(qs_cache *c, struct entry *e)
{
    struct entry **pp = &c->buckets[hash_off(c, e->off)];
    while (*pp && *pp != e) {
        pp = &(*pp)->hnext;
    }
    if (*pp) {
        *pp = e->hnext;
    }
    e->hnext = NULL;
    e->off = EMPTY;
}

static int writeback_locked(qs_cache *c);

/* Writes one dirty entry, honouring the dependency (invariant 2). */
static int write_entry(qs_cache *c, struct entry *e)
{
    struct qsnap_image *img = c->img;

    if (c->dep && (c->dep->n_dirty || c->dep->unflushed)) {
        /*
         * The dependency's entries, and every data write issued before
         * them, reach the disk before this entry can point at them.  Kept
         * with lazy refcounts too: a table entry must never point at data
         * a power loss could still drop.
         */
        int ret = writeback_locked(c->dep);
        if (ret == 0) {
            ret = qs_io_flush(img->io);
        }
        if (ret < 0) {
            return ret;
        }
        c->dep->unflushed = false;
    }
    if (qs_overlaps_metadata(img, e->off, img->cluster_size)) {
        return qs_corrupt(img,
                          "%s: refusing to write %s at 0x%llx: it overlaps "
                          "the header, an L1 table or the refcount table",
                          img->filename, c->what, (unsigned long long)e->off);
    }
    int ret = qs_host_write(img, e->data, img->cluster_size, e->off);
    if (ret < 0) {
        return qs_error(img, ret, "%s: writing %s at 0x%llx: %s", img->filename,
                        c->what, (unsigned long long)e->off,
                        qsnap_strerror(ret));
    }
    e->dirty = false;
    c->n_dirty--;
    c->unflushed = true;
    return 0;
}

static int cmp_entry_off(const void *a, const void *b)
{
    const struct entry *x = *(struct entry *const *)a;
    const struct entry *y = *(struct entry *const *)b;
    return x->off < y->off ? -1 : x->off > y->off;
}

static int writeback_locked(qs_cache *c)
{
    if (!c->n_dirty) {
        return 0;
    }
    struct entry **list = malloc(c->n_dirty * sizeof(*list));
    if (!list) {
        return -ENOMEM;
    }
    size_t k = 0;
    for (size_t i = 0; i < c->n && k < c->n_dirty; i++) {
        if (c->entries[i].off != EMPTY && c->entries[i].dirty) {
            list[k++] = &c->entries[i];
        }
    }
    /* Ascending offsets: sequential I/O for the file system. */
    qsort(list, k, sizeof(*list), cmp_entry_off);
    int ret = 0;
    for (size_t i = 0; i < k && ret == 0; i++) {
        ret = write_entry(c, list[i]);
    }
    free(list);
    return ret;
}

int qs_cache_writeback(qs_cache *c)
{
    pthread_mutex_lock(&c->img->meta_mtx);
    int ret = writeback_locked(c);
    pthread_mutex_unlock(&c->img->meta_mtx);
    return ret;
}

void qs_cache_mark_unflushed(qs_cache *c)
{
    pthread_mutex_lock(&c->img->meta_mtx);
    c->unflushed = true;
    pthread_mutex_unlock(&c->img->meta_mtx);
}

bool qs_cache_has_dirty(qs_cache *c)
{
    pthread_mutex_lock(&c->img->meta_mtx);
    bool d = c->n_dirty != 0;
    pthread_mutex_unlock(&c->img->meta_mtx);
    return d;
}

/* Finds a slot to reuse: CLOCK over unpinned entries. */
static int victim(qs_cache *c, struct entry **out)
{
    for (size_t step = 0; step < 2 * c->n + 1; step++) {
        struct entry *e = &c->entries[c->hand];
        c->hand = (c->hand + 1) % c->n;
        if (e->off == EMPTY) {
            *out = e;
            return 0;
        }
        if (e->pin) {
            continue;
        }
        if (e->referenced) {
            e->referenced = false;
            continue;
        }
        if (e->dirty) {
            int ret = write_entry(c, e);
            if (ret < 0) {
                return ret;
            }
        }
        unhash(c, e);
        *out = e;
        return 0;
    }
    /* Every entry pinned: callers pin at most a few, so this is a bug. */
    return -ENOMEM;
}

int qs_cache_get(qs_cache *c, uint64_t off, bool fresh, void **data)
{
    struct qsnap_image *img = c->img;
    int ret = 0;

    pthread_mutex_lock(&img->meta_mtx);
    struct entry *e = lookup(c, off);
    if (e) {
        if (fresh) {
            memset(e->data, 0, img->cluster_size);
            if (!e->dirty) {
                e->dirty = true;
                c->n_dirty++;
            }
        }
        goto found;
    }
    ret = victim(c, &e);
    if (ret < 0) {
        goto out;
    }
    if (fresh) {
        memset(e->data, 0, img->cluster_size);
        e->dirty = true;
        c->n_dirty++;
    } else {
        ret = qs_host_read(img, e->data, img->cluster_size, off);
        if (ret < 0) {
            ret = qs_error(img, ret, "%s: reading %s at 0x%llx: %s",
                           img->filename, c->what, (unsigned long long)off,
                           qsnap_strerror(ret));
            goto out;
        }
        e->dirty = false;
    }
    e->off = off;
    size_t b = hash_off(c, off);
    e->hnext = c->buckets[b];
    c->buckets[b] = e;

found:
    e->pin++;
    e->referenced = true;
    *data = e->data;
out:
    pthread_mutex_unlock(&img->meta_mtx);
    return ret;
}

static struct entry *entry_of(qs_cache *c, void *data)
{
    size_t idx = (size_t)((uint8_t *)data - c->slab) >> c->img->cluster_bits;
    return idx < c->n ? &c->entries[idx] : NULL;
}

void qs_cache_put(qs_cache *c, void *data)
{
    if (!data) {
        return;
    }
    pthread_mutex_lock(&c->img->meta_mtx);
    struct entry *e = entry_of(c, data);
    if (e && e->pin) {
        e->pin--;
    }
    pthread_mutex_unlock(&c->img->meta_mtx);
}

void qs_cache_mark_dirty(qs_cache *c, void *data)
{
    pthread_mutex_lock(&c->img->meta_mtx);
    struct entry *e = entry_of(c, data);
    if (e && !e->dirty) {
        e->dirty = true;
        c->n_dirty++;
    }
    pthread_mutex_unlock(&c->img->meta_mtx);
}

void qs_cache_drop(qs_cache *c, uint64_t off)
{
    pthread_mutex_lock(&c->img->meta_mtx);
    struct entry *e = lookup(c, off);
    if (e && !e->pin) {
        if (e->dirty) {
            c->n_dirty--;
            e->dirty = false;
        }
        unhash(c, e);
    }
    pthread_mutex_unlock(&c->img->meta_mtx);
}

int qs_cache_reset(qs_cache *c)
{
    pthread_mutex_lock(&c->img->meta_mtx);
    for (size_t i = 0; i < c->n; i++) {
        struct entry *e = &c->entries[i];
        if (e->off != EMPTY) {
            e->dirty = false;
            unhash(c, e);
        }
    }
    c->n_dirty = 0;
    pthread_mutex_unlock(&c->img->meta_mtx);
    return 0;
}
