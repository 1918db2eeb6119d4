/*
 * fuzz_util.h - helpers shared by the libFuzzer harnesses in tests/fuzz.
 *
 * Each harness is one fuzz_*.c file defining LLVMFuzzerInitialize() and
 * LLVMFuzzerTestOneInput().  It is linked either with libFuzzer (run.sh,
 * clang) or with replay_main.c (a plain program built by `make check`).
 *
 * Inputs become files in a private scratch directory, made on first use
 * under $QSNAP_FUZZ_DIR, /dev/shm or $TMPDIR (in that order), so no input
 * costs disk I/O.  The directory is removed at exit.
 *
 * Every walk is bounded: a budget caps the bytes read and the calls made
 * for one input, whatever sizes the image claims.  A broken promise of the
 * public API (a block status of length 0, a "zero" range that reads
 * non-zero, an unterminated message, a leaked file descriptor) aborts, so
 * the fuzzer reports it as a crash.
 */
#ifndef FUZZ_UTIL_H
#define FUZZ_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qsnap.h"

/* The libFuzzer entry points (defined by each harness). */
int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Size of one read request. */
#define FZ_STEP (64u * 1024u)

/* Limits for the work done on one input. */
struct fz_budget {
    uint64_t bytes; /* bytes still allowed to be read */
    uint64_t calls; /* block status and read calls still allowed */
};

/* Reports a failure of the harness's own setup and aborts. */
void fz_die(const char *fmt, ...)
    __attribute__((format(printf, 1, 2), noreturn));

/* Reports a broken API promise and aborts (the fuzzer sees a crash). */
void fz_bug(const char *fmt, ...)
    __attribute__((format(printf, 1, 2), noreturn));

/* With $QSNAP_FUZZ_TRACE set, prints one line of what a walk did. */
void fz_trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Writes DIR/name into buf (PATH_MAX bytes). */
void fz_path(const char *name, char *buf, size_t len);

/* Replaces the file at path with len bytes of data (aborts on failure). */
void fz_put(const char *path, const void *data, size_t len);

/* Reads a whole file into a new buffer; returns 0 or -errno. */
int fz_slurp(const char *path, uint8_t **data, size_t *len);

/*
 * Writes a seed file into $QSNAP_FUZZ_SEED_OUT, if that is set: run.sh
 * asks the harnesses for seeds they can make better than a script can.
 */
void fz_seed_out(const char *name, const void *data, size_t len);

/* Counts this process's open file descriptors. */
int fz_fd_count(void);

/* Aborts if the count of open descriptors differs from `before`. */
void fz_fd_check(int before);

/*
 * Opens path as qcow2 with the given QSNAP_OPEN_* flags and cache size
 * (0: the default); NULL on failure (the message is checked for
 * termination and dropped).
 */
qsnap_image *fz_open(const char *path, unsigned flags, uint64_t cache_size);

/*
 * Makes base.qcow2 in the scratch directory: 4 MiB with some data, the
 * backing file that tests/images/overlay.qcow2 names.
 */
void fz_make_base(void);

/* Closes img (a failure is only traced). */
void fz_close(qsnap_image *img);

/* Checks that the handle's last message is a terminated string. */
void fz_touch_errmsg(const qsnap_image *img);

/*
 * Metadata walks: info, snapshot list, chain list, and block status over
 * the whole disk (as far as the budget allows).
 */
void fz_walk_meta(qsnap_image *img, struct fz_budget *b);

/* qsnap_check with the given flags; returns the corruptions found or -1. */
int64_t fz_check(qsnap_image *img, unsigned flags);

/* Reads the active disk in FZ_STEP requests, skipping most of the ranges
 * block status reports as not holding data. */
void fz_read_image(qsnap_image *img, struct fz_budget *b);

/* As fz_read_image, for a snapshot view. */
void fz_read_view(qsnap_view *view, struct fz_budget *b);

/*
 * Opens the VM state of snapshot id_or_name and reads all of it: the raw
 * area, and, for a section container, every section.  Returns the result
 * of qsnap_vmstate_open.
 */
int fz_walk_vmstate(qsnap_image *img, const char *id_or_name,
                    struct fz_budget *b);

/* For every snapshot: open a view and read it (if views), and walk its VM
 * state (if vmstate and the snapshot records any). */
void fz_walk_snapshots(qsnap_image *img, bool views, bool vmstate,
                       struct fz_budget *b);

#endif /* FUZZ_UTIL_H */
