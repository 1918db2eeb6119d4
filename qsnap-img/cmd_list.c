/*
 * cmd_list.c - "qsnap-img list": the snapshots of an image and its chain.
 *
 *   list [-f fmt] [--output=human|json] [-U] filename
 *
 * First every internal snapshot of the image, with what deleting it would
 * free (EXCLUSIVE: the bytes of host clusters only that snapshot holds);
 * then the backing chain layer by layer, from the image down to its base:
 * each file's name, format, virtual size and its own internal snapshots.
 * Each layer is opened on its own (read-only, without its backing file).
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qsnap_img.h"

/* One layer of the chain with its snapshots. */
struct layer {
    struct qi_layer l;
    struct qsnap_snapshot_info *snaps;
    uint32_t n_snaps;
    uint64_t *exclusive; /* per snapshot */
};

static void free_layers(struct layer *ls, int n)
{
    for (int i = 0; i < n; i++) {
        if (ls[i].snaps) {
            qsnap_snapshot_list_free(ls[i].snaps, ls[i].n_snaps);
        }
        free(ls[i].exclusive);
    }
    free(ls);
}

/* Reads the snapshots of each layer and their exclusive sizes. */
static int load_layer(struct layer *ly)
{
    qsnap_image *img = ly->l.img;

    if (ly->l.info->nb_snapshots == 0) {
        return 0;
    }
    if (qi_snapshot_list(img, ly->l.path, &ly->snaps, &ly->n_snaps) < 0) {
        return -1;
    }
    ly->exclusive = calloc(ly->n_snaps ? ly->n_snaps : 1, sizeof(uint64_t));
    if (!ly->exclusive) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
        return -1;
    }
    for (uint32_t i = 0; i < ly->n_snaps; i++) {
        const int ret = qsnap_snapshot_exclusive_size(img, ly->snaps[i].id,
                                                      &ly->exclusive[i]);
        if (ret < 0) {
            qi_error("Could not measure snapshot '%s' of '%s': %s",
                     ly->snaps[i].name, ly->l.path,
                     qi_strip_path(qi_errmsg(img, ret), ly->l.path));
            return -1;
        }
    }
    return 0;
}

static void print_table(const struct layer *ly)
{
    if (ly->n_snaps == 0) {
        printf("No snapshots in %s\n", ly->l.path);
        return;
    }
    printf("Snapshots in %s:\n", ly->l.path);
    printf("%-10s%-17s%-19s%14s%10s%11s%11s\n", "ID", "TAG", "DATE", "VM CLOCK",
           "VM SIZE", "DISK SIZE", "EXCLUSIVE");
    for (uint32_t i = 0; i < ly->n_snaps; i++) {
        const struct qsnap_snapshot_info *sn = &ly->snaps[i];
        char date[64];
        char clock[64];
        char vm[64];
        char disk[64];
        char excl[64];
        qi_snapshot_date(sn, date, sizeof(date));
        qi_snapshot_clock(sn, clock, sizeof(clock));
        qi_human_size(sn->vm_state_size, vm, sizeof(vm));
        qi_human_size(sn->disk_size, disk, sizeof(disk));
        qi_human_size(ly->exclusive[i], excl, sizeof(excl));
        printf("%-9s %-16s %-19s%14s%10s%11s%11s\n", sn->id, sn->name, date,
               clock, vm, disk, excl);
    }
}

static void print_human(const struct layer *ls, int n)
{
    char size[64];

    print_table(&ls[0]);
    printf("\nBacking chain:\n%-7s%-8s%12s  %s\n", "DEPTH", "FORMAT",
           "VIRTUAL SIZE", "FILE");
    for (int d = 0; d < n; d++) {
        const struct layer *ly = &ls[d];
        qi_human_size(ly->l.info->virtual_size, size, sizeof(size));
        printf("%-7d%-8s%12s  %s\n", d, qi_format_name(ly->l.info->format),
               size, ly->l.path);
        for (uint32_t i = 0; i < ly->n_snaps; i++) {
            printf("%-27s  snapshot %s: %s\n", "", ly->snaps[i].id,
                   ly->snaps[i].name);
        }
    }
}

/* Adds the "snapshots" array of LY to OBJ. */
static void add_snapshots(struct qi_json *obj, const struct layer *ly)
{
    struct qi_json *arr = qi_json_array(obj, "snapshots");
    for (uint32_t i = 0; arr && i < ly->n_snaps; i++) {
        struct qi_json *o = qi_snapshot_json(arr, &ly->snaps[i]);
        if (o) {
            qi_json_uint(o, "disk-size", ly->snaps[i].disk_size);
            qi_json_uint(o, "exclusive-size", ly->exclusive[i]);
        }
    }
}

static int print_json(const struct layer *ls, int n)
{
    struct qi_json *root = qi_json_new();
    if (root) {
        qi_json_str(root, "filename", ls[0].l.path);
        add_snapshots(root, &ls[0]);
        struct qi_json *chain = qi_json_array(root, "backing-chain");
        for (int d = 0; chain && d < n; d++) {
            struct qi_json *o = qi_json_append_obj(chain);
            if (!o) {
                break;
            }
            qi_json_int(o, "depth", d);
            qi_json_str(o, "filename", ls[d].l.path);
            qi_json_str(o, "format", qi_format_name(ls[d].l.info->format));
            qi_json_uint(o, "virtual-size", ls[d].l.info->virtual_size);
            add_snapshots(o, &ls[d]);
        }
    }
    const bool ok = !qi_json_failed(root);
    if (ok) {
        qi_json_print(stdout, root);
    } else {
        qi_error("%s", qsnap_strerror(-ENOMEM));
    }
    qi_json_free(root);
    return ok ? 0 : -1;
}

int qi_cmd_list(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"force-share", no_argument, NULL, 'U'},
        {"output", required_argument, NULL, QI_OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    enum qi_output output = QI_OUTPUT_HUMAN;
    const char *fmt = NULL;
    unsigned flags = 0;
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

    struct qi_chain *ch;
    if (qi_chain_open(argv[optind], fmt, flags, &ch) < 0) {
        return 1;
    }
    const int n = qi_chain_length(ch);
    struct layer *ls = calloc((size_t)n, sizeof(*ls));
    int ret = ls ? 0 : -1;
    if (!ls) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
    }
    for (int d = 0; ret == 0 && d < n; d++) {
        qi_chain_layer(ch, d, &ls[d].l);
        ret = load_layer(&ls[d]);
    }
    if (ret == 0 && output == QI_OUTPUT_JSON) {
        ret = print_json(ls, n);
    } else if (ret == 0) {
        print_human(ls, n);
    }
    if (ls) {
        free_layers(ls, n);
    }
    qi_chain_close(ch);
    return ret < 0 ? 1 : 0;
}
