/*
 * cmd_commit.c - "qsnap-img commit": write an overlay's data into a file
 * of its backing chain.
 *
 *   commit [-f fmt] [-t cache] [-b base] [-d] [-p] [-q] filename
 *
 * As qemu-img: without -b the data goes into the image's own backing
 * file, and the image is emptied afterwards (it then reads everything
 * through that file) unless -d is given.  -b names a file further down
 * the chain (resolved as qemu-img does: a relative name against the
 * directory of the image that names it); every layer between the image
 * and BASE is written into BASE too.  -b implies -d, since the layers
 * in between no longer show what they did.  Prints "Image committed.".
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <getopt.h>
#include <limits.h>
#include <stdio.h>

#include "qsnap_img.h"

int qi_cmd_commit(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    const char *cache = "writeback";
    const char *base = NULL;
    bool keep = false;
    bool progress = false;
    bool quiet = false;
    unsigned flags = QSNAP_OPEN_RDWR;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "b:df:hpqt:",
                            long_opts, NULL)) != -1) {
        switch (c) {
        case 'b':
            base = optarg;
            keep = true; /* -b implies -d */
            break;
        case 'd':
            keep = true;
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
        case 't':
            cache = optarg;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (optind != argc - 1) {
        return qi_usage_error("Expecting one image file name");
    }
    const char *filename = argv[optind];
    if (qi_parse_cache(cache, &flags) < 0) {
        qi_error("Invalid cache option: %s", cache);
        return 1;
    }

    qsnap_image *img;
    char base_path[PATH_MAX];
    if (qi_open(filename, fmt, flags, &img) < 0) {
        return 1;
    }
    int ret = qi_find_base(img, filename, base, base_path, sizeof(base_path));
    if (ret == 0) {
        qi_progress_start(progress && !quiet);
        ret = qsnap_commit(img, base ? base_path : NULL,
                           keep ? QSNAP_COMMIT_KEEP : 0, qi_progress_cb, NULL);
        qi_progress_done(ret == 0);
        if (ret < 0) {
            qi_error("%s", qi_errmsg(img, ret));
        }
    }
    if (qi_close(img, filename) < 0) {
        ret = -1;
    }
    if (ret == 0 && !quiet) {
        printf("Image committed.\n");
    }
    return ret < 0 ? 1 : 0;
}
