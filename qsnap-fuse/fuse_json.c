/*
 * fuse_json.c - the JSON files of the tree: info.json and each snapshot's
 * info.json.
 *
 * info.json is the document `qsnap-img info --output=json` prints, which
 * in turn is qemu-img's, built by the same code (qsnap-img/info_json.c).
 * A snapshot's info.json is a plain object in the order written.
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

#include "info_json.h"
#include "qsnap_fuse.h"

int qf_json_image_info(struct qf_fs *fs, char **out, size_t *len)
{
    struct qsnap_info *in = calloc(1, sizeof(*in));
    struct qsnap_snapshot_info *snaps = NULL;
    uint32_t n_snaps = 0;
    int ret;

    if (!in) {
        return -ENOMEM;
    }
    in->struct_size = sizeof(*in);
    ret = qsnap_get_info(fs->img, in);
    if (ret == 0 && in->nb_snapshots) {
        ret = qsnap_snapshot_list(fs->img, &snaps, &n_snaps);
    }
    if (ret == 0) {
        qi_info_qemu_sizes(in);
        struct qi_json *obj = qi_info_json(fs->image_path, in, snaps, n_snaps);
        ret = obj ? qi_json_text(obj, out, len) : -ENOMEM;
        qi_json_free(obj);
    }
    if (snaps) {
        qsnap_snapshot_list_free(snaps, n_snaps);
    }
    free(in);
    return ret;
}

int qf_json_snap_info(const struct qf_snap *sn, char **out, size_t *len)
{
    struct qi_json *o = qi_json_new_ordered();
    char date[64] = "";
    struct tm tm;
    const time_t t = (time_t)sn->date_sec;

    if (gmtime_r(&t, &tm)) {
        strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", &tm);
    }
    qi_json_str(o, "id", sn->id);
    qi_json_str(o, "name", sn->name);
    qi_json_uint(o, "date-sec", sn->date_sec);
    qi_json_uint(o, "date-nsec", sn->date_nsec);
    qi_json_str(o, "date", date);
    qi_json_uint(o, "vm-clock-sec", sn->vm_clock_ns / 1000000000u);
    qi_json_uint(o, "vm-clock-nsec", sn->vm_clock_ns % 1000000000u);
    qi_json_uint(o, "vm-state-size", sn->vm_state_size);
    qi_json_uint(o, "disk-size", sn->disk_size);
    if (sn->icount != -1) {
        qi_json_int(o, "icount", sn->icount);
    }
    const int ret = o ? qi_json_text(o, out, len) : -ENOMEM;
    qi_json_free(o);
    return ret;
}
