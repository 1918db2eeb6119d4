/*
 * unit_util.h - helpers shared by the unit suites: an in-memory qs_io
 * back-end and small utilities to make images and fill buffers.
 *
 * Memory back-end ("memio")
 *   A growable byte array.  Reads past the end return zeros, punch zeroes
 *   the range (size unchanged), seek reports everything as data.  Every
 *   call can be recorded in an operation log, so tests can see the order
 *   in which the library writes and flushes.  The back-end is reference
 *   counted: qs_io_close() drops one reference, memio_ref() adds one, so a
 *   test can keep the bytes after the image that owned the io is closed.
 *
 * The fault-injecting wrapper the suites put over memio is the library's
 * own (qs_fault.h), the one QSNAP_FAULT turns on for whole programs.
 */
#ifndef UNIT_UTIL_H
#define UNIT_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qs_fault.h"
#include "qs_int.h"

#define UNIT_IMAGE_NAME "unit-image.qcow2"

/* ---------------------------------------------------------------- memio */

enum unit_op {
    UNIT_OP_READ,
    UNIT_OP_WRITE,
    UNIT_OP_FLUSH,
    UNIT_OP_TRUNCATE,
    UNIT_OP_PUNCH,
    UNIT_OP_FALLOC,
    UNIT_OP_COUNT
};

struct unit_op_rec {
    enum unit_op op;
    uint64_t off; /* TRUNCATE: the new size */
    uint64_t len;
};

/* A new empty memory file, or NULL if out of memory. */
qs_io *memio_new(void);
/* A new memory file holding a copy of `len` bytes. */
qs_io *memio_new_copy(const void *data, size_t len);
/* Loads a host file into a new memory file; 0 or -errno. */
int memio_load_file(const char *path, qs_io **out);
/* Writes the memory file's bytes to a host file; 0 or -errno. */
int memio_save_file(qs_io *io, const char *path);
/* A new memory file with the same bytes (the log is not copied). */
qs_io *memio_clone(qs_io *io);
/* Adds a reference; qs_io_close() drops one. */
qs_io *memio_ref(qs_io *io);
unsigned memio_refs(qs_io *io);
/* The live bytes and their count (valid until the next write). */
uint8_t *memio_data(qs_io *io, size_t *len);
uint64_t memio_size(qs_io *io);
/* Writes that would end past `max` fail with -ENOSPC (0: no limit). */
void memio_set_max_size(qs_io *io, uint64_t max);

/* Clears the operation log and starts recording. */
void memio_log_start(qs_io *io);
void memio_log_stop(qs_io *io);
size_t memio_log_count(qs_io *io);
/* Record i (0-based), or NULL past the end. */
const struct unit_op_rec *memio_log_get(qs_io *io, size_t i);
/* Index of the first record of `op` overlapping [off, off+len) at or after
 * `from`, or -1. */
long memio_log_find(qs_io *io, size_t from, enum unit_op op, uint64_t off,
                    uint64_t len);

/* Fault wrapper: qs_fault.h (qs_faultio_*), part of the library. */

/* ---------------------------------------------------------------- misc */

/* Deterministic pseudo-random numbers (xorshift64*); state must be != 0. */
uint64_t unit_rand(uint64_t *state);
/* Fills buf with bytes derived from seed and each byte's offset `base`+i,
 * so any sub-range can be regenerated. */
void unit_fill(uint8_t *buf, size_t len, uint64_t seed, uint64_t base);
/* True if all bytes are `v`. */
bool unit_all(const uint8_t *buf, size_t len, uint8_t v);

/* A fresh temporary directory (free with unit_rmtree); NULL on error. */
char *unit_tmpdir(void);
/* Removes the files directly inside `dir`, then `dir`; frees `dir`. */
void unit_rmtree(char *dir);

/*
 * Creates an image with qsnap_create() in a temporary directory and
 * returns it loaded into a new memory file.  0 or -errno (message in err).
 */
int unit_make_image(const struct qsnap_create_opts *o, qs_io **out, char *err,
                    size_t errlen);
/* Same, with only size, cluster size, version and refcount bits given. */
int unit_make_simple(uint64_t size, uint32_t cluster_size, int version,
                     int refcount_bits, qs_io **out);
/* Opens `io` (ownership passes to the image) as UNIT_IMAGE_NAME. */
int unit_open(qs_io *io, unsigned flags, qsnap_image **out, char *err,
              size_t errlen);
/* Runs qsnap_check; 0 or -errno, *res filled. */
int unit_check(qsnap_image *img, struct qsnap_check_result *res);

#endif /* UNIT_UTIL_H */
