/*
 * cmd_snapshot.c - "qsnap-img snapshot": list, create, apply, delete and
 * rename internal snapshots.
 *
 *   snapshot [-f fmt] [-q] [-U] [--output=human|json]
 *            [-l | -c name [--vmstate dir] | -a name | -d name] filename
 *   snapshot [-f fmt] [-q] --rename old new filename
 *
 * -l, -c, -a and -d behave as qemu-img's: the same table, messages and
 * exit status.  -d matches a snapshot by name only and -a by ID first,
 * then name, as qemu-img does.  Snapshots made with -c record the time,
 * a VM clock of zero and an instruction count of zero, as qemu-img's do.
 * One difference: a name that is already taken is refused (qemu-img would
 * add a second snapshot with the same name).
 *
 * Extensions: --output=json lists the snapshots as the "snapshots" array
 * of qemu-img info --output=json; --rename renames one (by ID or name);
 * -c with --vmstate DIR stores the regular files of DIR as the sections
 * of the new snapshot's VM state (see cmd_vmstate.c).
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "qsnap_img.h"

enum action { NONE, LIST, CREATE, APPLY, DELETE, RENAME };

static int do_list(qsnap_image *img, const char *filename,
                   enum qi_output output)
{
    struct qsnap_snapshot_info *list;
    uint32_t n;

    if (qi_snapshot_list(img, filename, &list, &n) < 0) {
        return -1;
    }
    int ret = 0;
    if (output == QI_OUTPUT_JSON) {
        struct qi_json *root = qi_json_new();
        struct qi_json *arr = root ? qi_json_array(root, "snapshots") : NULL;
        for (uint32_t i = 0; arr && i < n; i++) {
            qi_snapshot_json(arr, &list[i]);
        }
        if (qi_json_failed(root) || !arr) {
            qi_error("%s", qsnap_strerror(-ENOMEM));
            ret = -1;
        } else {
            qi_json_print(stdout, arr);
        }
        qi_json_free(root);
    } else if (n > 0) {
        /* qemu-img prints nothing at all for an image without snapshots. */
        printf("Snapshot list:\n");
        qi_snapshot_print_header();
        for (uint32_t i = 0; i < n; i++) {
            qi_snapshot_print(&list[i]);
        }
    }
    qsnap_snapshot_list_free(list, n);
    return ret;
}

static int do_create(qsnap_image *img, const char *filename, const char *name,
                     const char *vmstate_dir)
{
    if (vmstate_dir) {
        return qi_vmstate_store(img, filename, name, vmstate_dir);
    }
    struct qsnap_snapshot_opts opts;
    qi_snapshot_opts_init(&opts);
    const int ret = qsnap_snapshot_create(img, name, &opts);
    if (ret < 0) {
        qi_error("Could not create snapshot '%s': %d (%s)", name, ret,
                 qsnap_strerror(ret));
    }
    return ret;
}

static int do_apply(qsnap_image *img, const char *filename, const char *name)
{
    const int ret = qsnap_snapshot_apply(img, name);
    if (ret < 0) {
        qi_error("Could not apply snapshot '%s': Failed to load snapshot: %s",
                 name,
                 ret == -ENOENT ? qsnap_strerror(ret)
                                : qi_strip_path(qi_errmsg(img, ret), filename));
    }
    return ret;
}

static int do_delete(qsnap_image *img, const char *filename, const char *name)
{
    struct qsnap_snapshot_info *list;
    uint32_t n;

    if (qi_snapshot_list(img, filename, &list, &n) < 0) {
        return -1;
    }
    /* As qemu-img, -d looks for a name only; delete by the ID found. */
    const int i = qi_snapshot_find(list, n, NULL, name);
    int ret = -ENOENT;
    if (i < 0) {
        qi_error("Could not delete snapshot '%s': snapshot not found", name);
    } else {
        ret = qsnap_snapshot_delete(img, list[i].id);
        if (ret < 0) {
            qi_error("Could not delete snapshot '%s': %s", name,
                     qi_strip_path(qi_errmsg(img, ret), filename));
        }
    }
    qsnap_snapshot_list_free(list, n);
    return ret;
}

static int do_rename(qsnap_image *img, const char *filename, const char *old,
                     const char *new_name)
{
    const int ret = qsnap_snapshot_rename(img, old, new_name);
    if (ret == -ENOENT) {
        qi_error("Could not rename snapshot '%s': snapshot not found", old);
    } else if (ret < 0) {
        qi_error("Could not rename snapshot '%s' to '%s': %s", old, new_name,
                 qi_strip_path(qi_errmsg(img, ret), filename));
    }
    return ret;
}

int qi_cmd_snapshot(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"force-share", no_argument, NULL, 'U'},
        {"output", required_argument, NULL, QI_OPT_OUTPUT},
        {"rename", required_argument, NULL, QI_OPT_RENAME},
        {"vmstate", required_argument, NULL, QI_OPT_VMSTATE},
        {NULL, 0, NULL, 0},
    };
    enum action action = NONE;
    enum qi_output output = QI_OUTPUT_HUMAN;
    const char *fmt = NULL;
    const char *name = NULL;
    const char *vmstate_dir = NULL;
    unsigned flags = QSNAP_OPEN_RDWR;
    bool force_share = false;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "la:c:d:f:hqU",
                            long_opts, NULL)) != -1) {
        enum action next = NONE;
        switch (c) {
        case 'l':
            next = LIST;
            break;
        case 'c':
            next = CREATE;
            break;
        case 'a':
            next = APPLY;
            break;
        case 'd':
            next = DELETE;
            break;
        case QI_OPT_RENAME:
            next = RENAME;
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'h':
            qi_help();
        case 'q':
            /* Nothing but errors is printed anyway (-l still lists). */
            break;
        case 'U':
            force_share = true;
            break;
        case QI_OPT_OUTPUT:
            if (qi_parse_output(optarg, &output) < 0) {
                return 1;
            }
            break;
        case QI_OPT_VMSTATE:
            vmstate_dir = optarg;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
        if (next != NONE) {
            if (action != NONE) {
                return qi_usage_error("Cannot mix '-l', '-a', '-c', '-d'");
            }
            action = next;
            name = next == LIST ? NULL : optarg;
        }
    }
    if (vmstate_dir && action != CREATE) {
        return qi_usage_error("--vmstate can only be used with -c");
    }
    const char *new_name = NULL;
    if (action == RENAME) {
        if (optind != argc - 2) {
            return qi_usage_error("Expecting the new snapshot name and one "
                                  "image file name");
        }
        new_name = argv[optind++];
    } else if (optind != argc - 1) {
        return qi_usage_error("Expecting one image file name");
    }
    const char *filename = argv[optind];

    if (action == LIST) {
        flags &= ~(unsigned)QSNAP_OPEN_RDWR;
    }
    if (force_share) {
        if (flags & QSNAP_OPEN_RDWR) {
            qi_error("Could not open '%s': force-share=on can only be used "
                     "with read-only images",
                     filename);
            return 1;
        }
        flags |= QSNAP_OPEN_FORCE_SHARE;
    }

    qsnap_image *img;
    if (qi_open(filename, fmt, flags, &img) < 0) {
        return 1;
    }
    int ret = 0;
    switch (action) {
    case NONE:
        break;
    case LIST:
        ret = do_list(img, filename, output);
        break;
    case CREATE:
        ret = do_create(img, filename, name, vmstate_dir);
        break;
    case APPLY:
        ret = do_apply(img, filename, name);
        break;
    case DELETE:
        ret = do_delete(img, filename, name);
        break;
    case RENAME:
        ret = do_rename(img, filename, name, new_name);
        break;
    }
    if (qi_close(img, filename) < 0) {
        ret = -1;
    }
    return ret < 0 ? 1 : 0;
}
