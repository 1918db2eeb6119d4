/*
 * qsnap_img.h - private interface of the qsnap-img command-line tool.
 *
 * qsnap-img follows qemu-img's syntax and output formats.  main.c holds
 * the command table and dispatch, util.c the helpers every command shares
 * (argument parsing, error printing, JSON, sizes, progress, image opening)
 * and each cmd_<name>.c one subcommand.  Commands receive argv with the
 * command name in argv[0] and return the process exit status.
 */
#ifndef QSNAP_IMG_H
#define QSNAP_IMG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <qsnap.h>

#include "info_json.h"

#define QI_PROG "qsnap-img"

/* Buffer size for bulk copies and comparisons (as qemu-img). */
#define QI_IO_BUF_SIZE (2u * 1024 * 1024)

#if defined(__GNUC__)
#define QI_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define QI_NORETURN __attribute__((noreturn))
#else
#define QI_PRINTF(a, b)
#define QI_NORETURN
#endif

/* ------------------------------------------------------------ commands */

struct qi_command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *synopsis; /* for --help, without the leading "qsnap-img " */
};

int qi_cmd_bench(int argc, char **argv);
int qi_cmd_check(int argc, char **argv);
int qi_cmd_commit(int argc, char **argv);
int qi_cmd_compact(int argc, char **argv);
int qi_cmd_compare(int argc, char **argv);
int qi_cmd_convert(int argc, char **argv);
int qi_cmd_create(int argc, char **argv);
int qi_cmd_delete(int argc, char **argv);
int qi_cmd_info(int argc, char **argv);
int qi_cmd_list(int argc, char **argv);
int qi_cmd_map(int argc, char **argv);
int qi_cmd_rebase(int argc, char **argv);
int qi_cmd_resize(int argc, char **argv);
int qi_cmd_snapshot(int argc, char **argv);
int qi_cmd_stream(int argc, char **argv);
int qi_cmd_vmstate(int argc, char **argv);

/*
 * Stores every regular file of DIR (in strcmp() order of their names) as
 * one section of a new checkpoint NAME of IMG (opened read-write from
 * FILENAME), streaming each file in 1 MiB pieces.  On any failure the
 * checkpoint is aborted and the error printed.  Returns 0 or a negative
 * errno (cmd_vmstate.c; also behind "snapshot -c NAME --vmstate DIR").
 */
int qi_vmstate_store(qsnap_image *img, const char *filename, const char *name,
                     const char *dir);

/* Prints the global help text and exits with status 0 (main.c). */
QI_NORETURN void qi_help(void);

/* ------------------------------------------------------------ errors */

/* "qsnap-img: MESSAGE" on stderr. */
void qi_error(const char *fmt, ...) QI_PRINTF(1, 2);

/* "qsnap-img: FILE: MESSAGE" on stderr. */
void qi_error_file(const char *file, const char *fmt, ...) QI_PRINTF(2, 3);

/* "qsnap-img: warning: MESSAGE" on stderr. */
void qi_warn(const char *fmt, ...) QI_PRINTF(1, 2);

/*
 * A usage error: prints the message and the hint to run --help, returns
 * exit status 1.
 */
int qi_usage_error(const char *fmt, ...) QI_PRINTF(1, 2);

/*
 * Getopt string prefix and the handler for its two error returns: put
 * QI_GETOPT_PREFIX (":") first in every option string, and hand '?' and ':'
 * results to qi_getopt_error(), which prints qemu-img's messages and
 * returns 1.
 */
#define QI_GETOPT_PREFIX ":"
int qi_getopt_error(int c, char **argv);

/* Long option values shared by several commands. */
enum {
    QI_OPT_OUTPUT = 256,
    QI_OPT_SHRINK,
    QI_OPT_START_OFFSET,
    QI_OPT_MAX_LENGTH,
    QI_OPT_PATTERN,
    QI_OPT_FLUSH_INTERVAL,
    QI_OPT_NO_DRAIN,
    QI_OPT_RENAME,
    QI_OPT_VMSTATE,
    QI_OPT_ALL,
    QI_OPT_STREAM,
    QI_OPT_COMMIT,
};

/* --output=human|json */
enum qi_output { QI_OUTPUT_HUMAN, QI_OUTPUT_JSON };

/* Parses an --output argument; prints qemu-img's message on failure. */
int qi_parse_output(const char *arg, enum qi_output *out);

/*
 * Adds the QSNAP_OPEN_* flags for a -t cache mode (none, writeback,
 * writethrough, directsync, unsafe) to *FLAGS.  Returns 0, or -EINVAL for
 * an unknown mode (nothing printed: the messages differ by command).
 */
int qi_parse_cache(const char *mode, unsigned *flags);

/* ------------------------------------------------------------ numbers */

/*
 * Parses a size the way qemu-img does: decimal (optionally with a
 * fraction) or 0x-hex, then an optional suffix b/B (bytes), k/K, M, G, T,
 * P, E (powers of 1024, either case).
 * Returns 0, -EINVAL (malformed) or -ERANGE (over 2^64 - 1).
 */
int qi_parse_size(const char *str, uint64_t *out);

/* Prints qemu-img's two-line hint after an invalid size for WHAT. */
void qi_size_error(const char *what);

/*
 * Prints qemu-img's message for a malformed size option KEY ("size",
 * "cluster_size"), prefixed with FILE unless it is NULL.
 */
void qi_size_param_error(const char *file, const char *key);

/*
 * qi_parse_size() for a command-line number named WHAT ("image size"),
 * limited to 0..INT64_MAX; prints qemu-img's messages on failure.
 */
int qi_cvtnum(const char *what, const char *str, uint64_t *out);

/* qi_cvtnum() with an upper limit of MAX. */
int qi_cvtnum_max(const char *what, const char *str, uint64_t max,
                  uint64_t *out);

/* Parses an unsigned integer (decimal, 0x-hex or 0-octal), whole string. */
int qi_parse_uint(const char *str, uint64_t *out);

/* Formats like qemu's size_to_str(): "1 GiB", "196 KiB", "1.5 MiB". */
void qi_human_size(uint64_t bytes, char *buf, size_t len);

/* ------------------------------------------------------------ -o lists */

struct qi_opt {
    char *key;
    char *value; /* "on" when the list gave only the key */
};

struct qi_opts {
    struct qi_opt *v;
    size_t n;
    size_t cap;
};

/*
 * Appends the options of a "key=value,key=value" list (",," stands for a
 * literal comma).  Returns 0 or -EINVAL for an invalid list (empty item),
 * -ENOMEM.
 */
int qi_opts_parse(struct qi_opts *opts, const char *str);

/* The value of the last KEY, or NULL. */
const char *qi_opts_get(const struct qi_opts *opts, const char *key);

/* True if the list asks for help ("help" or "?"). */
bool qi_opts_has_help(const struct qi_opts *opts);

void qi_opts_free(struct qi_opts *opts);

/* qi_opts_parse() for an -o argument; prints "Invalid option list". */
int qi_opts_add_arg(struct qi_opts *opts, const char *arg);

/*
 * Everything an image-creating command (create, convert) learned from
 * -f/-O, -o, -b and -F.  Strings point into `list` or into argv.
 */
struct qi_create_spec {
    struct qsnap_create_opts opts;
    struct qi_opts list;
    const char *fmt_name;    /* "qcow2" or "raw" */
    const char *compat;      /* as given, NULL if not set */
    const char *prealloc;    /* as given, NULL if not set */
    const char *compression; /* as given, NULL if not set */
    const char *size_str;    /* -o size=, NULL if not set */
    bool extended_l2;
};

/*
 * Initialises SPEC for format FMT_NAME ("qcow2" or "raw"; prints "Unknown
 * file format", naming FILENAME unless it is NULL, and returns -EINVAL for
 * anything else).  Takes over the -o options collected in LIST (may be
 * NULL); SPEC owns them even on failure.
 */
int qi_create_spec_init(struct qi_create_spec *spec, const char *fmt_name,
                        const char *filename, struct qi_opts *list);

/*
 * Interprets the collected -o options, as qemu-img does before it prints
 * its "Formatting" line: unknown keys and malformed numbers or booleans
 * fail here, with a message naming FILENAME.  Returns 0 or -EINVAL.
 */
int qi_create_spec_parse(struct qi_create_spec *spec, const char *filename);

/*
 * The checks qemu-img makes after its "Formatting" line: enumerated values
 * (compat, preallocation, compression_type) and unsupported features.
 * Returns 0 or -EINVAL after printing the message.
 */
int qi_create_spec_check(struct qi_create_spec *spec, const char *filename);

/* Prints the options of -o help for the spec's format. */
void qi_create_spec_help(const struct qi_create_spec *spec);

void qi_create_spec_free(struct qi_create_spec *spec);

/* ------------------------------------------------------------ images */

/* "qcow2"/"raw" -> QSNAP_FMT_*, NULL -> AUTO.  -1 if unknown. */
int qi_format_from_name(const char *name);

/*
 * Opens FILENAME as FMT_NAME (NULL to probe) with QSNAP_OPEN_* FLAGS,
 * printing qemu-img's "Could not open" message on failure.
 * Returns 0 or a negative errno.
 */
int qi_open(const char *filename, const char *fmt_name, unsigned flags,
            qsnap_image **img);

/* Closes IMG; prints an error naming FILENAME if the final flush fails. */
int qi_close(qsnap_image *img, const char *filename);

/* Fills INFO (struct_size set here).  Prints and fails on error. */
int qi_get_info(qsnap_image *img, struct qsnap_info *info);

/* True if the two paths name one file (device and inode). */
bool qi_same_file(const char *a, const char *b);

/*
 * A library message without its leading "PATH: " (library messages name
 * the file; some qemu-img messages put the name elsewhere).
 */
const char *qi_strip_path(const char *msg, const char *path);

/* Page-aligned buffer (for O_DIRECT); free() it.  NULL on failure. */
void *qi_alloc_buf(size_t len);

/* True if LEN bytes at BUF are all zero. */
bool qi_is_zero(const void *buf, size_t len);

/* Seconds since an arbitrary fixed point (monotonic clock). */
double qi_now(void);

/* ------------------------------------------------------------ chains */

/*
 * A backing chain opened image by image (each without its backing file),
 * to describe ranges the way QEMU's block layer does for qemu-img map and
 * compare: which image decides a range (depth), whether it allocates it,
 * and, as QEMU does for qcow2 images whose clusters look preallocated,
 * whether the host file has a hole there (read as zeros).
 */
#define QI_MAX_CHAIN 256

/* Status bits, with the values of QEMU's BDRV_BLOCK_* flags. */
enum {
    QI_ST_DATA = 0x01,      /* reads come from stored data */
    QI_ST_ZERO = 0x02,      /* reads as zeros */
    QI_ST_OFFSET = 0x04,    /* `offset` is valid */
    QI_ST_ALLOCATED = 0x10, /* the image at `depth` decides the content */
    QI_ST_EOF = 0x20,       /* the range ends at the end of the image */
    QI_ST_RECURSE = 0x40,   /* the host file was consulted */
};

struct qi_status {
    uint64_t len;         /* bytes with this status */
    uint64_t offset;      /* host offset in `filename` */
    int depth;            /* 0: the image itself, 1: its backing file... */
    unsigned flags;       /* QI_ST_* */
    bool past_backing;    /* zeros past the end of a shorter backing file */
    const char *filename; /* the file `offset` is in (NULL without one) */
};

struct qi_chain;

/*
 * Opens FILENAME (format FMT_NAME, NULL to probe) and its backing files
 * with QSNAP_OPEN_* FLAGS; prints the error and returns < 0 on failure.
 */
int qi_chain_open(const char *filename, const char *fmt_name, unsigned flags,
                  struct qi_chain **out);
void qi_chain_close(struct qi_chain *ch);

/* The virtual size of the top image. */
uint64_t qi_chain_size(const struct qi_chain *ch);

/* Describes [offset, offset + len) (st->len may come out shorter). */
int qi_chain_status(struct qi_chain *ch, uint64_t offset, uint64_t len,
                    struct qi_status *st);

/* One image of an open chain. */
struct qi_layer {
    const char *path;              /* as opened (backing paths resolved) */
    qsnap_image *img;              /* opened without its backing file */
    const struct qsnap_info *info; /* its qsnap_get_info() */
};

/* The number of images in the chain (the top one included). */
int qi_chain_length(const struct qi_chain *ch);

/* Fills *OUT for the image at DEPTH (0: the top image). */
void qi_chain_layer(const struct qi_chain *ch, int depth, struct qi_layer *out);

/*
 * qsnap_chain_list() for IMG (opened with its backing files) from
 * FILENAME; prints the error.  Free *LIST with free().
 * Returns 0 or a negative errno.
 */
int qi_chain_list(qsnap_image *img, const char *filename,
                  struct qsnap_layer_info **list, uint32_t *n);

/* How qi_chain_find() takes a name. */
enum qi_find {
    /*
     * qemu-img's rule for "commit -b": NAME, if relative, is resolved
     * against the directory of each layer in turn and compared with that
     * layer's backing file.  The top never matches.
     */
    QI_FIND_BACKING,
    /*
     * A path relative to the current directory to any layer, the top
     * included, or exactly the backing name a layer records in its
     * header, which names the layer below it.
     */
    QI_FIND_PATH,
};

/*
 * The depth of the layer of LIST (N layers from qi_chain_list()) that
 * NAME names, comparing files by device and inode; -1 if none.
 */
int qi_chain_find(const struct qsnap_layer_info *list, uint32_t n,
                  const char *name, enum qi_find how);

/*
 * For commands with qemu-img's "-b base" (commit, stream): finds BASE in
 * the chain of IMG, opened from FILENAME with its backing files, and
 * copies that layer's path (as the library opened it) to PATH; with BASE
 * NULL, checks that IMG has a backing file and sets PATH to "".  Prints
 * qemu-img's messages ("Did not find ...", "Image does not have a backing
 * file").  Returns 0 or -1.
 */
int qi_find_base(qsnap_image *img, const char *filename, const char *base,
                 char *path, size_t len);

/* ------------------------------------------------------------ snapshots */

/* The handle's message for a failed call ERR, or the errno text. */
const char *qi_errmsg(const qsnap_image *img, int err);

/*
 * Snapshot options as "qemu-img snapshot -c" records them: the current
 * time, VM clock 0 and instruction count 0.
 */
void qi_snapshot_opts_init(struct qsnap_snapshot_opts *opts);

/*
 * qsnap_snapshot_list() for IMG opened from FILENAME; prints the error.
 * Returns 0 or a negative errno.
 */
int qi_snapshot_list(qsnap_image *img, const char *filename,
                     struct qsnap_snapshot_info **list, uint32_t *n);

/*
 * The index of the first of the N snapshots of LIST whose ID is ID and
 * whose name is NAME (either may be NULL: not compared); -1 if none.
 */
int qi_snapshot_find(const struct qsnap_snapshot_info *list, uint32_t n,
                     const char *id, const char *name);

/* As qi_snapshot_find(): an ID first, then a name (qemu's rule). */
int qi_snapshot_find_id_or_name(const struct qsnap_snapshot_info *list,
                                uint32_t n, const char *id_or_name);

/* "YYYY-MM-DD HH:MM:SS" (local time) and "HH:MM:SS.mmm" as qemu prints. */
void qi_snapshot_date(const struct qsnap_snapshot_info *sn, char *buf,
                      size_t len);
void qi_snapshot_clock(const struct qsnap_snapshot_info *sn, char *buf,
                       size_t len);

/* qemu-img's snapshot table: the header line, and one line per snapshot. */
void qi_snapshot_print_header(void);
void qi_snapshot_print(const struct qsnap_snapshot_info *sn);

/* ------------------------------------------------------------ progress */

/*
 * The "-p" progress indicator, "    (42.00/100%)\r" on stderr.  Thread-
 * safe.  init(enabled, min_skip) resets; print(delta, max) adds
 * delta/100*max percent (or sets delta percent when max is 0); end()
 * finishes the line.
 */
void qi_progress_init(bool enabled, float min_skip);
void qi_progress_print(float delta, int max);
void qi_progress_end(void);

/*
 * A qsnap_progress_fn for library calls that report (done, total): sets
 * the indicator to done/total.  OPAQUE is unused.
 */
void qi_progress_cb(void *opaque, uint64_t done, uint64_t total);

/*
 * Around one long library call: qi_progress_start() shows 0% when
 * ENABLED; qi_progress_done() shows 100% if the call succeeded (OK) and
 * finishes the line.
 */
void qi_progress_start(bool enabled);
void qi_progress_done(bool ok);

#endif /* QSNAP_IMG_H */
