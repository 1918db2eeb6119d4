/*
 * info_json.h - the JSON qemu-img prints for "info", shared by qsnap-img
 * and qsnap-fuse (whose info.json is the same document).
 *
 * Built into both front ends from the public API alone.  The builder's
 * printer orders an object's keys the way QEMU's QDict does (by bucket of
 * their hash, newest first within a bucket), so the text matches qemu-img
 * --output=json byte for byte; arrays, and objects made with
 * qi_json_new_ordered(), print in the order their members were added.
 */
#ifndef QI_INFO_JSON_H
#define QI_INFO_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <qsnap.h>

/* ------------------------------------------------------------ builder */

struct qi_json;

struct qi_json *qi_json_new(void);
/* An object printed in insertion order rather than QDict order. */
struct qi_json *qi_json_new_ordered(void);
void qi_json_free(struct qi_json *obj);
/* Adders are NULL-safe and record a failed allocation in OBJ. */
void qi_json_int(struct qi_json *obj, const char *key, int64_t v);
void qi_json_uint(struct qi_json *obj, const char *key, uint64_t v);
void qi_json_bool(struct qi_json *obj, const char *key, bool v);
void qi_json_str(struct qi_json *obj, const char *key, const char *v);
/* Adds and returns a nested object (owned by OBJ). */
struct qi_json *qi_json_obj(struct qi_json *obj, const char *key);
/* Adds and returns an array of objects (owned by OBJ). */
struct qi_json *qi_json_array(struct qi_json *obj, const char *key);
/* Appends and returns a new object to an array (NULL-safe). */
struct qi_json *qi_json_append_obj(struct qi_json *arr);
/* The nested object KEY of OBJ (NULL if OBJ is NULL or has none). */
const struct qi_json *qi_json_get_obj(const struct qi_json *obj,
                                      const char *key);
/* True if an allocation failed anywhere in the tree. */
bool qi_json_failed(const struct qi_json *obj);

/* ------------------------------------------------------------ printing */

/* Pretty-prints OBJ as qemu-img does (4-space indent), then a newline. */
void qi_json_print(FILE *f, const struct qi_json *obj);

/* Pretty-prints a JSON array of N objects, then a newline. */
void qi_json_print_array(FILE *f, struct qi_json *const *objs, size_t n);

/*
 * Prints OBJ's members as qemu-img's human output does for
 * "Format specific information": "key with spaces: value", indented.
 */
void qi_json_print_human(FILE *f, const struct qi_json *obj, int indent);

/* Writes S as a JSON string literal (with quotes) to F. */
void qi_json_print_string(FILE *f, const char *s);

/* OBJ as qi_json_print() prints it, in a new malloc'ed text of *LEN
 * bytes (plus a NUL).  0 or -ENOMEM, also when an allocation failed
 * while OBJ was built. */
int qi_json_text(const struct qi_json *obj, char **out, size_t *len);

/* ------------------------------------------------------------ ImageInfo */

/* QSNAP_FMT_* -> "qcow2"/"raw". */
const char *qi_format_name(int format);

/*
 * The path of a backing file as it is opened: BACKING as-is if absolute,
 * else relative to the directory of IMAGE_PATH (qemu's rule).
 */
void qi_backing_path(const char *image_path, const char *backing, char *buf,
                     size_t len);

/* Sizes in INFO as QEMU reports them: a raw file counts whole sectors. */
void qi_info_qemu_sizes(struct qsnap_info *info);

/*
 * Appends SN to the array ARR as the SnapshotInfo object of qemu-img
 * info --output=json and returns it (NULL on allocation failure), so
 * that callers may add members.
 */
struct qi_json *qi_snapshot_json(struct qi_json *arr,
                                 const struct qsnap_snapshot_info *sn);

/*
 * The ImageInfo object qemu-img info prints for FILENAME, described by
 * INFO (after qi_info_qemu_sizes) and its N_SNAPS snapshots.  NULL on
 * allocation failure.
 */
struct qi_json *qi_info_json(const char *filename,
                             const struct qsnap_info *info,
                             const struct qsnap_snapshot_info *snaps,
                             uint32_t n_snaps);

#endif /* QI_INFO_JSON_H */
