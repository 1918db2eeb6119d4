/*
 * cmd_info.c - "qsnap-img info": describe an image as qemu-img info does.
 *
 *   info [-f fmt] [--output=human|json] [--backing-chain] [-U] filename
 *
 * The image is opened without its backing file (as qemu-img does), so a
 * missing backing file does not prevent inspecting the overlay.  With
 * --backing-chain every image of the chain is described in turn.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qsnap_img.h"

/* Longest backing chain followed by --backing-chain. */
#define MAX_CHAIN 256

/* One image of the chain, as described. */
struct desc {
    char name[PATH_MAX];
    struct qsnap_info info;
    struct qsnap_snapshot_info *snaps;
    uint32_t n_snaps;
    struct qi_json *obj;
};

static void print_human(const struct desc *d)
{
    const char *filename = d->name;
    const struct qsnap_info *info = &d->info;
    const struct qi_json *obj = d->obj;
    char buf[64];

    printf("image: %s\nfile format: %s\n", filename,
           qi_format_name(info->format));
    qi_human_size(info->virtual_size, buf, sizeof(buf));
    printf("virtual size: %s (%" PRIu64 " bytes)\n", buf, info->virtual_size);
    qi_human_size(info->disk_size, buf, sizeof(buf));
    printf("disk size: %s\n", buf);
    if (info->format == QSNAP_FMT_QCOW2) {
        printf("cluster_size: %" PRIu32 "\n", info->cluster_size);
    }
    if (info->dirty) {
        printf("cleanly shut down: no\n");
    }
    if (info->backing_file[0]) {
        char full[PATH_MAX];
        qi_backing_path(filename, info->backing_file, full, sizeof(full));
        printf("backing file: %s", info->backing_file);
        if (strcmp(full, info->backing_file) != 0) {
            printf(" (actual path: %s)", full);
        }
        printf("\n");
        if (info->backing_fmt[0]) {
            printf("backing file format: %s\n", info->backing_fmt);
        }
    }
    if (d->n_snaps) {
        printf("Snapshot list:\n");
        qi_snapshot_print_header();
        for (uint32_t i = 0; i < d->n_snaps; i++) {
            qi_snapshot_print(&d->snaps[i]);
        }
    }
    /* The "data" member of "format-specific", as qemu-img dumps it. */
    const struct qi_json *data =
        qi_json_get_obj(qi_json_get_obj(obj, "format-specific"), "data");
    if (data) {
        printf("Format specific information:\n");
        qi_json_print_human(stdout, data, 1);
    }
}

int qi_cmd_info(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"output", required_argument, NULL, QI_OPT_OUTPUT},
        {"backing-chain", no_argument, NULL, 'B'},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    enum qi_output output = QI_OUTPUT_HUMAN;
    bool chain = false;
    unsigned flags = QSNAP_OPEN_NO_BACKING;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "f:hU", long_opts,
                            NULL)) != -1) {
        switch (c) {
        case 'f':
            fmt = optarg;
            break;
        case 'h':
            qi_help();
        case 'U':
            flags |= QSNAP_OPEN_FORCE_SHARE;
            break;
        case 'B':
            chain = true;
            break;
        case QI_OPT_OUTPUT:
            if (qi_parse_output(optarg, &output) < 0) {
                return 1;
            }
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (optind != argc - 1) {
        return qi_usage_error("Expecting one image file name");
    }

    struct desc *d = calloc(MAX_CHAIN, sizeof(*d));
    size_t n = 0;
    int status = 1;

    if (!d) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
        return 1;
    }
    snprintf(d[0].name, PATH_MAX, "%s", argv[optind]);
    for (;;) {
        struct desc *cur = &d[n];
        qsnap_image *img;
        if (qi_open(cur->name, fmt, flags, &img) < 0) {
            goto out;
        }
        int ret = qi_get_info(img, &cur->info);
        if (ret == 0 && cur->info.nb_snapshots) {
            ret = qsnap_snapshot_list(img, &cur->snaps, &cur->n_snaps);
            if (ret < 0) {
                qi_error("Could not list the snapshots of '%s': %s", cur->name,
                         qsnap_strerror(ret));
            }
        }
        qsnap_close(img);
        n++;
        if (ret < 0) {
            goto out;
        }
        qi_info_qemu_sizes(&cur->info);
        cur->obj =
            qi_info_json(cur->name, &cur->info, cur->snaps, cur->n_snaps);
        if (!cur->obj) {
            qi_error("%s", qsnap_strerror(-ENOMEM));
            goto out;
        }
        if (!chain || !cur->info.backing_file[0]) {
            break;
        }
        if (n == MAX_CHAIN) {
            qi_error("Backing chain is longer than %d images", MAX_CHAIN);
            goto out;
        }
        qi_backing_path(cur->name, cur->info.backing_file, d[n].name, PATH_MAX);
        bool loop = false;
        for (size_t i = 0; i < n && !loop; i++) {
            loop = qi_same_file(d[i].name, d[n].name);
        }
        if (loop) {
            qi_error("Backing file '%s' creates an infinite loop.",
                     cur->info.backing_file);
            goto out;
        }
        fmt = cur->info.backing_fmt[0] ? cur->info.backing_fmt : NULL;
    }

    if (output == QI_OUTPUT_JSON && chain) {
        struct qi_json **objs = calloc(n, sizeof(*objs));
        if (!objs) {
            qi_error("%s", qsnap_strerror(-ENOMEM));
            goto out;
        }
        for (size_t i = 0; i < n; i++) {
            objs[i] = d[i].obj;
        }
        qi_json_print_array(stdout, objs, n);
        free(objs);
    } else if (output == QI_OUTPUT_JSON) {
        qi_json_print(stdout, d[0].obj);
    } else {
        for (size_t i = 0; i < n; i++) {
            if (i) {
                printf("\n");
            }
            print_human(&d[i]);
        }
    }
    status = 0;
out:
    for (size_t i = 0; i < n; i++) {
        qi_json_free(d[i].obj);
        if (d[i].snaps) {
            qsnap_snapshot_list_free(d[i].snaps, d[i].n_snaps);
        }
    }
    free(d);
    return status;
}
