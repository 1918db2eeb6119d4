/*
 * qs_cache.h - write-back caches of cluster-sized metadata tables.
 *
 * One cache holds L2 tables, another refcount blocks.  Entries are kept in
 * on-disk (big-endian) form and found by host offset through a hash table;
 * replacement is CLOCK (second chance), so a miss costs O(1) amortised.
 *
 * Invariants:
 *   1. A pinned entry (between qs_cache_get and qs_cache_put) is never
 *      evicted, so its data pointer stays valid.
 *   2. Before a dirty entry of a cache with a dependency is written, the
 *      dependency cache is written and the file is flushed (with lazy
 *      refcounts too): this is how refcount blocks, and the data written
 *      before them, reach the disk before the L2 entries that rely on
 *      them.
 *   3. All cache state is protected by the image's meta mutex, which the
 *      cache functions take themselves.
 */
#ifndef QS_CACHE_H
#define QS_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct qsnap_image;
typedef struct qs_cache qs_cache;

qs_cache *qs_cache_new(struct qsnap_image *img, size_t n_entries,
                       const char *what);
void qs_cache_free(qs_cache *c);

/* Writing a dirty entry of `c` first writes back and flushes `dep`. */
void qs_cache_set_dependency(qs_cache *c, qs_cache *dep);

/*
 * Returns a pinned pointer to the cluster at `host_off`, reading it from
 * the file unless `fresh` (then the buffer is zeroed and marked dirty: for
 * newly allocated tables).
 */
int qs_cache_get(qs_cache *c, uint64_t host_off, bool fresh, void **data);
void qs_cache_put(qs_cache *c, void *data);
void qs_cache_mark_dirty(qs_cache *c, void *data);

/* Writes every dirty entry (and dependencies); does not flush the file. */
int qs_cache_writeback(qs_cache *c);
bool qs_cache_has_dirty(qs_cache *c);

/* Records a write of this cache's kind made outside it (a new refcount
 * block), so dependants flush before their next write. */
void qs_cache_mark_unflushed(qs_cache *c);

/* Forgets the entry for a freed cluster without writing it. */
void qs_cache_drop(qs_cache *c, uint64_t host_off);

/* Forgets every entry (after the tables were rewritten elsewhere). */
int qs_cache_reset(qs_cache *c);

#endif /* QS_CACHE_H */
