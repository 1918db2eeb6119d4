/*
 * fuse_snap.c - the in-memory tables of qsnap-fuse: internal snapshots
 * (with their lazily opened views and VM state readers) and the layers of
 * the backing chain.
 *
 * The image's snapshot table is the truth; fs->snaps mirrors it and is
 * refreshed at mount, whenever snapshots/ is listed and around every
 * change made through the mount (the only changes the handle sees).  Entries are matched across refreshes by
 * ID and creation date, so a snapshot keeps its inode numbers (and the
 * kernel its cached pages) through renames, while a snapshot deleted and
 * re-created under the same ID gets new ones.
 *
 * Invariants (see also qsnap_fuse.h)
 *   1. An entry is freed when its last reference goes: the table holds
 *      one while the snapshot is present, each lookup in progress and
 *      each open file handle holds one.
 *   2. sn->view is non-NULL exactly when sn->n_view > 0 (likewise vs and
 *      n_vs, a layer's img and n_open); counts change under fs->lock,
 *      opening happens under fs->snap_lock.
 *   3. Listed names are unique: a name that is empty, repeats an earlier
 *      snapshot's or does not fit in a file name is listed as
 *      "%id:ID" instead; '%' is always escaped in real names, so such a
 *      stand-in cannot clash with one.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qsnap_fuse.h"

/* How long rmdir waits for the kernel to release a snapshot's files. */
#define QF_RELEASE_WAIT_SEC 5

/* ------------------------------------------------------------ names */

static bool needs_escape(char c, bool dots)
{
    return c == '%' || c == '/' || (dots && c == '.');
}

char *qf_name_encode(const char *name)
{
    const bool dots = strcmp(name, ".") == 0 || strcmp(name, "..") == 0;
    size_t n = 0;

    for (const char *p = name; *p; p++) {
        n += needs_escape(*p, dots) ? 3 : 1;
    }
    if (n == 0 || n > QF_NAME_MAX) {
        return NULL;
    }
    char *out = malloc(n + 1);
    if (!out) {
        return NULL;
    }
    char *o = out;
    for (const char *p = name; *p; p++) {
        if (needs_escape(*p, dots)) {
            snprintf(o, 4, "%%%02X", (unsigned)(unsigned char)*p);
            o += 3;
        } else {
            *o++ = *p;
        }
    }
    *o = '\0';
    return out;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

char *qf_name_decode(const char *fname)
{
    char *out = malloc(strlen(fname) + 1);
    char *o = out;

    if (!out) {
        return NULL;
    }
    for (const char *p = fname; *p;) {
        if (*p != '%') {
            *o++ = *p++;
            continue;
        }
        const int hi = hex_value(p[1]);
        const int lo = hi < 0 ? -1 : hex_value(p[2]);
        if (lo < 0 || (hi == 0 && lo == 0)) {
            free(out);
            errno = EINVAL;
            return NULL;
        }
        *o++ = (char)(hi * 16 + lo);
        p += 3;
    }
    *o = '\0';

    /* Only the spelling qf_name_encode() gives is accepted. */
    char *again = qf_name_encode(out);
    const bool same = again && strcmp(again, fname) == 0;
    free(again);
    if (!same) {
        free(out);
        errno = EINVAL;
        return NULL;
    }
    return out;
}

/* The stand-in name of invariant 3. */
static char *standin_name(const char *prefix, const char *key)
{
    char *enc = qf_name_encode(key);
    char *s = NULL;

    if (asprintf(&s, "%%%s:%s", prefix, enc ? enc : "?") < 0) {
        s = NULL;
    }
    free(enc);
    return s;
}

/* ------------------------------------------------------------ setup */

int qf_fs_init(struct qf_fs *fs)
{
    struct qsnap_layer_info *list = NULL;
    uint32_t count = 0;

    pthread_mutex_init(&fs->snap_lock, NULL);
    pthread_mutex_init(&fs->lock, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&fs->released, &ca);
    pthread_condattr_destroy(&ca);
    fs->next_num = 1;

    int ret = qsnap_chain_list(fs->img, &list, &count);
    if (ret < 0) {
        return ret;
    }
    if (count > 1) {
        fs->layers = calloc(count - 1, sizeof(*fs->layers));
        if (!fs->layers) {
            free(list);
            return -ENOMEM;
        }
    }
    for (uint32_t d = 1; d < count; d++) {
        struct qf_layer *l = &fs->layers[d - 1];
        const char *slash = strrchr(list[d].filename, '/');
        const char *base = slash ? slash + 1 : list[d].filename;
        bool clash = !base[0];
        for (uint32_t k = 0; k + 1 < d; k++) {
            clash = clash || strcmp(fs->layers[k].fname, base) == 0;
        }
        fs->n_layers = d;
        l->path = strdup(list[d].filename);
        l->format = list[d].format;
        l->size = list[d].virtual_size;
        if (clash) {
            if (asprintf(&l->fname, "%s.%u", base, d) < 0) {
                l->fname = NULL;
            }
        } else {
            l->fname = strdup(base);
        }
        if (!l->path || !l->fname) {
            free(list);
            return -ENOMEM;
        }
    }
    free(list);

    pthread_mutex_lock(&fs->snap_lock);
    ret = qf_snap_refresh(fs);
    pthread_mutex_unlock(&fs->snap_lock);
    return ret;
}

static void free_entry(struct qf_snap *sn)
{
    for (uint32_t i = 0; i < sn->n_secs; i++) {
        free(sn->secs[i].name);
        free(sn->secs[i].fname);
    }
    free(sn->secs);
    free(sn->id);
    free(sn->name);
    free(sn->fname);
    free(sn);
}

void qf_fs_fini(struct qf_fs *fs)
{
    for (size_t i = 0; i < fs->n_snaps; i++) {
        struct qf_snap *sn = fs->snaps[i];
        if (sn->view) {
            qsnap_view_close(sn->view);
        }
        if (sn->vs) {
            qsnap_vmstate_close(sn->vs);
        }
        free_entry(sn);
    }
    free(fs->snaps);
    fs->snaps = NULL;
    fs->n_snaps = 0;
    for (uint32_t i = 0; i < fs->n_layers; i++) {
        if (fs->layers[i].img) {
            qsnap_close(fs->layers[i].img);
        }
        free(fs->layers[i].fname);
        free(fs->layers[i].path);
    }
    free(fs->layers);
    fs->layers = NULL;
    fs->n_layers = 0;
    pthread_cond_destroy(&fs->released);
    pthread_mutex_destroy(&fs->lock);
    pthread_mutex_destroy(&fs->snap_lock);
}

/* ------------------------------------------------------------ the table */

/* Drops one reference; caller holds fs->lock. */
static void put_locked(struct qf_snap *sn)
{
    if (--sn->refs == 0) {
        free_entry(sn);
    }
}

void qf_snap_put(struct qf_fs *fs, struct qf_snap *sn)
{
    if (!sn) {
        return;
    }
    pthread_mutex_lock(&fs->lock);
    put_locked(sn);
    pthread_mutex_unlock(&fs->lock);
}

struct qf_snap *qf_snap_get_num(struct qf_fs *fs, uint64_t num)
{
    struct qf_snap *found = NULL;

    pthread_mutex_lock(&fs->lock);
    for (size_t i = 0; i < fs->n_snaps; i++) {
        if (fs->snaps[i]->num == num) {
            found = fs->snaps[i];
            found->refs++;
            break;
        }
    }
    pthread_mutex_unlock(&fs->lock);
    return found;
}

struct qf_snap *qf_snap_get_fname(struct qf_fs *fs, const char *fname)
{
    struct qf_snap *found = NULL;

    pthread_mutex_lock(&fs->lock);
    for (size_t i = 0; i < fs->n_snaps; i++) {
        if (strcmp(fs->snaps[i]->fname, fname) == 0) {
            found = fs->snaps[i];
            found->refs++;
            break;
        }
    }
    pthread_mutex_unlock(&fs->lock);
    return found;
}

/* What the refresh decided for one snapshot of the new list. */
struct pending {
    struct qf_snap *sn; /* matched old entry, or a new one */
    bool fresh;         /* sn was allocated by this refresh */
    char *name;
    char *fname;
};

static void fill_entry(struct qf_snap *sn, const struct qsnap_snapshot_info *si)
{
    sn->date_sec = si->date_sec;
    sn->date_nsec = si->date_nsec;
    sn->vm_clock_ns = si->vm_clock_ns;
    sn->vm_state_size = si->vm_state_size;
    sn->disk_size = si->disk_size;
    sn->icount = si->icount;
}

int qf_snap_refresh(struct qf_fs *fs)
{
    struct qsnap_snapshot_info *list = NULL;
    uint32_t n = 0;

    int ret = qsnap_snapshot_list(fs->img, &list, &n);
    if (ret < 0) {
        return ret;
    }
    struct pending *p = calloc(n ? n : 1, sizeof(*p));
    struct qf_snap **table = calloc(n ? n : 1, sizeof(*table));
    if (!p || !table) {
        ret = -ENOMEM;
        goto out;
    }

    pthread_mutex_lock(&fs->lock);
    /* Match by ID and date; allocate entries for new snapshots. */
    for (size_t k = 0; k < fs->n_snaps; k++) {
        fs->snaps[k]->matched = false;
    }
    for (uint32_t i = 0; i < n; i++) {
        for (size_t k = 0; k < fs->n_snaps && !p[i].sn; k++) {
            struct qf_snap *old = fs->snaps[k];
            if (!old->matched && strcmp(old->id, list[i].id) == 0 &&
                old->date_sec == list[i].date_sec &&
                old->date_nsec == list[i].date_nsec) {
                old->matched = true;
                p[i].sn = old;
            }
        }
        if (!p[i].sn) {
            struct qf_snap *sn = calloc(1, sizeof(*sn));
            if (!sn || !(sn->id = strdup(list[i].id))) {
                free(sn);
                ret = -ENOMEM;
                goto unlock;
            }
            p[i].sn = sn;
            p[i].fresh = true;
        }
        p[i].name = strdup(list[i].name);
        if (!p[i].name) {
            ret = -ENOMEM;
            goto unlock;
        }
    }
    /* Listed names (invariant 3). */
    for (uint32_t i = 0; i < n; i++) {
        char *f = list[i].name[0] ? qf_name_encode(list[i].name) : NULL;
        bool dup = false;
        for (uint32_t j = 0; f && j < i && !dup; j++) {
            dup = strcmp(p[j].fname, f) == 0;
        }
        if (!f || dup) {
            free(f);
            f = standin_name("id", list[i].id);
        }
        if (!f) {
            ret = -ENOMEM;
            goto unlock;
        }
        p[i].fname = f;
    }

    /* Commit: nothing fails from here on. */
    for (size_t k = 0; k < fs->n_snaps; k++) {
        fs->snaps[k]->present = false;
    }
    for (uint32_t i = 0; i < n; i++) {
        struct qf_snap *sn = p[i].sn;
        if (p[i].fresh) {
            sn->num = fs->next_num++;
            sn->refs = 1;
        }
        free(sn->name);
        free(sn->fname);
        sn->name = p[i].name;
        sn->fname = p[i].fname;
        p[i].name = p[i].fname = NULL;
        p[i].fresh = false;
        fill_entry(sn, &list[i]);
        sn->present = true;
        table[i] = sn;
    }
    for (size_t k = 0; k < fs->n_snaps; k++) {
        if (!fs->snaps[k]->present) {
            put_locked(fs->snaps[k]);
        }
    }
    free(fs->snaps);
    fs->snaps = table;
    fs->n_snaps = n;
    fs->cap_snaps = n;
    table = NULL;
    ret = 0;
unlock:
    pthread_mutex_unlock(&fs->lock);
out:
    if (p) {
        for (uint32_t i = 0; i < n; i++) {
            if (p[i].fresh) {
                free(p[i].sn->id);
                free(p[i].sn);
            }
            free(p[i].name);
            free(p[i].fname);
        }
    }
    free(p);
    free(table);
    qsnap_snapshot_list_free(list, n);
    return ret;
}

/* ------------------------------------------------------------ handles */

int qf_snap_view_acquire(struct qf_fs *fs, struct qf_snap *sn)
{
    pthread_mutex_lock(&fs->lock);
    const bool present = sn->present;
    const bool shared = sn->n_view > 0;
    if (present && shared) {
        sn->n_view++;
    }
    pthread_mutex_unlock(&fs->lock);
    if (!present) {
        return -ENOENT;
    }
    if (shared) {
        return 0;
    }

    /* Nobody else opens while we hold snap_lock (invariant 2). */
    qsnap_view *v = NULL;
    const int ret = qsnap_view_open(fs->img, sn->id, &v);
    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&fs->lock);
    sn->view = v;
    sn->n_view = 1;
    pthread_mutex_unlock(&fs->lock);
    return 0;
}

void qf_snap_view_release(struct qf_fs *fs, struct qf_snap *sn)
{
    pthread_mutex_lock(&fs->lock);
    if (--sn->n_view == 0) {
        qsnap_view_close(sn->view);
        sn->view = NULL;
        pthread_cond_broadcast(&fs->released);
    }
    pthread_mutex_unlock(&fs->lock);
}

int qf_snap_vs_acquire(struct qf_fs *fs, struct qf_snap *sn)
{
    pthread_mutex_lock(&fs->lock);
    const bool present = sn->present;
    const bool shared = sn->n_vs > 0;
    if (present && shared) {
        sn->n_vs++;
    }
    pthread_mutex_unlock(&fs->lock);
    if (!present) {
        return -ENOENT;
    }
    if (shared) {
        return 0;
    }

    qsnap_vmstate *vs = NULL;
    const int ret = qsnap_vmstate_open(fs->img, sn->id, &vs);
    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&fs->lock);
    sn->vs = vs;
    sn->n_vs = 1;
    pthread_mutex_unlock(&fs->lock);
    return 0;
}

void qf_snap_vs_release(struct qf_fs *fs, struct qf_snap *sn)
{
    pthread_mutex_lock(&fs->lock);
    if (--sn->n_vs == 0) {
        qsnap_vmstate_close(sn->vs);
        sn->vs = NULL;
        pthread_cond_broadcast(&fs->released);
    }
    pthread_mutex_unlock(&fs->lock);
}

/* Builds the section table of a container; caller holds fs->snap_lock. */
static int read_sections(qsnap_vmstate *vs, struct qf_section **out,
                         uint32_t *count)
{
    struct qsnap_section_info *list = NULL;
    uint32_t n = 0;

    int ret = qsnap_vmstate_sections(vs, &list, &n);
    if (ret < 0) {
        return ret;
    }
    struct qf_section *secs = calloc(n ? n : 1, sizeof(*secs));
    if (!secs) {
        free(list);
        return -ENOMEM;
    }
    ret = 0;
    for (uint32_t i = 0; i < n && ret == 0; i++) {
        char idx[16];
        snprintf(idx, sizeof(idx), "%u", i);
        secs[i].size = list[i].size;
        secs[i].name = strdup(list[i].name);
        secs[i].fname = qf_name_encode(list[i].name);
        if (!secs[i].fname || strcmp(secs[i].fname, "raw") == 0) {
            /* Unlistable as it is: a stand-in ("%section:N"). */
            free(secs[i].fname);
            secs[i].fname = standin_name("section", idx);
        }
        if (!secs[i].name || !secs[i].fname) {
            ret = -ENOMEM;
        }
    }
    free(list);
    if (ret < 0) {
        for (uint32_t i = 0; i < n; i++) {
            free(secs[i].name);
            free(secs[i].fname);
        }
        free(secs);
        return ret;
    }
    *out = secs;
    *count = n;
    return 0;
}

int qf_snap_probe_vmstate(struct qf_fs *fs, struct qf_snap *sn)
{
    pthread_mutex_lock(&fs->lock);
    const bool known = sn->vs_known;
    const bool none = sn->vm_state_size == 0;
    if (!known && none) {
        sn->vs_known = true;
    }
    pthread_mutex_unlock(&fs->lock);
    if (known || none) {
        return 0;
    }

    /* snap_lock is held: borrow the open reader or open one briefly. */
    qsnap_vmstate *vs = sn->vs;
    bool temporary = false;
    if (!vs) {
        const int ret = qsnap_vmstate_open(fs->img, sn->id, &vs);
        if (ret == -ENODATA) {
            pthread_mutex_lock(&fs->lock);
            sn->vs_known = true;
            pthread_mutex_unlock(&fs->lock);
            return 0;
        }
        if (ret < 0) {
            return ret;
        }
        temporary = true;
    }
    const bool sections = qsnap_vmstate_has_sections(vs);
    const uint64_t size = qsnap_vmstate_size(vs);
    struct qf_section *secs = NULL;
    uint32_t n_secs = 0;
    int ret = sections ? read_sections(vs, &secs, &n_secs) : 0;
    if (temporary) {
        qsnap_vmstate_close(vs);
    }
    if (ret < 0) {
        return ret;
    }
    pthread_mutex_lock(&fs->lock);
    sn->vs_sections = sections;
    sn->vs_size = size;
    sn->secs = secs;
    sn->n_secs = n_secs;
    sn->vs_known = true;
    pthread_mutex_unlock(&fs->lock);
    return 0;
}

int qf_snap_delete(struct qf_fs *fs, struct qf_snap *sn)
{
    const int ret = qsnap_snapshot_delete(fs->img, sn->id);
    if (ret != -EBUSY) {
        return ret;
    }

    /*
     * The kernel releases a closed file asynchronously: a reader that has
     * just closed may still hold the view.  Wait for our handles to go,
     * then try once more (a second EBUSY is someone else's).
     */
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += QF_RELEASE_WAIT_SEC;
    pthread_mutex_lock(&fs->lock);
    int wait = 0;
    while (wait == 0 && (sn->n_view > 0 || sn->n_vs > 0)) {
        wait = pthread_cond_timedwait(&fs->released, &fs->lock, &deadline);
    }
    const bool idle = sn->n_view == 0 && sn->n_vs == 0;
    pthread_mutex_unlock(&fs->lock);
    return idle ? qsnap_snapshot_delete(fs->img, sn->id) : -EBUSY;
}

int qf_layer_acquire(struct qf_fs *fs, struct qf_layer *l)
{
    pthread_mutex_lock(&fs->lock);
    const bool shared = l->n_open > 0;
    if (shared) {
        l->n_open++;
    }
    pthread_mutex_unlock(&fs->lock);
    if (shared) {
        return 0;
    }

    struct qsnap_open_opts o;
    qsnap_open_opts_init(&o);
    o.flags = QSNAP_OPEN_FORCE_SHARE;
    o.format = l->format;
    o.cache_size = fs->o.cache_size;
    qsnap_image *img = NULL;
    char err[512];
    const int ret = qsnap_open(l->path, &o, &img, err, sizeof(err));
    if (ret < 0) {
        qf_log(fs, "%s", err);
        return ret;
    }
    pthread_mutex_lock(&fs->lock);
    l->img = img;
    l->n_open = 1;
    pthread_mutex_unlock(&fs->lock);
    return 0;
}

void qf_layer_release(struct qf_fs *fs, struct qf_layer *l)
{
    qsnap_image *img = NULL;

    pthread_mutex_lock(&fs->lock);
    if (--l->n_open == 0) {
        img = l->img;
        l->img = NULL;
    }
    pthread_mutex_unlock(&fs->lock);
    if (img) {
        /* Read-only: nothing to flush, so the result says nothing. */
        (void)qsnap_close(img);
    }
}
