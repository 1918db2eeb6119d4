/*
 * cmd_compact.c - "qsnap-img compact": give free space back to the host.
 *
 *   compact [-f fmt] [-p] [-q] filename
 *
 * Moves the clusters at the end of the file into free space below and
 * truncates the file (qsnap_compact(); every snapshot is kept).  Prints
 * the file size before and after unless -q is given.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "qsnap_img.h"

/* The apparent size of FILENAME; prints the error on failure. */
static int file_size(const char *filename, uint64_t *size)
{
    struct stat st;
    if (stat(filename, &st) < 0) {
        qi_error("Could not stat '%s': %s", filename, strerror(errno));
        return -1;
    }
    *size = (uint64_t)st.st_size;
    return 0;
}

static void print_size(const char *what, uint64_t size)
{
    char buf[64];
    qi_human_size(size, buf, sizeof(buf));
    printf("%s: %s (%" PRIu64 " bytes)\n", what, buf, size);
}

int qi_cmd_compact(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    bool progress = false;
    bool quiet = false;
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
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (optind != argc - 1) {
        return qi_usage_error("Expecting one image file name");
    }
    const char *filename = argv[optind];

    uint64_t before;
    uint64_t after;
    qsnap_image *img;
    if (qi_open(filename, fmt, QSNAP_OPEN_RDWR, &img) < 0) {
        return 1;
    }
    if (file_size(filename, &before) < 0) {
        qsnap_close(img);
        return 1;
    }
    qi_progress_start(progress && !quiet);
    int ret = qsnap_compact(img, qi_progress_cb, NULL);
    qi_progress_done(ret == 0);
    if (ret < 0) {
        qi_error("Could not compact '%s': %s", filename,
                 qi_strip_path(qi_errmsg(img, ret), filename));
        qsnap_close(img);
        return 1;
    }
    if (qi_close(img, filename) < 0 || file_size(filename, &after) < 0) {
        return 1;
    }
    if (!quiet) {
        print_size("File size before", before);
        print_size("File size after", after);
    }
    return 0;
}
