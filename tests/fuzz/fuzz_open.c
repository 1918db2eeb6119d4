/*
 * fuzz_open.c - fuzz target: the input is a whole image file.
 *
 *   1. Opened read-only, backing files allowed (the scratch directory holds
 *      a small base.qcow2, the name tests/images/overlay.qcow2 refers to):
 *      info, snapshot and chain lists, block status over the whole disk,
 *      check without repair.
 *   2. Opened with QSNAP_OPEN_CHECK, as `check` does: check as it is.
 *   3. A copy opened read-write, which repairs a dirty image and clears
 *      the autoclear bits: the same walk, then check with repair.  When
 *      the repair leaves no corruption the image must stay usable: a write
 *      reads back as written, a snapshot can be made and deleted, and the
 *      check still finds no corruption afterwards.  A copy that refuses a
 *      read-write open is opened in check mode and repaired instead.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"

static char img_path[PATH_MAX];
static char rw_path[PATH_MAX];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fz_path("img.qcow2", img_path, sizeof(img_path));
    fz_path("rw.qcow2", rw_path, sizeof(rw_path));
    fz_make_base();
    return 0;
}

/*
 * Writes, snapshots and deletes on an image the repair left consistent.
 * Check passed its metadata, so a snapshot (which walks all of it) must
 * not find it corrupt; and when everything succeeded, the check must
 * still pass.
 */
static void use_repaired(qsnap_image *img)
{
    struct qsnap_info info;
    uint8_t out[4096];
    uint8_t in[4096];
    bool all_ok = true;
    int rc;

    memset(&info, 0, sizeof(info));
    info.struct_size = sizeof(info);
    if (qsnap_get_info(img, &info) < 0 || info.virtual_size < sizeof(out)) {
        return;
    }
    for (size_t i = 0; i < sizeof(out); i++) {
        out[i] = (uint8_t)(i * 7 + 3);
    }
    const uint64_t offs[2] = {0, (info.virtual_size - sizeof(out)) / 2 + 1};
    for (int i = 0; i < 2; i++) {
        if (qsnap_pwrite(img, out, sizeof(out), offs[i]) < 0) {
            fz_touch_errmsg(img);
            fz_trace("write at %" PRIu64 ": %s", offs[i], qsnap_errmsg(img));
            all_ok = false;
            continue;
        }
        if (qsnap_pread(img, in, sizeof(in), offs[i]) == 0 &&
            memcmp(in, out, sizeof(in)) != 0) {
            fz_bug("data written at %" PRIu64 " reads back differently",
                   offs[i]);
        }
    }
    rc = qsnap_snapshot_create(img, "fuzz-snap", NULL);
    if (rc == -EUCLEAN && all_ok) {
        fz_bug("check passed, but a snapshot finds corrupt metadata: %s",
               qsnap_errmsg(img));
    }
    if (rc == 0) {
        if (qsnap_snapshot_delete(img, "fuzz-snap") < 0) {
            fz_touch_errmsg(img);
            fz_trace("snapshot delete: %s", qsnap_errmsg(img));
            all_ok = false;
        }
    } else {
        fz_touch_errmsg(img);
        fz_trace("snapshot create: %s", qsnap_errmsg(img));
        all_ok = false;
    }
    if (qsnap_flush(img) < 0) {
        fz_touch_errmsg(img);
        all_ok = false;
    }
    if (all_ok && fz_check(img, 0) > 0) {
        fz_bug("writes to an image that checked clean left corruptions");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const int fds = fz_fd_count();
    struct fz_budget b = {.bytes = 0, .calls = 1u << 14};
    qsnap_image *img;

    fz_put(img_path, data, size);
    if ((img = fz_open(img_path, 0, 0)) != NULL) {
        fz_walk_meta(img, &b);
        fz_check(img, 0);
        fz_close(img);
    }
    if ((img = fz_open(img_path, QSNAP_OPEN_CHECK | QSNAP_OPEN_NO_BACKING,
                       0)) != NULL) {
        fz_check(img, 0);
        fz_close(img);
    }

    fz_put(rw_path, data, size);
    b.calls = 1u << 14;
    if ((img = fz_open(rw_path, QSNAP_OPEN_RDWR, 0)) != NULL) {
        fz_walk_meta(img, &b);
        if (fz_check(img, QSNAP_CHECK_REPAIR_ALL) == 0) {
            use_repaired(img);
        }
        fz_close(img);
    } else if ((img = fz_open(rw_path,
                              QSNAP_OPEN_RDWR | QSNAP_OPEN_CHECK |
                                  QSNAP_OPEN_NO_BACKING,
                              0)) != NULL) {
        fz_check(img, QSNAP_CHECK_REPAIR_ALL);
        fz_close(img);
    }
    fz_fd_check(fds);
    return 0;
}
