/*
 * cmd_list.c - "qsnap-img list": the snapshots of an image and its chain.
 *
 *   list [-f fmt] [--output=human|json] [-U] filename
 *
 * First every internal snapshot of the image, with what deleting it would
 * free (EXCLUSIVE: the bytes of host clusters only that snapshot holds);
 * then the backing chain layer by layer (qsnap_chain_list()), from the
 * image down to its base: each file's name as opened, format, virtual
 * size, the guest bytes it holds itself (ALLOCATED), the backing name its
 * header records and its own internal snapshots.  The image is opened
 * read-only with its backing files; a lower layer with snapshots is also
 * opened on its own to list them.
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
    const struct qsnap_layer_info *info;
    qsnap_image *img; /* the top's handle, or the layer's own, or NULL */
    bool own;         /* img was opened here */
    struct qsnap_snapshot_info *snaps;
    uint32_t n_snaps;
    uint64_t *exclusive; /* per snapshot */
};

static void free_layers(struct layer *ls, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        if (ls[i].snaps) {
            qsnap_snapshot_list_free(ls[i].snaps, ls[i].n_snaps);
        }
        if (ls[i].own) {
            qsnap_close(ls[i].img);
        }
        free(ls[i].exclusive);
    }
    free(ls);
}

/*
 * Reads the snapshots of a layer and their exclusive sizes, opening the
 * layer on its own (with FLAGS) unless LY->img is set.
 */
static int load_layer(struct layer *ly, unsigned flags)
{
    const char *path = ly->info->filename;

    if (ly->info->nb_snapshots == 0) {
        return 0;
    }
    if (!ly->img) {
        if (qi_open(path, qi_format_name(ly->info->format),
                    flags | QSNAP_OPEN_NO_BACKING, &ly->img) < 0) {
            return -1;
        }
        ly->own = true;
    }
    qsnap_image *img = ly->img;
    if (qi_snapshot_list(img, path, &ly->snaps, &ly->n_snaps) < 0) {
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
                     ly->snaps[i].name, path,
                     qi_strip_path(qi_errmsg(img, ret), path));
            return -1;
        }
    }
    return 0;
}

static void print_table(const struct layer *ly)
{
    if (ly->n_snaps == 0) {
        printf("No snapshots in %s\n", ly->info->filename);
        return;
    }
    printf("Snapshots in %s:\n", ly->info->filename);
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

/* Indent of the lines under a layer (the FORMAT column). */
#define DETAIL_INDENT 7

static void print_human(const struct layer *ls, uint32_t n)
{
    char size[64];
    char held[64];

    print_table(&ls[0]);
    printf("\nBacking chain:\n%-7s%-8s%12s%12s%11s  %s\n", "DEPTH", "FORMAT",
           "VIRTUAL SIZE", "ALLOCATED", "SNAPSHOTS", "FILE");
    for (uint32_t d = 0; d < n; d++) {
        const struct layer *ly = &ls[d];
        const struct qsnap_layer_info *info = ly->info;
        qi_human_size(info->virtual_size, size, sizeof(size));
        qi_human_size(info->allocated_bytes, held, sizeof(held));
        printf("%-7" PRIu32 "%-8s%12s%12s%11" PRIu32 "  %s\n", d,
               qi_format_name(info->format), size, held, info->nb_snapshots,
               info->filename);
        if (info->backing_name[0]) {
            printf("%-*sbacking file: %s", DETAIL_INDENT, "",
                   info->backing_name);
            if (info->backing_fmt[0]) {
                printf(" (format %s)", info->backing_fmt);
            }
            printf("\n");
        }
        for (uint32_t i = 0; i < ly->n_snaps; i++) {
            printf("%-*ssnapshot %s: %s\n", DETAIL_INDENT, "", ly->snaps[i].id,
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

/* Adds layer D of the chain to the array CHAIN. */
static void add_layer(struct qi_json *chain, const struct layer *ly, uint32_t d)
{
    const struct qsnap_layer_info *info = ly->info;
    struct qi_json *o = qi_json_append_obj(chain);
    if (!o) {
        return;
    }
    qi_json_int(o, "depth", d);
    qi_json_str(o, "filename", info->filename);
    qi_json_str(o, "format", qi_format_name(info->format));
    qi_json_uint(o, "virtual-size", info->virtual_size);
    qi_json_uint(o, "allocated-size", info->allocated_bytes);
    if (info->backing_name[0]) {
        qi_json_str(o, "backing-filename", info->backing_name);
        if (info->backing_fmt[0]) {
            qi_json_str(o, "backing-filename-format", info->backing_fmt);
        }
    }
    qi_json_uint(o, "snapshot-count", info->nb_snapshots);
    add_snapshots(o, ly);
}

static int print_json(const struct layer *ls, uint32_t n)
{
    struct qi_json *root = qi_json_new();
    if (root) {
        qi_json_str(root, "filename", ls[0].info->filename);
        add_snapshots(root, &ls[0]);
        struct qi_json *chain = qi_json_array(root, "backing-chain");
        for (uint32_t d = 0; chain && d < n; d++) {
            add_layer(chain, &ls[d], d);
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

    const char *filename = argv[optind];
    qsnap_image *img;
    struct qsnap_layer_info *list;
    uint32_t n;
    if (qi_open(filename, fmt, flags, &img) < 0) {
        return 1;
    }
    if (qi_chain_list(img, filename, &list, &n) < 0) {
        qsnap_close(img);
        return 1;
    }
    struct layer *ls = calloc(n, sizeof(*ls));
    int ret = ls ? 0 : -1;
    if (!ls) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
    }
    for (uint32_t d = 0; ret == 0 && d < n; d++) {
        ls[d].info = &list[d];
        ls[d].img = d == 0 ? img : NULL;
        ret = load_layer(&ls[d], flags);
    }
    if (ret == 0 && output == QI_OUTPUT_JSON) {
        ret = print_json(ls, n);
    } else if (ret == 0) {
        print_human(ls, n);
    }
    if (ls) {
        free_layers(ls, n);
    }
    free(list);
    qsnap_close(img);
    return ret < 0 ? 1 : 0;
}
