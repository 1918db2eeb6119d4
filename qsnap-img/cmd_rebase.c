/*
 * cmd_rebase.c - "qsnap-img rebase": give an image another backing file.
 *
 *   rebase [-f fmt] [-t cache] [-T src_cache] [-p] [-q] [-u]
 *          -b backing_file [-F backing_fmt] filename
 *
 * As qemu-img: in the default (safe) mode every range the image does not
 * hold itself and where the old and the new backing chains differ is
 * first copied into the image, so what the guest sees stays the same.
 * -u (unsafe) only rewrites the name in the header; the old backing file
 * is not opened and the new one need not exist.  `-b ""` removes the
 * backing file (safe mode copies everything the old chain provided).
 * A relative BACKING is resolved against the image's directory.  A new
 * backing file needs -F, as in qemu-img 7.2; -T is accepted and checked
 * for compatibility.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include "qsnap_img.h"

/*
 * Opens the new backing file (and its chain) as the image will, to check
 * it before anything is written.  Returns 0 or -1 after printing.
 */
static int check_new_backing(const char *filename, const char *backing,
                             const char *backing_fmt)
{
    char path[PATH_MAX];
    char err[1024] = "";
    struct qsnap_open_opts o;
    qsnap_image *nb;

    qi_backing_path(filename, backing, path, sizeof(path));
    qsnap_open_opts_init(&o);
    o.flags = QSNAP_OPEN_FORCE_SHARE;
    o.format = qi_format_from_name(backing_fmt);
    const int ret = qsnap_open(path, &o, &nb, err, sizeof(err));
    if (ret < 0) {
        qi_error("Could not open new backing file '%s': %s", backing,
                 err[0] ? err : qsnap_strerror(ret));
        return -1;
    }
    qsnap_close(nb);
    return 0;
}

/*
 * After a safe rebase onto BACKING: the header records BACKING as given,
 * as qemu-img does (the library may have written another name for the
 * same file, such as an absolute path for "../base.qcow2", which would
 * tie the chain to its current place).  The name resolves to the file the
 * data was compared against, so rewriting it alone is safe.
 */
static int keep_name(qsnap_image *img, const char *backing,
                     const char *backing_fmt)
{
    struct qsnap_info info;
    memset(&info, 0, sizeof(info));
    info.struct_size = sizeof(info);
    int ret = qsnap_get_info(img, &info);
    if (ret == 0 && strcmp(info.backing_file, backing) != 0) {
        ret = qsnap_rebase(img, backing, backing_fmt, QSNAP_REBASE_UNSAFE, NULL,
                           NULL);
    }
    return ret;
}

int qi_cmd_rebase(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    const char *cache = "writeback";
    const char *src_cache = "writeback";
    const char *backing = NULL;
    const char *backing_fmt = NULL;
    bool progress = false;
    bool quiet = false;
    bool unsafe = false;
    unsigned flags = QSNAP_OPEN_RDWR;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "F:T:b:f:hpqt:u",
                            long_opts, NULL)) != -1) {
        switch (c) {
        case 'F':
            backing_fmt = optarg;
            break;
        case 'T':
            src_cache = optarg;
            break;
        case 'b':
            backing = optarg;
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
        case 'u':
            unsafe = true;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (optind != argc - 1) {
        return qi_usage_error("Expecting one image file name");
    }
    if (!unsafe && !backing) {
        return qi_usage_error("Must specify backing file (-b) or use unsafe "
                              "mode (-u)");
    }
    const char *filename = argv[optind];
    if (!backing) {
        backing = ""; /* -u without -b: no backing file */
    }
    unsigned src_flags = 0;
    if (qi_parse_cache(cache, &flags) < 0) {
        qi_error("Invalid cache option: %s", cache);
        return 1;
    }
    if (qi_parse_cache(src_cache, &src_flags) < 0) {
        qi_error("Invalid source cache option: %s", src_cache);
        return 1;
    }
    if (unsafe) {
        flags |= QSNAP_OPEN_NO_BACKING;
    }

    qsnap_image *img;
    struct qsnap_info info;
    if (qi_open(filename, fmt, flags, &img) < 0) {
        return 1;
    }
    int ret = qi_get_info(img, &info);
    if (ret == 0 && backing_fmt && qi_format_from_name(backing_fmt) <= 0) {
        qi_error("Invalid format name: '%s'", backing_fmt);
        ret = -1;
    }
    if (ret == 0 && !unsafe && backing[0]) {
        ret = check_new_backing(filename, backing, backing_fmt);
    }
    if (ret == 0 && backing[0] && !backing_fmt) {
        qi_error("Could not change the backing file to '%s': backing format "
                 "must be specified",
                 backing);
        ret = -1;
    }
    if (ret == 0 && info.format != QSNAP_FMT_QCOW2) {
        qi_error("Could not change the backing file to '%s': %s", backing,
                 qsnap_strerror(-ENOTSUP));
        ret = -1;
    }
    if (ret == 0) {
        qi_progress_start(progress && !quiet);
        ret = qsnap_rebase(img, backing, backing_fmt,
                           unsafe ? QSNAP_REBASE_UNSAFE : 0, qi_progress_cb,
                           NULL);
        qi_progress_done(ret == 0);
        if (ret == 0 && !unsafe && backing[0]) {
            ret = keep_name(img, backing, backing_fmt);
        }
        if (ret < 0) {
            qi_error("Could not change the backing file to '%s': %s", backing,
                     qi_strip_path(qi_errmsg(img, ret), filename));
        }
    }
    if (qi_close(img, filename) < 0) {
        ret = -1;
    }
    return ret < 0 ? 1 : 0;
}
