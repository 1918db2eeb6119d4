/*
 * cmd_check.c - "qsnap-img check": consistency check and repair.
 *
 *   check [-q] [-f fmt] [--output=human|json] [-r leaks|all] [-U] filename
 *
 * Exit status as qemu-img: 0 clean, 1 the check could not run (or hit
 * internal errors), 2 corruptions, 3 leaked clusters only, 63 the format
 * has no checks (raw).
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "qsnap_img.h"

/* Each problem the library reports goes to stderr, one line each. */
static void report_problem(void *opaque, int level, const char *msg)
{
    (void)opaque;
    (void)level;
    fflush(stdout);
    fprintf(stderr, "%s\n", msg);
}

static void dump_human(const struct qsnap_check_result *r)
{
    if (!(r->corruptions || r->leaks || r->check_errors)) {
        printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions) {
            printf("\n%" PRIu64 " errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image "
                   "may corrupt it.\n",
                   r->corruptions);
        }
        if (r->leaks) {
            printf("\n%" PRIu64 " leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n",
                   r->leaks);
        }
        if (r->check_errors) {
            printf("\n%" PRIu64
                   " internal errors have occurred during the check.\n",
                   r->check_errors);
        }
    }
    if (r->total_clusters != 0 && r->allocated_clusters != 0) {
        const double alloc = (double)r->allocated_clusters;
        printf("%" PRIu64 "/%" PRIu64 " = %0.2f%% allocated, %0.2f%% "
               "fragmented, %0.2f%% compressed clusters\n",
               r->allocated_clusters, r->total_clusters,
               alloc * 100.0 / (double)r->total_clusters,
               (double)r->fragmented_clusters * 100.0 / alloc,
               (double)r->compressed_clusters * 100.0 / alloc);
    }
    if (r->image_end_offset) {
        printf("Image end offset: %" PRIu64 "\n", r->image_end_offset);
    }
}

/* The ImageCheck object: optional members appear only when non-zero. */
static int dump_json(const char *filename, const char *format,
                     const struct qsnap_check_result *r)
{
    struct qi_json *obj = qi_json_new();
    if (!obj) {
        return -ENOMEM;
    }
    qi_json_str(obj, "filename", filename);
    qi_json_str(obj, "format", format);
    qi_json_uint(obj, "check-errors", r->check_errors);
    const struct {
        const char *key;
        uint64_t value;
    } opt[] = {
        {"image-end-offset", r->image_end_offset},
        {"corruptions", r->corruptions},
        {"leaks", r->leaks},
        {"corruptions-fixed", r->corruptions_fixed},
        {"leaks-fixed", r->leaks_fixed},
        {"total-clusters", r->total_clusters},
        {"allocated-clusters", r->allocated_clusters},
        {"fragmented-clusters", r->fragmented_clusters},
        {"compressed-clusters", r->compressed_clusters},
    };
    for (size_t i = 0; i < sizeof(opt) / sizeof(opt[0]); i++) {
        if (opt[i].value) {
            qi_json_uint(obj, opt[i].key, opt[i].value);
        }
    }
    int ret = 0;
    if (qi_json_failed(obj)) {
        ret = -ENOMEM;
    } else {
        qi_json_print(stdout, obj);
    }
    qi_json_free(obj);
    return ret;
}

int qi_cmd_check(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"repair", required_argument, NULL, 'r'},
        {"output", required_argument, NULL, QI_OPT_OUTPUT},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    enum qi_output output = QI_OUTPUT_HUMAN;
    unsigned flags = QSNAP_OPEN_CHECK;
    unsigned repair = 0;
    bool quiet = false;
    int c;

    while ((c = getopt_long(argc, argv, QI_GETOPT_PREFIX "f:hqr:U", long_opts,
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
        case 'r':
            flags |= QSNAP_OPEN_RDWR;
            if (strcmp(optarg, "leaks") == 0) {
                repair = QSNAP_CHECK_REPAIR_LEAKS;
            } else if (strcmp(optarg, "all") == 0) {
                repair = QSNAP_CHECK_REPAIR_LEAKS | QSNAP_CHECK_REPAIR_ALL;
            } else {
                return qi_usage_error("Unknown option value for -r "
                                      "(expecting 'leaks' or 'all'): %s",
                                      optarg);
            }
            break;
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
    struct qsnap_info info;
    if (qi_open(filename, fmt, flags, &img) < 0) {
        return 1;
    }
    if (qi_get_info(img, &info) < 0) {
        qsnap_close(img);
        return 1;
    }
    if (info.format != QSNAP_FMT_QCOW2) {
        qi_error("This image format does not support checks");
        qsnap_close(img);
        return 63;
    }

    struct qsnap_check_result res;
    memset(&res, 0, sizeof(res));
    res.struct_size = sizeof(res);
    int ret = qsnap_check(img, repair, &res, report_problem, NULL);
    if (ret == -ENOTSUP) {
        qi_error("This image format does not support checks");
        qsnap_close(img);
        return 63;
    }
    if (ret < 0) {
        const char *msg = qsnap_errmsg(img);
        qi_error("Check failed: %s", msg[0] ? msg : qsnap_strerror(ret));
        qsnap_close(img);
        return 1;
    }
    if ((res.corruptions_fixed || res.leaks_fixed) &&
        output == QI_OUTPUT_HUMAN && !quiet) {
        /* The library has checked the repaired image again already. */
        printf("The following inconsistencies were found and repaired:\n\n"
               "    %" PRIu64 " leaked clusters\n"
               "    %" PRIu64 " corruptions\n\n"
               "Double checking the fixed image now...\n",
               res.leaks_fixed, res.corruptions_fixed);
    }
    if (!quiet) {
        if (output == QI_OUTPUT_JSON) {
            if (dump_json(filename, qi_format_name(info.format), &res) < 0) {
                qi_error("%s", qsnap_strerror(-ENOMEM));
                qsnap_close(img);
                return 1;
            }
        } else {
            dump_human(&res);
        }
    }
    fflush(stdout);
    if (qi_close(img, filename) < 0) {
        return 1;
    }
    if (res.check_errors) {
        qi_error("Check failed");
        return 1;
    }
    if (res.corruptions) {
        return 2;
    }
    return res.leaks ? 3 : 0;
}
