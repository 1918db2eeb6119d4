/*
 * fuse_json.c - the JSON files of the tree: info.json and each snapshot's
 * info.json.
 *
 * info.json is the document `qsnap-img info --output=json` prints, which
 * in turn is qemu-img's: the ImageInfo members, printed the way QEMU's
 * JSON writer prints a QDict (four-space indent, members in hash-bucket
 * order, the newest member of a bucket first, non-ASCII as \uXXXX).  A
 * snapshot's info.json is a plain object in the order written.
 *
 * Invariants
 *   1. The text is built from the public API alone, at the moment of the
 *      call (info.json is rebuilt at every open).
 *   2. Out of memory anywhere gives -ENOMEM and no partial text.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "qsnap_fuse.h"

enum jtype { J_INT, J_UINT, J_BOOL, J_STR, J_OBJ };

struct jobj;

struct jmember {
    char *key; /* NULL in arrays */
    enum jtype type;
    union {
        int64_t i;
        uint64_t u;
        bool b;
        char *s;
        struct jobj *obj;
    } v;
};

struct jobj {
    bool array;
    bool ordered; /* print in insertion order rather than QDict order */
    bool failed;  /* an allocation failed while building */
    size_t n;
    size_t cap;
    struct jmember *m;
};

static struct jobj *jobj_new(bool array, bool ordered)
{
    struct jobj *o = calloc(1, sizeof(*o));
    if (o) {
        o->array = array;
        o->ordered = ordered;
    }
    return o;
}

static void jobj_free(struct jobj *o)
{
    if (!o) {
        return;
    }
    for (size_t i = 0; i < o->n; i++) {
        free(o->m[i].key);
        if (o->m[i].type == J_STR) {
            free(o->m[i].v.s);
        } else if (o->m[i].type == J_OBJ) {
            jobj_free(o->m[i].v.obj);
        }
    }
    free(o->m);
    free(o);
}

/* Appends a member (its value still unset); NULL after a failure. */
static struct jmember *jobj_add(struct jobj *o, const char *key)
{
    if (!o || o->failed) {
        return NULL;
    }
    if (o->n == o->cap) {
        const size_t cap = o->cap ? o->cap * 2 : 8;
        struct jmember *m = realloc(o->m, cap * sizeof(*m));
        if (!m) {
            o->failed = true;
            return NULL;
        }
        o->m = m;
        o->cap = cap;
    }
    struct jmember *m = &o->m[o->n];
    memset(m, 0, sizeof(*m));
    if (!o->array) {
        m->key = strdup(key);
        if (!m->key) {
            o->failed = true;
            return NULL;
        }
    }
    /* A boolean until the value is in place, so freeing is always safe. */
    m->type = J_BOOL;
    o->n++;
    return m;
}

static void jobj_uint(struct jobj *o, const char *key, uint64_t v)
{
    struct jmember *m = jobj_add(o, key);
    if (m) {
        m->type = J_UINT;
        m->v.u = v;
    }
}

static void jobj_int(struct jobj *o, const char *key, int64_t v)
{
    struct jmember *m = jobj_add(o, key);
    if (m) {
        m->type = J_INT;
        m->v.i = v;
    }
}

static void jobj_bool(struct jobj *o, const char *key, bool v)
{
    struct jmember *m = jobj_add(o, key);
    if (m) {
        m->v.b = v;
    }
}

static void jobj_str(struct jobj *o, const char *key, const char *v)
{
    struct jmember *m = jobj_add(o, key);
    if (!m) {
        return;
    }
    m->v.s = strdup(v);
    if (!m->v.s) {
        o->failed = true;
        return;
    }
    m->type = J_STR;
}

static struct jobj *jobj_child(struct jobj *o, const char *key, bool array)
{
    struct jmember *m = jobj_add(o, key);
    if (!m) {
        return NULL;
    }
    m->v.obj = jobj_new(array, o->ordered);
    if (!m->v.obj) {
        o->failed = true;
        return NULL;
    }
    m->type = J_OBJ;
    return m->v.obj;
}

static bool jobj_failed(const struct jobj *o)
{
    if (!o || o->failed) {
        return true;
    }
    for (size_t i = 0; i < o->n; i++) {
        if (o->m[i].type == J_OBJ && jobj_failed(o->m[i].v.obj)) {
            return true;
        }
    }
    return false;
}

/*
 * The bucket QEMU's QDict files a key under: the hash of the tdb library
 * over 512 buckets.
 */
static unsigned qdict_bucket(const char *key)
{
    const size_t len = strlen(key);
    unsigned h = 0x238F13AFu * (unsigned)len;
    for (size_t i = 0; i < len; i++) {
        h += (unsigned)(unsigned char)key[i] << (i * 5 % 24);
    }
    return (1103515243u * h + 12345u) % 512u;
}

/* Member indices in print order: insertion order, or QDict's order. */
static size_t *print_order(const struct jobj *o)
{
    size_t *ord = malloc((o->n ? o->n : 1) * sizeof(*ord));
    unsigned *bkt = malloc((o->n ? o->n : 1) * sizeof(*bkt));
    if (!ord || !bkt) {
        free(ord);
        free(bkt);
        return NULL;
    }
    for (size_t i = 0; i < o->n; i++) {
        ord[i] = i;
        bkt[i] = (o->array || o->ordered) ? 0 : qdict_bucket(o->m[i].key);
    }
    if (!o->array && !o->ordered) {
        /* Ascending bucket; inside a bucket the later member first. */
        for (size_t i = 1; i < o->n; i++) {
            const size_t cur = ord[i];
            size_t j = i;
            while (j > 0 &&
                   (bkt[ord[j - 1]] > bkt[cur] ||
                    (bkt[ord[j - 1]] == bkt[cur] && ord[j - 1] < cur))) {
                ord[j] = ord[j - 1];
                j--;
            }
            ord[j] = cur;
        }
    }
    free(bkt);
    return ord;
}

/*
 * Decodes one UTF-8 sequence at *pp (advancing it); malformed input gives
 * U+FFFD for the bytes consumed.
 */
static unsigned utf8_next(const unsigned char **pp)
{
    const unsigned char *p = *pp;
    unsigned cp = *p++;
    int more;

    if (cp < 0x80) {
        *pp = p;
        return cp;
    } else if (cp >= 0xc0 && cp < 0xe0) {
        cp &= 0x1f;
        more = 1;
    } else if (cp >= 0xe0 && cp < 0xf0) {
        cp &= 0x0f;
        more = 2;
    } else if (cp >= 0xf0 && cp < 0xf8) {
        cp &= 0x07;
        more = 3;
    } else {
        *pp = p;
        return 0xfffd;
    }
    for (int k = 0; k < more; k++) {
        if ((*p & 0xc0) != 0x80) {
            *pp = p;
            return 0xfffd;
        }
        cp = (cp << 6) | (*p++ & 0x3f);
    }
    *pp = p;
    return cp;
}

static void put_string(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;

    fputc('"', f);
    while (*p) {
        unsigned cp = utf8_next(&p);
        switch (cp) {
        case '"':
            fputs("\\\"", f);
            break;
        case '\\':
            fputs("\\\\", f);
            break;
        case '\b':
            fputs("\\b", f);
            break;
        case '\f':
            fputs("\\f", f);
            break;
        case '\n':
            fputs("\\n", f);
            break;
        case '\r':
            fputs("\\r", f);
            break;
        case '\t':
            fputs("\\t", f);
            break;
        default:
            if (cp >= 0x20 && cp < 0x7f) {
                fputc((int)cp, f);
            } else if (cp >= 0x10000) {
                cp -= 0x10000;
                fprintf(f, "\\u%04X\\u%04X", 0xd800 | (cp >> 10),
                        0xdc00 | (cp & 0x3ff));
            } else {
                fprintf(f, "\\u%04X", cp);
            }
            break;
        }
    }
    fputc('"', f);
}

static int put_obj(FILE *f, const struct jobj *o, int level)
{
    size_t *ord = print_order(o);
    if (!ord) {
        return -ENOMEM;
    }
    int ret = 0;
    fputc(o->array ? '[' : '{', f);
    for (size_t k = 0; k < o->n && ret == 0; k++) {
        const struct jmember *m = &o->m[ord[k]];
        fprintf(f, "%s\n%*s", k ? "," : "", (level + 1) * 4, "");
        if (!o->array) {
            put_string(f, m->key);
            fputs(": ", f);
        }
        switch (m->type) {
        case J_INT:
            fprintf(f, "%" PRId64, m->v.i);
            break;
        case J_UINT:
            fprintf(f, "%" PRIu64, m->v.u);
            break;
        case J_BOOL:
            fputs(m->v.b ? "true" : "false", f);
            break;
        case J_STR:
            put_string(f, m->v.s);
            break;
        case J_OBJ:
            ret = put_obj(f, m->v.obj, level + 1);
            break;
        }
    }
    if (o->n) {
        fprintf(f, "\n%*s", level * 4, "");
    }
    fputc(o->array ? ']' : '}', f);
    free(ord);
    return ret;
}

/* Prints `o` (and a newline) into a new malloc'ed text; frees `o`. */
static int finish(struct jobj *o, char **out, size_t *len)
{
    char *text = NULL;
    size_t n = 0;
    int ret = -ENOMEM;

    if (!jobj_failed(o)) {
        FILE *f = open_memstream(&text, &n);
        if (f) {
            ret = put_obj(f, o, 0);
            fputc('\n', f);
            if (fclose(f) != 0 && ret == 0) {
                ret = -ENOMEM;
            }
        }
    }
    jobj_free(o);
    if (ret < 0) {
        free(text);
        return ret;
    }
    *out = text;
    *len = n;
    return 0;
}

static const char *format_name(int format)
{
    return format == QSNAP_FMT_RAW ? "raw" : "qcow2";
}

/* The backing file's path as QEMU resolves it: beside the image. */
static char *backing_full_path(const char *image, const char *backing)
{
    const char *slash = strrchr(image, '/');
    char *s = NULL;
    int n;

    if (backing[0] == '/' || !slash) {
        n = asprintf(&s, "%s", backing);
    } else {
        n = asprintf(&s, "%.*s%s", (int)(slash - image + 1), image, backing);
    }
    return n < 0 ? NULL : s;
}

/* One SnapshotInfo object, as qemu-img lists snapshots. */
static void add_snapshot(struct jobj *arr, const struct qsnap_snapshot_info *sn)
{
    struct jmember *m = jobj_add(arr, NULL);
    if (!m) {
        return;
    }
    struct jobj *o = jobj_new(false, false);
    if (!o) {
        arr->failed = true;
        return;
    }
    m->type = J_OBJ;
    m->v.obj = o;
    jobj_str(o, "id", sn->id);
    jobj_str(o, "name", sn->name);
    jobj_uint(o, "vm-state-size", sn->vm_state_size);
    jobj_uint(o, "date-sec", sn->date_sec);
    jobj_uint(o, "date-nsec", sn->date_nsec);
    jobj_uint(o, "vm-clock-sec", sn->vm_clock_ns / 1000000000u);
    jobj_uint(o, "vm-clock-nsec", sn->vm_clock_ns % 1000000000u);
    if (sn->icount != -1) {
        jobj_int(o, "icount", sn->icount);
    }
}

static void add_format_specific(struct jobj *obj, const struct qsnap_info *in)
{
    struct jobj *spec = jobj_child(obj, "format-specific", false);
    jobj_str(spec, "type", "qcow2");
    struct jobj *data = jobj_child(spec, "data", false);
    jobj_str(data, "compat", in->version >= 3 ? "1.1" : "0.10");
    if (in->version >= 3) {
        jobj_bool(data, "extended-l2", in->extended_l2);
        jobj_bool(data, "lazy-refcounts", in->lazy_refcounts);
        jobj_bool(data, "corrupt", in->corrupt);
    }
    jobj_int(data, "refcount-bits", in->refcount_bits);
    jobj_str(data, "compression-type",
             in->compression_type == QSNAP_COMPRESSION_ZSTD ? "zstd" : "zlib");
}

int qf_json_image_info(struct qf_fs *fs, char **out, size_t *len)
{
    struct qsnap_info *in = calloc(1, sizeof(*in));
    struct qsnap_snapshot_info *snaps = NULL;
    uint32_t n_snaps = 0;
    struct jobj *obj = NULL;
    char *full = NULL;
    int ret = -ENOMEM;

    if (!in) {
        return -ENOMEM;
    }
    in->struct_size = sizeof(*in);
    ret = qsnap_get_info(fs->img, in);
    if (ret < 0) {
        goto out;
    }
    if (in->nb_snapshots) {
        ret = qsnap_snapshot_list(fs->img, &snaps, &n_snaps);
        if (ret < 0) {
            goto out;
        }
    }
    uint64_t vsize = in->virtual_size;
    if (in->format == QSNAP_FMT_RAW) {
        /* QEMU counts a raw file in whole sectors. */
        vsize = (vsize + 511) & ~UINT64_C(511);
    }

    ret = -ENOMEM;
    obj = jobj_new(false, false);
    if (!obj) {
        goto out;
    }
    jobj_str(obj, "filename", fs->image_path);
    jobj_str(obj, "format", format_name(in->format));
    jobj_bool(obj, "dirty-flag", in->dirty);
    jobj_uint(obj, "actual-size", in->disk_size);
    jobj_uint(obj, "virtual-size", vsize);
    if (in->format == QSNAP_FMT_QCOW2) {
        jobj_uint(obj, "cluster-size", in->cluster_size);
    }
    if (in->backing_file[0]) {
        full = backing_full_path(fs->image_path, in->backing_file);
        if (!full) {
            goto out;
        }
        jobj_str(obj, "backing-filename", in->backing_file);
        jobj_str(obj, "full-backing-filename", full);
        if (in->backing_fmt[0]) {
            jobj_str(obj, "backing-filename-format", in->backing_fmt);
        }
    }
    if (n_snaps) {
        struct jobj *arr = jobj_child(obj, "snapshots", true);
        for (uint32_t i = 0; arr && i < n_snaps; i++) {
            add_snapshot(arr, &snaps[i]);
        }
    }
    if (in->format == QSNAP_FMT_QCOW2) {
        add_format_specific(obj, in);
    }
    ret = finish(obj, out, len);
    obj = NULL;
out:
    jobj_free(obj);
    free(full);
    if (snaps) {
        qsnap_snapshot_list_free(snaps, n_snaps);
    }
    free(in);
    return ret;
}

int qf_json_snap_info(const struct qf_snap *sn, char **out, size_t *len)
{
    struct jobj *o = jobj_new(false, true);
    char date[64] = "";
    struct tm tm;
    const time_t t = (time_t)sn->date_sec;

    if (!o) {
        return -ENOMEM;
    }
    if (gmtime_r(&t, &tm)) {
        strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", &tm);
    }
    jobj_str(o, "id", sn->id);
    jobj_str(o, "name", sn->name);
    jobj_uint(o, "date-sec", sn->date_sec);
    jobj_uint(o, "date-nsec", sn->date_nsec);
    jobj_str(o, "date", date);
    jobj_uint(o, "vm-clock-sec", sn->vm_clock_ns / 1000000000u);
    jobj_uint(o, "vm-clock-nsec", sn->vm_clock_ns % 1000000000u);
    jobj_uint(o, "vm-state-size", sn->vm_state_size);
    jobj_uint(o, "disk-size", sn->disk_size);
    if (sn->icount != -1) {
        jobj_int(o, "icount", sn->icount);
    }
    return finish(o, out, len);
}
