/*
 * cmd_vmstate.c - "qsnap-img vmstate": the VM state of a snapshot.
 *
 *   vmstate store [-f fmt] filename snapshot dir
 *   vmstate list [-f fmt] [--output=human|json] [-U] filename snapshot
 *   vmstate extract [-f fmt] [-U] filename snapshot dir
 *   vmstate dump [-f fmt] [-U] filename snapshot out
 *
 * store makes a new checkpoint (a snapshot with VM state) whose state is
 * the section container of docs/vmstate-format.md, one section per
 * regular file of DIR; list shows the sections of a snapshot (or that it
 * holds QEMU's raw migration stream); extract writes each section back
 * into a file of DIR; dump writes the raw bytes of the VM state area,
 * whichever kind it holds.  Files are streamed in 1 MiB pieces, and
 * all-zero pieces are left as holes in the files written.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "qsnap_img.h"

/* The unit of every copy in and out of a VM state. */
#define PIECE (1024u * 1024u)

/* DIR/NAME into BUF (PATH_MAX bytes); prints the error if too long. */
static int join_path(char *buf, const char *dir, const char *name)
{
    const int n = snprintf(buf, PATH_MAX, "%s/%s", dir, name);
    if (n < 0 || n >= PATH_MAX) {
        qi_error("'%s/%s': %s", dir, name, strerror(ENAMETOOLONG));
        return -ENAMETOOLONG;
    }
    return 0;
}

/* ------------------------------------------------------------ store */

/* Names in byte order, independent of the locale. */
static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void free_names(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(names[i]);
    }
    free(names);
}

/*
 * The names of the regular files of DIR (symbolic links followed), sorted.
 * Prints the error and returns -1 on failure.
 */
static int list_files(const char *dir, char ***out, size_t *count)
{
    DIR *d = opendir(dir);
    char **names = NULL;
    size_t n = 0;
    size_t cap = 0;

    if (!d) {
        qi_error("Could not open directory '%s': %s", dir, strerror(errno));
        return -1;
    }
    for (;;) {
        errno = 0;
        const struct dirent *e = readdir(d);
        if (!e) {
            if (errno != 0) {
                qi_error("Could not read directory '%s': %s", dir,
                         strerror(errno));
                goto fail;
            }
            break;
        }
        struct stat st;
        if (fstatat(dirfd(d), e->d_name, &st, 0) < 0) {
            qi_error("Could not stat '%s/%s': %s", dir, e->d_name,
                     strerror(errno));
            goto fail;
        }
        if (!S_ISREG(st.st_mode)) {
            continue;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            char **v = realloc(names, cap * sizeof(*v));
            if (!v) {
                goto nomem;
            }
            names = v;
        }
        names[n] = strdup(e->d_name);
        if (!names[n]) {
            goto nomem;
        }
        n++;
    }
    closedir(d);
    if (n > 0) {
        qsort(names, n, sizeof(*names), cmp_names);
    }
    *out = names;
    *count = n;
    return 0;
nomem:
    qi_error("%s", qsnap_strerror(-ENOMEM));
fail:
    closedir(d);
    free_names(names, n);
    return -1;
}

/*
 * Streams the file DIR/NAME into a new section NAME of CK.  Returns 0, or
 * a negative errno after printing the message (prefixed with PREFIX).
 */
static int store_file(qsnap_checkpoint *ck, qsnap_image *img,
                      const char *filename, const char *dir, const char *name,
                      void *buf, const char *prefix)
{
    char path[PATH_MAX];
    int ret = join_path(path, dir, name);

    if (ret < 0) {
        return ret;
    }
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        ret = -errno;
        qi_error("%s%s: %s", prefix, path, strerror(-ret));
        return ret;
    }
    ret = qsnap_checkpoint_section_begin(ck, name);
    while (ret == 0) {
        const ssize_t got = read(fd, buf, PIECE);
        if (got < 0 && errno == EINTR) {
            continue;
        }
        if (got < 0) {
            ret = -errno;
            qi_error("%s%s: %s", prefix, path, strerror(-ret));
            close(fd);
            return ret;
        }
        if (got == 0) {
            break;
        }
        ret = qsnap_checkpoint_section_write(ck, buf, (size_t)got);
    }
    if (ret == 0) {
        ret = qsnap_checkpoint_section_end(ck);
    }
    if (ret < 0) {
        qi_error("%s%s", prefix, qi_errmsg(img, ret));
    }
    close(fd);
    return ret;
}

int qi_vmstate_store(qsnap_image *img, const char *filename, const char *name,
                     const char *dir)
{
    char prefix[512];
    char **names;
    size_t n;

    snprintf(prefix, sizeof(prefix), "Could not create snapshot '%s': ", name);
    if (list_files(dir, &names, &n) < 0) {
        return -EIO;
    }
    if (n == 0) {
        qi_error("%sno regular files in '%s'", prefix, dir);
        free_names(names, n);
        return -ENOENT;
    }
    void *buf = malloc(PIECE);
    if (!buf) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
        free_names(names, n);
        return -ENOMEM;
    }

    struct qsnap_snapshot_opts opts;
    qsnap_checkpoint *ck;
    qi_snapshot_opts_init(&opts);
    int ret = qsnap_checkpoint_begin(img, name, &opts,
                                     QSNAP_CHECKPOINT_SECTIONS, &ck);
    if (ret < 0) {
        qi_error("%s%d (%s)", prefix, ret, qsnap_strerror(ret));
        goto out;
    }
    for (size_t i = 0; i < n && ret == 0; i++) {
        ret = store_file(ck, img, filename, dir, names[i], buf, prefix);
    }
    if (ret < 0) {
        qsnap_checkpoint_abort(ck);
        goto out;
    }
    ret = qsnap_checkpoint_commit(ck);
    if (ret < 0) {
        qi_error("%s%s", prefix, qi_errmsg(img, ret));
    }
out:
    free(buf);
    free_names(names, n);
    return ret;
}

/* ------------------------------------------------------------ reading */

/* An image and the VM state of one of its snapshots, open for reading. */
struct source {
    const char *filename;
    qsnap_image *img;
    qsnap_vmstate *vs;
    char *id;
    char *name;
};

static void source_close(struct source *s)
{
    if (s->vs) {
        qsnap_vmstate_close(s->vs);
    }
    if (s->img) {
        qsnap_close(s->img);
    }
    free(s->id);
    free(s->name);
}

/*
 * Opens FILENAME read-only and the VM state of its snapshot SNAPSHOT (an
 * ID or a name).  Prints the error and returns -1 on failure.
 */
static int source_open(struct source *s, const char *filename, const char *fmt,
                       unsigned flags, const char *snapshot)
{
    struct qsnap_snapshot_info *list;
    uint32_t n;

    memset(s, 0, sizeof(*s));
    s->filename = filename;
    if (qi_open(filename, fmt, flags, &s->img) < 0) {
        return -1;
    }
    if (qi_snapshot_list(s->img, filename, &list, &n) < 0) {
        source_close(s);
        return -1;
    }
    const int i = qi_snapshot_find_id_or_name(list, n, snapshot);
    if (i >= 0) {
        s->id = strdup(list[i].id);
        s->name = strdup(list[i].name);
    }
    qsnap_snapshot_list_free(list, n);
    if (i < 0) {
        qi_error("Could not open the VM state of snapshot '%s': snapshot "
                 "not found",
                 snapshot);
        source_close(s);
        return -1;
    }
    if (!s->id || !s->name) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
        source_close(s);
        return -1;
    }
    /* The ID found is unique, and IDs are matched first. */
    const int ret = qsnap_vmstate_open(s->img, s->id, &s->vs);
    if (ret < 0) {
        s->vs = NULL;
        qi_error("Could not open the VM state of snapshot '%s': %s", snapshot,
                 ret == -ENODATA
                     ? "the snapshot has no VM state"
                     : qi_errmsg(s->img, ret));
        source_close(s);
        return -1;
    }
    return 0;
}

/* Reads LEN bytes at OFFSET of what is being copied out. */
typedef int (*read_fn)(struct source *s, const char *section, void *buf,
                       size_t len, uint64_t offset);

static int read_area(struct source *s, const char *section, void *buf,
                     size_t len, uint64_t offset)
{
    (void)section;
    return qsnap_vmstate_pread(s->vs, buf, len, offset);
}

static int read_section(struct source *s, const char *section, void *buf,
                        size_t len, uint64_t offset)
{
    return qsnap_vmstate_section_pread(s->vs, section, buf, len, offset);
}

static int write_all(int fd, const uint8_t *p, size_t len, uint64_t offset)
{
    while (len > 0) {
        const ssize_t n = pwrite(fd, p, len, (off_t)offset);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n < 0) {
            return -errno;
        }
        p += n;
        len -= (size_t)n;
        offset += (uint64_t)n;
    }
    return 0;
}

/*
 * Copies SIZE bytes read by RD (of SECTION) into a new file PATH; pieces
 * of zeros become holes.  Prints the error and returns -1 on failure.
 */
static int copy_out(struct source *s, read_fn rd, const char *section,
                    uint64_t size, const char *path)
{
    uint8_t *buf = malloc(PIECE);
    int ret = 0;

    if (!buf) {
        qi_error("%s", qsnap_strerror(-ENOMEM));
        return -1;
    }
    const int fd =
        open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, (mode_t)0644);
    if (fd < 0) {
        qi_error("Could not create '%s': %s", path, strerror(errno));
        free(buf);
        return -1;
    }
    for (uint64_t off = 0; off < size && ret == 0; off += PIECE) {
        const size_t len = size - off < PIECE ? (size_t)(size - off) : PIECE;
        ret = rd(s, section, buf, len, off);
        if (ret < 0) {
            qi_error("Could not read the VM state of snapshot '%s' at byte "
                     "%" PRIu64 ": %s",
                     s->name, off,
                     qi_errmsg(s->img, ret));
            break;
        }
        if (!qi_is_zero(buf, len)) {
            ret = write_all(fd, buf, len, off);
            if (ret < 0) {
                qi_error("Could not write '%s': %s", path, strerror(-ret));
            }
        }
    }
    if (ret == 0 && ftruncate(fd, (off_t)size) < 0) {
        ret = -errno;
        qi_error("Could not write '%s': %s", path, strerror(-ret));
    }
    if (close(fd) < 0 && ret == 0) {
        ret = -errno;
        qi_error("Could not write '%s': %s", path, strerror(-ret));
    }
    free(buf);
    return ret < 0 ? -1 : 0;
}

/* The sections of S's container; prints and fails for a raw stream. */
static int get_sections(struct source *s, struct qsnap_section_info **list,
                        uint32_t *n)
{
    const int ret = qsnap_vmstate_sections(s->vs, list, n);
    if (ret < 0) {
        qi_error("Could not list the VM state sections of snapshot '%s': %s",
                 s->name, qi_errmsg(s->img, ret));
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------ commands */

/* Options shared by the subcommands that read. */
struct read_opts {
    const char *fmt;
    unsigned flags;
    enum qi_output output;
};

/*
 * Parses the options of subcommand argv[0] and checks that N_ARGS
 * arguments follow (USAGE names them).  Returns the index of the first
 * argument, or -1 after printing the error.  --output is accepted only if
 * WITH_OUTPUT; -U only if READ_ONLY.
 */
static int parse_args(int argc, char **argv, int n_args, const char *usage,
                      bool read_only, bool with_output, struct read_opts *ro)
{
    static const struct option long_opts[] = {
        {"help", no_argument, NULL, 'h'},
        {"format", required_argument, NULL, 'f'},
        {"force-share", no_argument, NULL, 'U'},
        {"output", required_argument, NULL, QI_OPT_OUTPUT},
        {NULL, 0, NULL, 0},
    };
    int c;

    memset(ro, 0, sizeof(*ro));
    ro->flags = read_only ? 0 : QSNAP_OPEN_RDWR;
    ro->output = QI_OUTPUT_HUMAN;
    while ((c = getopt_long(argc, argv,
                            read_only ? QI_GETOPT_PREFIX "f:hU"
                                      : QI_GETOPT_PREFIX "f:h",
                            long_opts, NULL)) != -1) {
        switch (c) {
        case 'f':
            ro->fmt = optarg;
            break;
        case 'h':
            qi_help();
        case 'U': /* only in the option string when READ_ONLY */
            ro->flags |= QSNAP_OPEN_FORCE_SHARE;
            break;
        case QI_OPT_OUTPUT:
            if (!with_output) {
                qi_getopt_error('?', argv);
                return -1;
            }
            if (qi_parse_output(optarg, &ro->output) < 0) {
                return -1;
            }
            break;
        default:
            qi_getopt_error(c, argv);
            return -1;
        }
    }
    if (argc - optind != n_args) {
        qi_usage_error("Expecting %s", usage);
        return -1;
    }
    return optind;
}

static int vm_store(int argc, char **argv)
{
    struct read_opts ro;
    const int a = parse_args(argc, argv, 3,
                             "image file name, snapshot name and directory",
                             false, false, &ro);
    if (a < 0) {
        return 1;
    }
    const char *filename = argv[a];
    qsnap_image *img;
    if (qi_open(filename, ro.fmt, ro.flags, &img) < 0) {
        return 1;
    }
    int ret = qi_vmstate_store(img, filename, argv[a + 1], argv[a + 2]);
    if (qi_close(img, filename) < 0) {
        ret = -1;
    }
    return ret < 0 ? 1 : 0;
}

static void list_human(const struct source *s,
                       const struct qsnap_section_info *sec, uint32_t n)
{
    char size[64];
    char stored[64];

    qi_human_size(qsnap_vmstate_size(s->vs), size, sizeof(size));
    printf("Snapshot '%s' (ID %s) holds %" PRIu32 " VM state section%s "
           "in %s (%" PRIu64 " bytes):\n",
           s->name, s->id, n, n == 1 ? "" : "s", size,
           qsnap_vmstate_size(s->vs));
    printf("%12s %12s  %s\n", "SIZE", "STORED SIZE", "NAME");
    for (uint32_t i = 0; i < n; i++) {
        qi_human_size(sec[i].size, size, sizeof(size));
        qi_human_size(sec[i].stored_size, stored, sizeof(stored));
        printf("%12s %12s  %s\n", size, stored, sec[i].name);
    }
}

static int list_json(const struct source *s,
                     const struct qsnap_section_info *sec, uint32_t n)
{
    const bool sections = qsnap_vmstate_has_sections(s->vs);
    struct qi_json *obj = qi_json_new();
    if (obj) {
        qi_json_str(obj, "id", s->id);
        qi_json_str(obj, "name", s->name);
        qi_json_str(obj, "type", sections ? "sections" : "raw");
        qi_json_uint(obj, "size", qsnap_vmstate_size(s->vs));
        struct qi_json *arr = sections ? qi_json_array(obj, "sections") : NULL;
        for (uint32_t i = 0; arr && i < n; i++) {
            struct qi_json *o = qi_json_append_obj(arr);
            if (o) {
                qi_json_str(o, "name", sec[i].name);
                qi_json_uint(o, "size", sec[i].size);
                qi_json_uint(o, "stored-size", sec[i].stored_size);
            }
        }
    }
    const bool ok = !qi_json_failed(obj);
    if (ok) {
        qi_json_print(stdout, obj);
    } else {
        qi_error("%s", qsnap_strerror(-ENOMEM));
    }
    qi_json_free(obj);
    return ok ? 0 : -1;
}

static int vm_list(int argc, char **argv)
{
    struct read_opts ro;
    struct source s;
    struct qsnap_section_info *sec = NULL;
    uint32_t n = 0;
    int ret = 0;

    const int a = parse_args(argc, argv, 2, "image file name and snapshot",
                             true, true, &ro);
    if (a < 0 || source_open(&s, argv[a], ro.fmt, ro.flags, argv[a + 1]) < 0) {
        return 1;
    }
    const bool sections = qsnap_vmstate_has_sections(s.vs);
    if (sections) {
        ret = get_sections(&s, &sec, &n);
    }
    if (ret < 0) {
        /* Printed already. */
    } else if (ro.output == QI_OUTPUT_JSON) {
        ret = list_json(&s, sec, n);
    } else if (sections) {
        list_human(&s, sec, n);
    } else {
        printf("Snapshot '%s' (ID %s) holds a raw (QEMU) VM state stream of "
               "%" PRIu64 " bytes\n",
               s.name, s.id, qsnap_vmstate_size(s.vs));
    }
    free(sec);
    source_close(&s);
    return ret < 0 ? 1 : 0;
}

/* True if NAME can be a file name inside a directory. */
static bool safe_name(const char *name)
{
    return name[0] != '\0' && strchr(name, '/') == NULL &&
           strcmp(name, ".") != 0 && strcmp(name, "..") != 0;
}

static int vm_extract(int argc, char **argv)
{
    struct read_opts ro;
    struct source s;
    struct qsnap_section_info *sec = NULL;
    uint32_t n = 0;
    int ret = -1;

    const int a =
        parse_args(argc, argv, 3, "image file name, snapshot and directory",
                   true, false, &ro);
    if (a < 0 || source_open(&s, argv[a], ro.fmt, ro.flags, argv[a + 1]) < 0) {
        return 1;
    }
    const char *dir = argv[a + 2];
    if (!qsnap_vmstate_has_sections(s.vs)) {
        qi_error("Snapshot '%s' holds a raw (QEMU) VM state stream, not "
                 "sections; use 'vmstate dump' to save it",
                 s.name);
        goto out;
    }
    if (get_sections(&s, &sec, &n) < 0) {
        goto out;
    }
    /* Refuse every unsafe name before anything is written. */
    for (uint32_t i = 0; i < n; i++) {
        if (!safe_name(sec[i].name)) {
            qi_error("Refusing to extract VM state section '%s' of snapshot "
                     "'%s': the name is not a plain file name",
                     sec[i].name, s.name);
            goto out;
        }
    }
    if (mkdir(dir, 0777) < 0 && errno != EEXIST) {
        qi_error("Could not create directory '%s': %s", dir, strerror(errno));
        goto out;
    }
    ret = 0;
    for (uint32_t i = 0; i < n && ret == 0; i++) {
        char path[PATH_MAX];
        ret = join_path(path, dir, sec[i].name);
        if (ret == 0) {
            ret = copy_out(&s, read_section, sec[i].name, sec[i].size, path);
        }
    }
out:
    free(sec);
    source_close(&s);
    return ret < 0 ? 1 : 0;
}

static int vm_dump(int argc, char **argv)
{
    struct read_opts ro;
    struct source s;

    const int a = parse_args(argc, argv, 3,
                             "image file name, snapshot and output file name",
                             true, false, &ro);
    if (a < 0 || source_open(&s, argv[a], ro.fmt, ro.flags, argv[a + 1]) < 0) {
        return 1;
    }
    const int ret =
        copy_out(&s, read_area, NULL, qsnap_vmstate_size(s.vs), argv[a + 2]);
    source_close(&s);
    return ret < 0 ? 1 : 0;
}

int qi_cmd_vmstate(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*run)(int argc, char **argv);
    } subs[] = {
        {"store", vm_store},
        {"list", vm_list},
        {"extract", vm_extract},
        {"dump", vm_dump},
    };

    if (argc < 2) {
        return qi_usage_error("Expecting a subcommand: store, list, extract "
                              "or dump");
    }
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        qi_help();
    }
    for (size_t i = 0; i < sizeof(subs) / sizeof(subs[0]); i++) {
        if (strcmp(argv[1], subs[i].name) == 0) {
            return subs[i].run(argc - 1, argv + 1);
        }
    }
    return qi_usage_error("Unknown vmstate subcommand '%s'", argv[1]);
}
