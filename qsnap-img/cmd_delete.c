/*
 * cmd_delete.c - "qsnap-img delete": delete internal snapshots and
 * external checkpoint layers.
 *
 *   delete [-f fmt] [-p] [-q] [--stream | --commit] filename name
 *   delete [-f fmt] [-q] --all filename
 *
 * NAME is either an internal snapshot of the image (an ID or a name; an
 * ID is matched first, as for snapshot -a) or a file of its backing chain
 * (as list shows it: a path, relative to the current directory, or the
 * backing name recorded in the header of the layer above it).  A snapshot
 * is deleted; a layer is merged away (qsnap_checkpoint_delete) so that no
 * remaining layer changes what it shows and each stays at its path: its
 * data is streamed up into the layer above it (--stream), or that layer
 * is committed down into it, which then takes that layer's place
 * (--commit); by default whichever moves less data.  The image itself,
 * the active top of its chain, cannot be deleted: that would be a revert.
 * A name that is both a snapshot and a layer is refused as ambiguous.
 *
 * With --all every snapshot is deleted, in table order.  Each deletion is
 * reported on its own line unless -q is given; deleting stops at the
 * first failure.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

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

/* Deletes every snapshot (--all), or the one named NAME. */
static int delete_snapshots(const char *filename, const char *fmt,
                            const char *name, bool quiet)
{
    qsnap_image *img;
    struct qsnap_snapshot_info *list;
    uint32_t n;

    if (qi_open(filename, fmt, QSNAP_OPEN_RDWR, &img) < 0) {
        return -1;
    }
    int ret = qi_snapshot_list(img, filename, &list, &n);
    if (ret == 0 && !name) {
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
    return ret;
}

/*
 * What NAME is for the image FILENAME: *depth receives the depth of the
 * chain layer it names (-1: none), *is_snapshot whether it names an
 * internal snapshot of the image, *layers the chain (free() it).
 * Returns 0 or -1 after printing.
 */
static int classify(const char *filename, const char *fmt, const char *name,
                    struct qsnap_layer_info **layers, uint32_t *n_layers,
                    int *depth, bool *is_snapshot)
{
    qsnap_image *img;
    struct qsnap_snapshot_info *snaps = NULL;
    uint32_t n_snaps = 0;

    if (qi_open(filename, fmt, 0, &img) < 0) {
        return -1;
    }
    int ret = qi_chain_list(img, filename, layers, n_layers);
    if (ret == 0) {
        *depth = qi_chain_find(*layers, *n_layers, name, QI_FIND_PATH);
        if ((*layers)[0].nb_snapshots) {
            ret = qi_snapshot_list(img, filename, &snaps, &n_snaps);
        }
    }
    if (ret == 0) {
        *is_snapshot = qi_snapshot_find_id_or_name(snaps, n_snaps, name) >= 0;
    }
    if (snaps) {
        qsnap_snapshot_list_free(snaps, n_snaps);
    }
    qsnap_close(img);
    return ret < 0 ? -1 : 0;
}

/*
 * The guest bytes the image at PATH holds itself (opened without its
 * backing file).  Returns 0 or -1 (nothing printed).
 */
static int held_bytes(const char *path, int format, uint64_t *bytes)
{
    struct qsnap_open_opts o;
    struct qsnap_layer_info *list;
    qsnap_image *img;
    uint32_t n;

    qsnap_open_opts_init(&o);
    o.flags = QSNAP_OPEN_FORCE_SHARE | QSNAP_OPEN_NO_BACKING;
    o.format = format;
    if (qsnap_open(path, &o, &img, NULL, 0) < 0) {
        return -1;
    }
    const int ret = qsnap_chain_list(img, &list, &n);
    if (ret == 0) {
        *bytes = list[0].allocated_bytes;
        free(list);
    }
    qsnap_close(img);
    return ret < 0 ? -1 : 0;
}

/* True if PATH is the file that ST describes. */
static bool is_file(const char *path, const struct stat *st)
{
    struct stat now;
    return stat(path, &now) == 0 && now.st_dev == st->st_dev &&
           now.st_ino == st->st_ino;
}

/*
 * Merges away the layer at DEPTH (> 0) of FILENAME's chain LIST with
 * MERGE flags, then tells which way the data went and how much of it.
 */
static int delete_layer(const char *filename,
                        const struct qsnap_layer_info *list, int depth,
                        unsigned merge, bool progress, bool quiet)
{
    const struct qsnap_layer_info *child = &list[depth - 1];
    const struct qsnap_layer_info *layer = &list[depth];
    char err[1024] = "";
    struct stat layer_st;

    if (stat(layer->filename, &layer_st) < 0) {
        qi_error("Could not stat '%s': %s", layer->filename,
                 qsnap_strerror(-errno));
        return -1;
    }
    qi_progress_start(progress && !quiet);
    const int ret =
        qsnap_checkpoint_delete(filename, layer->filename, merge,
                                qi_progress_cb, NULL, err, sizeof(err));
    qi_progress_done(ret == 0);
    if (ret < 0) {
        qi_error("%s", err[0] ? err : qsnap_strerror(ret));
        return -1;
    }
    if (quiet) {
        return 0;
    }
    char size[64];
    uint64_t after = 0;
    if (is_file(child->filename, &layer_st)) {
        /* Committed: the layer's file now sits at the child's path. */
        qi_human_size(child->allocated_bytes, size, sizeof(size));
        printf("Deleted checkpoint layer %s (committed %s of %s into it, "
               "which took its place)\n",
               layer->filename, size, child->filename);
    } else if (held_bytes(child->filename, child->format, &after) == 0 &&
               after >= child->allocated_bytes) {
        qi_human_size(after - child->allocated_bytes, size, sizeof(size));
        printf("Deleted checkpoint layer %s (streamed %s into %s)\n",
               layer->filename, size, child->filename);
    } else {
        printf("Deleted checkpoint layer %s (streamed into %s)\n",
               layer->filename, child->filename);
    }
    return 0;
}

int qi_cmd_delete(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"all", no_argument, NULL, QI_OPT_ALL},
        {"stream", no_argument, NULL, QI_OPT_STREAM},
        {"commit", no_argument, NULL, QI_OPT_COMMIT},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    bool all = false;
    bool progress = false;
    bool quiet = false;
    unsigned merge = QSNAP_MERGE_AUTO;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "f:hpq", long_opts,
                            NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'h':
            qi_help();
        case 'p':
            progress = true;
            break;
        case 'q':
            quiet = true;
            break;
        case QI_OPT_ALL:
            all = true;
            break;
        case QI_OPT_STREAM:
            merge |= QSNAP_MERGE_STREAM;
            break;
        case QI_OPT_COMMIT:
            merge |= QSNAP_MERGE_COMMIT;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (merge == (QSNAP_MERGE_STREAM | QSNAP_MERGE_COMMIT)) {
        return qi_usage_error("--stream and --commit exclude each other");
    }
    if (all && merge != QSNAP_MERGE_AUTO) {
        return qi_usage_error("--stream and --commit apply to backing chain "
                              "layers, not to --all");
    }
    if (all && optind != argc - 1) {
        return qi_usage_error("Expecting one image file name with --all");
    }
    if (!all && optind != argc - 2) {
        return qi_usage_error("Expecting one image file name and a snapshot "
                              "or layer name");
    }
    const char *filename = argv[optind];
    if (all) {
        return delete_snapshots(filename, fmt, NULL, quiet) < 0 ? 1 : 0;
    }
    const char *name = argv[optind + 1];

    struct qsnap_layer_info *layers = NULL;
    uint32_t n_layers = 0;
    int depth = -1;
    bool is_snapshot = false;
    if (classify(filename, fmt, name, &layers, &n_layers, &depth,
                 &is_snapshot) < 0) {
        free(layers);
        return 1;
    }
    int ret = -1;
    if (depth >= 0 && is_snapshot) {
        qi_error("'%s' is both a snapshot of '%s' and a file of its backing "
                 "chain: name the snapshot by its ID, or the file by another "
                 "path (such as its absolute path)",
                 name, filename);
    } else if (depth == 0) {
        /* The library refuses the top, saying why. */
        char err[1024] = "";
        if (qsnap_checkpoint_delete(filename, filename, merge, NULL, NULL, err,
                                    sizeof(err)) < 0) {
            qi_error("%s", err[0] ? err : qsnap_strerror(-EINVAL));
        }
    } else if (depth > 0) {
        ret = delete_layer(filename, layers, depth, merge, progress, quiet);
    } else if (merge != QSNAP_MERGE_AUTO) {
        qi_error("'%s' is not a file of the backing chain of '%s'", name,
                 filename);
    } else {
        ret = delete_snapshots(filename, fmt, name, quiet);
    }
    free(layers);
    return ret < 0 ? 1 : 0;
}
