/*
 * cmd_resize.c - "qsnap-img resize": change an image's virtual size.
 *
 *   resize [-f fmt] [-q] [--shrink] filename [+ | -]size
 *
 * Growing always works; shrinking needs --shrink, and the library refuses
 * to drop allocated data (its message is printed).
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "qsnap_img.h"

int qi_cmd_resize(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"shrink", no_argument, NULL, QI_OPT_SHRINK},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    bool quiet = false;
    bool shrink = false;
    int c;

    /*
     * The size is the last argument; take it out before option parsing so
     * that "-1G" is not read as an option.
     */
    if (argc < 3) {
        return qi_usage_error("Not enough arguments");
    }
    const char *size_arg = argv[--argc];

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
        case QI_OPT_SHRINK:
            shrink = true;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (optind != argc - 1) {
        return qi_usage_error("Expecting image file name and size");
    }
    const char *filename = argv[optind];

    int relative = 0;
    if (size_arg[0] == '+') {
        relative = 1;
        size_arg++;
    } else if (size_arg[0] == '-') {
        relative = -1;
        size_arg++;
    }
    uint64_t n;
    if (qi_parse_size(size_arg, &n) < 0) {
        qi_size_param_error(NULL, "size");
        return 1;
    }

    qsnap_image *img;
    struct qsnap_info info;
    if (qi_open(filename, fmt, QSNAP_OPEN_RDWR, &img) < 0) {
        return 1;
    }
    if (qi_get_info(img, &info) < 0) {
        qsnap_close(img);
        return 1;
    }
    const uint64_t current = info.virtual_size;
    uint64_t total = n;
    bool valid = true;
    if (relative > 0) {
        valid = n <= (uint64_t)INT64_MAX - current;
        total = current + n;
    } else if (relative < 0) {
        valid = n < current;
        total = current - n;
    }
    if (!valid || total == 0 || total > (uint64_t)INT64_MAX) {
        qi_error("New image size must be positive");
        qsnap_close(img);
        return 1;
    }
    if (info.format == QSNAP_FMT_QCOW2 && total % 512 != 0) {
        /* qcow2 keeps whole sectors, as QEMU requires for resizing. */
        qi_error("The new size must be a multiple of 512");
        qsnap_close(img);
        return 1;
    }
    if (total < current && !shrink) {
        qi_error("Use the --shrink option to perform a shrink operation.");
        qi_warn("Shrinking an image will delete all data beyond the "
                "shrunken image's end. Before performing such an operation, "
                "make sure there is no important data there.");
        qsnap_close(img);
        return 1;
    }
    const int ret =
        qsnap_resize(img, total, total < current ? QSNAP_RESIZE_SHRINK : 0);
    if (ret < 0) {
        const char *msg = qsnap_errmsg(img);
        if (msg[0]) {
            qi_error("%s", msg);
        } else {
            qi_error_file(filename, "%s", qsnap_strerror(ret));
        }
        qsnap_close(img);
        return 1;
    }
    if (qi_close(img, filename) < 0) {
        return 1;
    }
    if (!quiet) {
        printf("Image resized.\n");
    }
    return 0;
}
