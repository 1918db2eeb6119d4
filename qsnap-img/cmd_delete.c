/*
 * cmd_delete.c - "qsnap-img delete": delete internal snapshots.
 *
 *   delete [-f fmt] [-q] filename name
 *   delete [-f fmt] [-q] --all filename
 *
 * NAME is an ID or a name (an ID is matched first, as for snapshot -a).
 * With --all every snapshot is deleted, in table order.  Each deletion is
 * reported on its own line unless -q is given; deleting stops at the
 * first failure.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "qsnap_img.h"

/* Deletes snapshot SN (by its ID) and reports it. */
static int delete_one(qsnap_image *img, const char *filename,
                      const struct qsnap_snapshot_info *sn, const char *asked,
                      bool quiet)
{
    const int ret = qsnap_snapshot_delete(img, sn->id);
    if (ret < 0) {
        qi_error("Could not delete snapshot '%s': %s", asked,
                 qi_strip_path(qi_errmsg(img, ret), filename));
        return ret;
    }
    if (!quiet) {
        printf("Deleted snapshot '%s' (ID %s)\n", sn->name, sn->id);
    }
    return 0;
}

int qi_cmd_delete(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"all", no_argument, NULL, QI_OPT_ALL},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    bool all = false;
    bool quiet = false;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "f:hq", long_opts,
                            NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'h':
            qi_help();
        case 'q':
            quiet = true;
            break;
        case QI_OPT_ALL:
            all = true;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (all && optind != argc - 1) {
        return qi_usage_error("Expecting one image file name with --all");
    }
    if (!all && optind != argc - 2) {
        return qi_usage_error("Expecting one image file name and a snapshot "
                              "name");
    }
    const char *filename = argv[optind];
    const char *name = all ? NULL : argv[optind + 1];

    qsnap_image *img;
    struct qsnap_snapshot_info *list;
    uint32_t n;
    if (qi_open(filename, fmt, QSNAP_OPEN_RDWR, &img) < 0) {
        return 1;
    }
    int ret = qi_snapshot_list(img, filename, &list, &n);
    if (ret == 0 && all) {
        for (uint32_t i = 0; i < n && ret == 0; i++) {
            ret = delete_one(img, filename, &list[i], list[i].name, quiet);
        }
    } else if (ret == 0) {
        const int i = qi_snapshot_find_id_or_name(list, n, name);
        if (i < 0) {
            qi_error("Could not delete snapshot '%s': snapshot not found",
                     name);
            ret = -1;
        } else {
            ret = delete_one(img, filename, &list[i], name, quiet);
        }
    }
    if (list) {
        qsnap_snapshot_list_free(list, n);
    }
    if (qi_close(img, filename) < 0) {
        ret = -1;
    }
    return ret < 0 ? 1 : 0;
}
