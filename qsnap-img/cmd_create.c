/*
 * cmd_create.c - "qsnap-img create": make a new qcow2 or raw image.
 *
 *   create [-q] [-f fmt] [-b backing [-F backing_fmt]] [-u] [-o options]
 *          filename [size]
 *
 * Prints qemu-img's "Formatting 'FILE', fmt=... " line.  Without a size,
 * an image with a backing file takes the backing file's size; the backing
 * file is opened to check it unless -u is given.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "qsnap_img.h"

/* Prints the "Formatting" line with the options as qemu-img lists them. */
static void print_formatting(const char *filename,
                             const struct qi_create_spec *spec)
{
    const struct qsnap_create_opts *o = &spec->opts;

    printf("Formatting '%s', fmt=%s", filename, spec->fmt_name);
    if (o->format == QSNAP_FMT_RAW) {
        printf(" size=%" PRIu64, o->size);
        if (spec->prealloc) {
            printf(" preallocation=%s", spec->prealloc);
        }
        printf("\n");
        return;
    }
    printf(" cluster_size=%" PRIu32 " extended_l2=%s", o->cluster_size,
           spec->extended_l2 ? "on" : "off");
    if (spec->prealloc) {
        printf(" preallocation=%s", spec->prealloc);
    }
    printf(" compression_type=%s size=%" PRIu64,
           spec->compression ? spec->compression : "zlib", o->size);
    if (o->backing_file) {
        printf(" backing_file=%s", o->backing_file);
    }
    if (o->backing_fmt) {
        printf(" backing_fmt=%s", o->backing_fmt);
    }
    if (spec->compat) {
        printf(" compat=%s", spec->compat);
    }
    printf(" lazy_refcounts=%s refcount_bits=%d\n",
           o->lazy_refcounts ? "on" : "off", o->refcount_bits);
}

/*
 * Opens the backing file the way the new image will find it, to check it
 * and learn its size.  Returns 0 or -1 after printing qemu-img's message.
 */
static int probe_backing(const char *filename,
                         const struct qsnap_create_opts *o, uint64_t *size,
                         const char **detected)
{
    char path[PATH_MAX];
    char err[1024] = "";
    struct qsnap_open_opts oo;
    struct qsnap_info info;
    qsnap_image *b;

    qi_backing_path(filename, o->backing_file, path, sizeof(path));
    qsnap_open_opts_init(&oo);
    oo.flags = QSNAP_OPEN_NO_BACKING | QSNAP_OPEN_FORCE_SHARE;
    oo.format = qi_format_from_name(o->backing_fmt);
    if (oo.format < 0) {
        qi_error_file(filename, "Unknown driver '%s'", o->backing_fmt);
        fprintf(stderr, "Could not open backing image.\n");
        return -1;
    }
    const int ret = qsnap_open(path, &oo, &b, err, sizeof(err));
    if (ret < 0) {
        qi_error_file(filename, "Could not open '%s': %s", path,
                      err[0] ? err : qsnap_strerror(ret));
        fprintf(stderr, "Could not open backing image.\n");
        return -1;
    }
    memset(&info, 0, sizeof(info));
    info.struct_size = sizeof(info);
    if (qsnap_get_info(b, &info) < 0) {
        qi_error_file(filename, "%s", qsnap_errmsg(b));
        qsnap_close(b);
        return -1;
    }
    *size = info.virtual_size;
    if (info.format == QSNAP_FMT_RAW) {
        /* QEMU counts whole sectors: a raw tail rounds up. */
        *size = (*size + 511) & ~511ull;
    }
    *detected = qi_format_name(info.format);
    qsnap_close(b);
    return 0;
}

int qi_cmd_create(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = "raw";
    const char *base = NULL;
    const char *base_fmt = NULL;
    bool unsafe = false;
    bool quiet = false;
    struct qi_opts list = {0};
    struct qi_create_spec spec;
    int c;
    int status = 1;

    memset(&spec, 0, sizeof(spec));
    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "F:b:f:ho:qu",
                            long_opts, NULL)) != -1) {
        switch (c) {
        case 'F':
            base_fmt = optarg;
            break;
        case 'b':
            base = optarg;
            break;
        case 'f':
            fmt = optarg;
            break;
        case 'h':
            qi_help();
        case 'o':
            if (qi_opts_add_arg(&list, optarg) < 0) {
                goto out;
            }
            break;
        case 'q':
            quiet = true;
            break;
        case 'u':
            unsafe = true;
            break;
        default:
            status = qi_getopt_error(c, argv);
            goto out;
        }
    }

    const char *filename = optind < argc ? argv[optind] : NULL;
    if (qi_opts_has_help(&list)) {
        if (qi_create_spec_init(&spec, fmt, NULL, &list) == 0) {
            qi_create_spec_help(&spec);
            status = 0;
        }
        goto out;
    }
    if (!filename) {
        status = qi_usage_error("Expecting image file name");
        goto out;
    }
    optind++;

    uint64_t size = 0;
    bool have_size = false;
    if (optind < argc) {
        if (qi_cvtnum("image size", argv[optind++], &size) < 0) {
            goto out;
        }
        have_size = true;
    }
    if (optind != argc) {
        status = qi_usage_error("Unexpected argument: %s", argv[optind]);
        goto out;
    }

    if (qi_create_spec_init(&spec, fmt, filename, &list) < 0) {
        goto out;
    }
    struct qsnap_create_opts *o = &spec.opts;
    if (o->format == QSNAP_FMT_RAW && base) {
        qi_error_file(filename,
                      "Backing file not supported for file format 'raw'");
        goto out;
    }
    if (o->format == QSNAP_FMT_RAW && base_fmt) {
        qi_error_file(filename,
                      "Backing file format not supported for file format "
                      "'raw'");
        goto out;
    }
    if (qi_create_spec_parse(&spec, filename) < 0) {
        goto out;
    }
    if (spec.size_str && have_size) {
        qi_error_file(filename, "The image size must be specified only once");
        goto out;
    }
    if (have_size) {
        o->size = size;
    } else if (spec.size_str) {
        have_size = true;
    }
    if (base) {
        o->backing_file = base;
    }
    if (base_fmt) {
        o->backing_fmt = base_fmt;
    }

    if (o->backing_file && !o->backing_fmt) {
        /* As qemu-img: a backing file that does not open is named first. */
        uint64_t bsize;
        const char *detected = NULL;
        if (!unsafe && probe_backing(filename, o, &bsize, &detected) < 0) {
            goto out;
        }
        qi_error_file(filename,
                      "Backing file specified without backing format");
        if (detected) {
            fprintf(stderr, "Detected format of %s.\n", detected);
        }
        goto out;
    }
    if (o->backing_file && !unsafe) {
        uint64_t bsize;
        const char *detected;
        if (probe_backing(filename, o, &bsize, &detected) < 0) {
            goto out;
        }
        if (!have_size) {
            o->size = bsize;
            have_size = true;
        }
    }
    if (!have_size) {
        qi_error_file(filename, "Image creation needs a size parameter");
        goto out;
    }

    if (!quiet) {
        print_formatting(filename, &spec);
        fflush(stdout);
    }
    if (qi_create_spec_check(&spec, filename) < 0) {
        goto out;
    }

    char err[1024] = "";
    const int ret = qsnap_create(filename, o, err, sizeof(err));
    if (ret < 0) {
        if (err[0]) {
            qi_error("%s", err);
        } else {
            qi_error_file(filename, "%s", qsnap_strerror(ret));
        }
        goto out;
    }
    status = 0;
out:
    qi_opts_free(&list);
    qi_create_spec_free(&spec);
    return status;
}
