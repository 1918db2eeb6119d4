/*
 * cmd_stream.c - "qsnap-img stream": pull the data of the backing chain
 * into an image so that it stands alone.
 *
 *   stream [-f fmt] [-b base] [-p] [-q] filename
 *
 * Copies into the image everything it reads from its backing files, then
 * drops the backing file: the image no longer needs the chain.  With -b,
 * only the layers above BASE are copied and BASE becomes the backing
 * file (BASE is found as for commit -b: a relative name against the
 * directory of the image that names it).  The layers below are left
 * unchanged.  qemu-img has no such command (QEMU streams with the
 * block-stream job of a running VM).  Prints "Image streamed.".
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <getopt.h>
#include <limits.h>
#include <stdio.h>

#include "qsnap_img.h"

int qi_cmd_stream(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    const char *base = NULL;
    bool progress = false;
    bool quiet = false;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "b:f:hpq", long_opts,
                            NULL)) != -1) {
        switch (c) {
        case 'b':
            base = optarg;
            break;
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
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (optind != argc - 1) {
        return qi_usage_error("Expecting one image file name");
    }
    const char *filename = argv[optind];

    qsnap_image *img;
    char base_path[PATH_MAX];
    if (qi_open(filename, fmt, QSNAP_OPEN_RDWR, &img) < 0) {
        return 1;
    }
    int ret = qi_find_base(img, filename, base, base_path, sizeof(base_path));
    if (ret == 0) {
        qi_progress_start(progress && !quiet);
        ret = qsnap_stream(img, base ? base_path : NULL, qi_progress_cb, NULL);
        qi_progress_done(ret == 0);
        if (ret < 0) {
            qi_error("%s", qi_errmsg(img, ret));
        }
    }
    if (qi_close(img, filename) < 0) {
        ret = -1;
    }
    if (ret == 0 && !quiet) {
        printf("Image streamed.\n");
    }
    return ret < 0 ? 1 : 0;
}
