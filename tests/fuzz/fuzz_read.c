/*
 * fuzz_read.c - fuzz target: the input is a whole image file, opened
 * read-only, whose guest data is read: the active disk, the disk of every
 * internal snapshot through a view, and the VM state of every snapshot
 * that has one (raw bytes and, for a section container, every section).
 *
 * Reads go in 64 KiB requests (split into uneven iovecs), with at most
 * 64 MiB read per input and 16 MiB per disk.  Ranges block status reports
 * as holding no data are read only for the first few (and must read as
 * zeros where it says so); the rest are skipped.  Odd-sized inputs get a
 * small metadata cache, so the caches evict.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <limits.h>

#include "fuzz_util.h"

#define READ_BUDGET (64ull << 20)
#define SMALL_CACHE (64u * 1024u)

static char img_path[PATH_MAX];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fz_path("img.qcow2", img_path, sizeof(img_path));
    fz_make_base();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const int fds = fz_fd_count();
    struct fz_budget b = {.bytes = READ_BUDGET, .calls = 1u << 16};
    qsnap_image *img;

    fz_put(img_path, data, size);
    img = fz_open(img_path, 0, size % 2 ? SMALL_CACHE : 0);
    if (img) {
        fz_read_image(img, &b);
        fz_walk_snapshots(img, true, true, &b);
        fz_close(img);
    }
    fz_fd_check(fds);
    return 0;
}
