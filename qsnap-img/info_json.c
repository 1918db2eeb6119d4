/*
 * info_json.c - the JSON of "qemu-img info" (see info_json.h): a small
 * builder and printer, and the ImageInfo and SnapshotInfo objects.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "info_json.h"

/* ------------------------------------------------------------ builder */

enum jtype { J_INT, J_UINT, J_BOOL, J_STR, J_OBJ };

struct jmember {
    char *key;
    enum jtype type;
    union {
        int64_t i;
        uint64_t u;
        bool b;
        char *s;
        struct qi_json *obj;
    } v;
};

struct qi_json {
    struct jmember *m;
    size_t n;
    size_t cap;
    bool failed;
    bool array;   /* members are elements: no keys, insertion order */
    bool ordered; /* an object printed in insertion order */
};

struct qi_json *qi_json_new(void)
{
    return calloc(1, sizeof(struct qi_json));
}

struct qi_json *qi_json_new_ordered(void)
{
    struct qi_json *obj = qi_json_new();
    if (obj) {
        obj->ordered = true;
    }
    return obj;
}

void qi_json_free(struct qi_json *obj)
{
    if (!obj) {
        return;
    }
    for (size_t i = 0; i < obj->n; i++) {
        free(obj->m[i].key);
        if (obj->m[i].type == J_STR) {
            free(obj->m[i].v.s);
        } else if (obj->m[i].type == J_OBJ) {
            qi_json_free(obj->m[i].v.obj);
        }
    }
    free(obj->m);
    free(obj);
}

static struct jmember *json_add(struct qi_json *obj, const char *key,
                                enum jtype type)
{
    if (!obj) {
        return NULL;
    }
    if (obj->n == obj->cap) {
        const size_t cap = obj->cap ? obj->cap * 2 : 8;
        struct jmember *m = realloc(obj->m, cap * sizeof(*m));
        if (!m) {
            obj->failed = true;
            return NULL;
        }
        obj->m = m;
        obj->cap = cap;
    }
    char *k = strdup(key);
    if (!k) {
        obj->failed = true;
        return NULL;
    }
    struct jmember *m = &obj->m[obj->n++];
    memset(m, 0, sizeof(*m));
    m->key = k;
    m->type = type;
    return m;
}

void qi_json_int(struct qi_json *obj, const char *key, int64_t v)
{
    struct jmember *m = json_add(obj, key, J_INT);
    if (m) {
        m->v.i = v;
    }
}

void qi_json_uint(struct qi_json *obj, const char *key, uint64_t v)
{
    struct jmember *m = json_add(obj, key, J_UINT);
    if (m) {
        m->v.u = v;
    }
}

void qi_json_bool(struct qi_json *obj, const char *key, bool v)
{
    struct jmember *m = json_add(obj, key, J_BOOL);
    if (m) {
        m->v.b = v;
    }
}

void qi_json_str(struct qi_json *obj, const char *key, const char *v)
{
    struct jmember *m = json_add(obj, key, J_STR);
    if (m) {
        m->v.s = strdup(v);
        if (!m->v.s) {
            obj->failed = true;
            m->type = J_BOOL;
        }
    }
}

struct qi_json *qi_json_obj(struct qi_json *obj, const char *key)
{
    struct jmember *m = json_add(obj, key, J_OBJ);
    if (!m) {
        return NULL;
    }
    m->v.obj = qi_json_new();
    if (!m->v.obj) {
        obj->failed = true;
        m->type = J_BOOL;
        return NULL;
    }
    return m->v.obj;
}

struct qi_json *qi_json_array(struct qi_json *obj, const char *key)
{
    struct qi_json *arr = qi_json_obj(obj, key);
    if (arr) {
        arr->array = true;
    }
    return arr;
}

struct qi_json *qi_json_append_obj(struct qi_json *arr)
{
    return arr ? qi_json_obj(arr, "") : NULL;
}

const struct qi_json *qi_json_get_obj(const struct qi_json *obj,
                                      const char *key)
{
    if (!obj) {
        return NULL;
    }
    for (size_t i = 0; i < obj->n; i++) {
        if (obj->m[i].type == J_OBJ && strcmp(obj->m[i].key, key) == 0) {
            return obj->m[i].v.obj;
        }
    }
    return NULL;
}

bool qi_json_failed(const struct qi_json *obj)
{
    if (!obj || obj->failed) {
        return true;
    }
    for (size_t i = 0; i < obj->n; i++) {
        if (obj->m[i].type == J_OBJ && qi_json_failed(obj->m[i].v.obj)) {
            return true;
        }
    }
    return false;
}

/* ------------------------------------------------------------ printing */

/*
 * QEMU's QDict keeps its entries in 512 hash buckets and iterates them in
 * bucket order; within a bucket the newest entry comes first.  This is
 * that hash (from the tdb library, as QDict uses it).
 */
#define QDICT_BUCKETS 512

static unsigned qdict_bucket(const char *key)
{
    unsigned value = 0x238F13AFu * (unsigned)strlen(key);
    for (unsigned i = 0; key[i]; i++) {
        value = value + ((unsigned)(unsigned char)key[i] << (i * 5 % 24));
    }
    return (1103515243u * value + 12345u) % QDICT_BUCKETS;
}

/* Member indices in printing order (malloc'ed; NULL if out of memory). */
static size_t *json_order(const struct qi_json *obj)
{
    size_t *order = malloc((obj->n ? obj->n : 1) * sizeof(*order));
    if (!order) {
        return NULL;
    }
    for (size_t i = 0; i < obj->n; i++) {
        order[i] = i;
    }
    if (obj->array || obj->ordered) {
        return order;
    }
    unsigned *bucket = malloc((obj->n ? obj->n : 1) * sizeof(*bucket));
    if (!bucket) {
        free(order);
        return NULL;
    }
    for (size_t i = 0; i < obj->n; i++) {
        bucket[i] = qdict_bucket(obj->m[i].key);
    }
    /* Insertion sort: by bucket, then newest first. */
    for (size_t i = 1; i < obj->n; i++) {
        const size_t cur = order[i];
        size_t j = i;
        while (j > 0) {
            const size_t prev = order[j - 1];
            const bool after = bucket[prev] > bucket[cur] ||
                               (bucket[prev] == bucket[cur] && prev < cur);
            if (!after) {
                break;
            }
            order[j] = prev;
            j--;
        }
        order[j] = cur;
    }
    free(bucket);
    return order;
}

void qi_json_print_string(FILE *f, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;

    fputc('"', f);
    while (*p) {
        unsigned cp = *p;
        int extra = 0;
        if (cp >= 0xf0 && cp < 0xf8) {
            cp &= 0x07;
            extra = 3;
        } else if (cp >= 0xe0) {
            cp &= 0x0f;
            extra = 2;
        } else if (cp >= 0xc0) {
            cp &= 0x1f;
            extra = 1;
        } else if (cp >= 0x80) {
            cp = 0xfffd;
            extra = -1;
        }
        p++;
        for (int i = 0; i < extra; i++) {
            if ((*p & 0xc0) != 0x80) {
                cp = 0xfffd;
                break;
            }
            cp = (cp << 6) | (*p & 0x3f);
            p++;
        }
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
            } else if (cp > 0xffff) {
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

/* 0, or -ENOMEM (the text is then incomplete). */
static int json_print_obj(FILE *f, const struct qi_json *obj, int level)
{
    size_t *order = json_order(obj);
    int ret = 0;
    if (!order) {
        return -ENOMEM;
    }
    fputc(obj->array ? '[' : '{', f);
    for (size_t k = 0; k < obj->n && ret == 0; k++) {
        const struct jmember *m = &obj->m[order[k]];
        fprintf(f, "%s\n%*s", k ? "," : "", (level + 1) * 4, "");
        if (!obj->array) {
            qi_json_print_string(f, m->key);
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
            qi_json_print_string(f, m->v.s);
            break;
        case J_OBJ:
            ret = json_print_obj(f, m->v.obj, level + 1);
            break;
        }
    }
    if (obj->n) {
        fprintf(f, "\n%*s", level * 4, "");
    }
    fputc(obj->array ? ']' : '}', f);
    free(order);
    return ret;
}

void qi_json_print(FILE *f, const struct qi_json *obj)
{
    (void)json_print_obj(f, obj, 0);
    fputc('\n', f);
}

int qi_json_text(const struct qi_json *obj, char **out, size_t *len)
{
    char *text = NULL;
    size_t n = 0;
    if (qi_json_failed(obj)) {
        return -ENOMEM;
    }
    FILE *f = open_memstream(&text, &n);
    if (!f) {
        return -ENOMEM;
    }
    int ret = json_print_obj(f, obj, 0);
    fputc('\n', f);
    if (fclose(f) != 0 && ret == 0) {
        ret = -ENOMEM;
    }
    if (ret < 0) {
        free(text);
        return ret;
    }
    *out = text;
    *len = n;
    return 0;
}

void qi_json_print_array(FILE *f, struct qi_json *const *objs, size_t n)
{
    fputc('[', f);
    for (size_t i = 0; i < n; i++) {
        fprintf(f, "%s\n    ", i ? "," : "");
        (void)json_print_obj(f, objs[i], 1);
    }
    if (n) {
        fputc('\n', f);
    }
    fputs("]\n", f);
}

void qi_json_print_human(FILE *f, const struct qi_json *obj, int indent)
{
    size_t *order = json_order(obj);
    if (!order) {
        return;
    }
    for (size_t k = 0; k < obj->n; k++) {
        const struct jmember *m = &obj->m[order[k]];
        fprintf(f, "%*s", indent * 4, "");
        for (const char *c = m->key; *c; c++) {
            fputc(*c == '-' ? ' ' : *c, f);
        }
        fputc(':', f);
        switch (m->type) {
        case J_INT:
            fprintf(f, " %" PRId64 "\n", m->v.i);
            break;
        case J_UINT:
            fprintf(f, " %" PRIu64 "\n", m->v.u);
            break;
        case J_BOOL:
            fprintf(f, " %s\n", m->v.b ? "true" : "false");
            break;
        case J_STR:
            fprintf(f, " %s\n", m->v.s);
            break;
        case J_OBJ:
            fputc('\n', f);
            qi_json_print_human(f, m->v.obj, indent + 1);
            break;
        }
    }
    free(order);
}

/* ------------------------------------------------------------ ImageInfo */

const char *qi_format_name(int format)
{
    return format == QSNAP_FMT_QCOW2 ? "qcow2" : "raw";
}

void qi_backing_path(const char *image_path, const char *backing, char *buf,
                     size_t len)
{
    const char *slash = strrchr(image_path, '/');
    if (backing[0] == '/' || !slash) {
        snprintf(buf, len, "%s", backing);
    } else {
        snprintf(buf, len, "%.*s%s", (int)(slash - image_path + 1), image_path,
                 backing);
    }
}

void qi_info_qemu_sizes(struct qsnap_info *info)
{
    if (info->format == QSNAP_FMT_RAW) {
        info->virtual_size = (info->virtual_size + 511) & ~UINT64_C(511);
    }
}

struct qi_json *qi_snapshot_json(struct qi_json *arr,
                                 const struct qsnap_snapshot_info *sn)
{
    struct qi_json *o = qi_json_append_obj(arr);
    if (!o) {
        return NULL;
    }
    qi_json_str(o, "id", sn->id);
    qi_json_str(o, "name", sn->name);
    qi_json_uint(o, "vm-state-size", sn->vm_state_size);
    qi_json_uint(o, "date-sec", sn->date_sec);
    qi_json_uint(o, "date-nsec", sn->date_nsec);
    qi_json_uint(o, "vm-clock-sec", sn->vm_clock_ns / 1000000000u);
    qi_json_uint(o, "vm-clock-nsec", sn->vm_clock_ns % 1000000000u);
    if (sn->icount != -1) {
        qi_json_int(o, "icount", sn->icount);
    }
    return o;
}

/* The "format-specific" member of a qcow2 image. */
static void add_qcow2_specific(struct qi_json *obj,
                               const struct qsnap_info *info)
{
    struct qi_json *spec = qi_json_obj(obj, "format-specific");
    qi_json_str(spec, "type", "qcow2");
    struct qi_json *data = qi_json_obj(spec, "data");
    qi_json_str(data, "compat", info->version >= 3 ? "1.1" : "0.10");
    if (info->version >= 3) {
        qi_json_bool(data, "extended-l2", info->extended_l2);
        qi_json_bool(data, "lazy-refcounts", info->lazy_refcounts);
        qi_json_bool(data, "corrupt", info->corrupt);
    }
    qi_json_int(data, "refcount-bits", info->refcount_bits);
    qi_json_str(data, "compression-type",
                info->compression_type == QSNAP_COMPRESSION_ZSTD ? "zstd"
                                                                 : "zlib");
}

/* Members are added in the order of QEMU's schema, which decides ties in
 * the printed order. */
struct qi_json *qi_info_json(const char *filename,
                             const struct qsnap_info *info,
                             const struct qsnap_snapshot_info *snaps,
                             uint32_t n_snaps)
{
    struct qi_json *obj = qi_json_new();
    char full[PATH_MAX];

    qi_json_str(obj, "filename", filename);
    qi_json_str(obj, "format", qi_format_name(info->format));
    qi_json_bool(obj, "dirty-flag", info->dirty);
    qi_json_uint(obj, "actual-size", info->disk_size);
    qi_json_uint(obj, "virtual-size", info->virtual_size);
    if (info->format == QSNAP_FMT_QCOW2) {
        qi_json_uint(obj, "cluster-size", info->cluster_size);
    }
    if (info->backing_file[0]) {
        qi_backing_path(filename, info->backing_file, full, sizeof(full));
        qi_json_str(obj, "backing-filename", info->backing_file);
        qi_json_str(obj, "full-backing-filename", full);
        if (info->backing_fmt[0]) {
            qi_json_str(obj, "backing-filename-format", info->backing_fmt);
        }
    }
    if (n_snaps) {
        struct qi_json *arr = qi_json_array(obj, "snapshots");
        for (uint32_t i = 0; arr && i < n_snaps; i++) {
            qi_snapshot_json(arr, &snaps[i]);
        }
    }
    if (info->format == QSNAP_FMT_QCOW2) {
        add_qcow2_specific(obj, info);
    }
    if (qi_json_failed(obj)) {
        qi_json_free(obj);
        return NULL;
    }
    return obj;
}
