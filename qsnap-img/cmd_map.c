/*
 * cmd_map.c - "qsnap-img map": where the guest's data lives.
 *
 *   map [-f fmt] [--output=human|json] [-U] [--start-offset=N]
 *       [--max-length=N] filename
 *
 * Output as qemu-img map: the human table lists the ranges that hold data
 * (offset, length, host offset, file), the JSON list describes every range
 * with start, length, depth, present, zero, data and offset.
 *
 * The status of each range comes from qi_chain_status(), which walks the
 * backing chain as qemu-img does: "depth" names the image that decides a
 * range and "present" says whether that image allocates it.
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

#define PROBE_MAX (1ull << 30) /* qemu-img probes up to 1 GiB at a time */

struct map_entry {
    uint64_t start;
    uint64_t length;
    uint64_t offset;
    int depth;
    bool data;
    bool zero;
    bool present;
    bool has_offset;
    const char *filename; /* NULL unless has_offset */
};

static int get_block_status(struct qi_chain *ch, uint64_t offset,
                            uint64_t bytes, struct map_entry *e)
{
    struct qi_status st;
    const int ret = qi_chain_status(ch, offset, bytes, &st);
    if (ret < 0) {
        return ret;
    }
    *e = (struct map_entry){
        .start = offset,
        .length = st.len,
        .offset = st.offset,
        .depth = st.depth,
        .data = st.flags & QI_ST_DATA,
        .zero = st.flags & QI_ST_ZERO,
        .present = st.flags & QI_ST_ALLOCATED,
        .has_offset = st.flags & QI_ST_OFFSET,
        .filename = st.filename,
    };
    return 0;
}

static bool mergeable(const struct map_entry *a, const struct map_entry *b)
{
    if (a->length == 0) {
        return false;
    }
    if (a->zero != b->zero || a->data != b->data || a->depth != b->depth ||
        a->present != b->present || !a->filename != !b->filename ||
        a->has_offset != b->has_offset) {
        return false;
    }
    if (a->filename && strcmp(a->filename, b->filename) != 0) {
        return false;
    }
    if (a->has_offset && a->offset + a->length != b->offset) {
        return false;
    }
    return true;
}

/* Prints one entry; NEXT (may be NULL) is adjusted for human output. */
static int dump_entry(enum qi_output output, const struct map_entry *e,
                      struct map_entry *next)
{
    if (output == QI_OUTPUT_HUMAN) {
        if (e->data && !e->has_offset) {
            qi_error("File contains external, encrypted or compressed "
                     "clusters.");
            return -1;
        }
        if (e->data && !e->zero) {
            printf("%#-16" PRIx64 "%#-16" PRIx64 "%#-16" PRIx64 "%s\n",
                   e->start, e->length, e->has_offset ? e->offset : 0,
                   e->filename ? e->filename : "");
        }
        /*
         * This format does not tell unallocated, zero and zero-data ranges
         * apart; treating them alike lets more of them merge.
         */
        if (next && (!next->data || next->zero)) {
            next->data = false;
            next->zero = true;
        }
        return 0;
    }
    printf("{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
           ", \"depth\": %d, \"present\": %s, \"zero\": %s, \"data\": %s",
           e->start, e->length, e->depth, e->present ? "true" : "false",
           e->zero ? "true" : "false", e->data ? "true" : "false");
    if (e->has_offset) {
        printf(", \"offset\": %" PRIu64, e->offset);
    }
    putchar('}');
    if (next) {
        puts(",");
    }
    return 0;
}

int qi_cmd_map(int argc, char **argv)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"output", required_argument, NULL, QI_OPT_OUTPUT},
        {"start-offset", required_argument, NULL, QI_OPT_START_OFFSET},
        {"max-length", required_argument, NULL, QI_OPT_MAX_LENGTH},
        {"force-share", no_argument, NULL, 'U'},
        {NULL, 0, NULL, 0},
    };
    const char *fmt = NULL;
    enum qi_output output = QI_OUTPUT_HUMAN;
    unsigned flags = 0;
    uint64_t start = 0;
    uint64_t max_length = 0;
    bool have_max = false;
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
        case QI_OPT_START_OFFSET:
            if (qi_cvtnum("start offset", optarg, &start) < 0) {
                return 1;
            }
            break;
        case QI_OPT_MAX_LENGTH:
            if (qi_cvtnum("max length", optarg, &max_length) < 0) {
                return 1;
            }
            have_max = true;
            break;
        default:
            return qi_getopt_error(c, argv);
        }
    }
    if (optind != argc - 1) {
        return qi_usage_error("Expecting one image file name");
    }
    const char *filename = argv[optind];

    struct qi_chain *ch;
    if (qi_chain_open(filename, fmt, flags, &ch) < 0) {
        return 1;
    }
    uint64_t length = qi_chain_size(ch);
    if (have_max && start + max_length < length) {
        length = start + max_length;
    }

    if (output == QI_OUTPUT_HUMAN) {
        printf("%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File");
    } else {
        putchar('[');
    }
    struct map_entry curr = {.start = start};
    struct map_entry next;
    int status = 0;
    while (curr.start + curr.length < length) {
        const uint64_t off = curr.start + curr.length;
        const uint64_t n = length - off < PROBE_MAX ? length - off : PROBE_MAX;
        const int ret = get_block_status(ch, off, n, &next);
        if (ret < 0) {
            qi_error("Could not read file metadata: %s", qsnap_strerror(ret));
            status = 1;
            goto out;
        }
        if (mergeable(&curr, &next)) {
            curr.length += next.length;
            continue;
        }
        if (curr.length > 0 && dump_entry(output, &curr, &next) < 0) {
            status = 1;
            goto out;
        }
        curr = next;
    }
    if (dump_entry(output, &curr, NULL) < 0) {
        status = 1;
        goto out;
    }
    if (output == QI_OUTPUT_JSON) {
        puts("]");
    }
out:
    fflush(stdout);
    qi_chain_close(ch);
    return status;
}
