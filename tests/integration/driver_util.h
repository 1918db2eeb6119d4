/*
 * driver_util.h - what the test drivers (qsnap-tool, snap-driver,
 * chain-driver) share: messages, sizes and formats on the command line,
 * opening and closing images with the library's message on failure.
 *
 * Each driver defines drv_prog, the name its messages start with.
 */
#ifndef DRIVER_UTIL_H
#define DRIVER_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <qsnap.h>

extern const char drv_prog[];

/* "PROG: message" and a newline on stderr. */
void msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* malloc that exits (status 1) when out of memory. */
void *xmalloc(size_t len);

/* Parses "123", "0x1f", "64k", "2M", "1G", "64T" (binary multiples). */
bool parse_size(const char *s, uint64_t *out);

/* parse_size, or a message naming WHAT and exit status 2. */
uint64_t need_size(const char *what, const char *s);

/* "auto", "qcow2" or "raw" as QSNAP_FMT_*; exit status 2 otherwise. */
int parse_format(const char *s);

/* Opens an image (and its chain); on failure prints the library's own
 * message, which is expected to name the file, and sets *IMG to NULL. */
int open_image(const char *path, unsigned flags, int format,
               uint64_t cache_size, qsnap_image **img);

/* "WHAT failed (error): the library's message". */
void report(const qsnap_image *img, const char *what, int rc);

/* qsnap_close, with a message when it fails. */
int close_image(qsnap_image *img);

#endif /* DRIVER_UTIL_H */
