/*
 * fuse_main.c - qsnap-fuse's command line, mount and session.
 *
 *   qsnap-fuse [-o rw,format=FMT,cache_size=N,direct_io,...] [-f] [-d] [-s]
 *              IMAGE MOUNTPOINT
 *
 * The image is opened before anything is mounted, so a missing, locked
 * or damaged image is reported on stderr with a non-zero exit status and
 * nothing is left behind.  Read-only mounts open it with
 * QSNAP_OPEN_FORCE_SHARE (no lock that would stop a running VM); -o rw
 * opens it read-write.  Then the filesystem is mounted, the process
 * detaches (unless -f or -d) and serves requests on a pool of threads
 * until unmounted (fusermount3 -u) or told to stop (SIGTERM, SIGINT,
 * SIGHUP); either way it unmounts, closes every handle and closes the
 * image, which flushes it.  The exit status is 1 if that flush failed.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <syslog.h>
#include <unistd.h>

#include "qsnap_fuse.h"

/* What the command line sets besides libfuse's own options. */
struct cmdline {
    char *image;
    char *format;
    char *cache_size;
    int rw;
    int direct_io;
};

enum { KEY_RW, KEY_RO };

static const struct fuse_opt opt_spec[] = {
    {"format=%s", offsetof(struct cmdline, format), 0},
    {"cache_size=%s", offsetof(struct cmdline, cache_size), 0},
    {"direct_io", offsetof(struct cmdline, direct_io), 1},
    FUSE_OPT_KEY("rw", KEY_RW),
    FUSE_OPT_KEY("ro", KEY_RO),
    FUSE_OPT_END,
};

static int opt_proc(void *data, const char *arg, int key,
                    struct fuse_args *outargs)
{
    struct cmdline *c = data;

    (void)outargs;
    switch (key) {
    case KEY_RW:
        c->rw = 1;
        return 1; /* the kernel mount is read-write too */
    case KEY_RO:
        c->rw = 0;
        return 1;
    case FUSE_OPT_KEY_NONOPT:
        if (!c->image) {
            c->image = strdup(arg);
            return c->image ? 0 : -1;
        }
        return 1; /* the mount point, for fuse_parse_cmdline() */
    default:
        return 1;
    }
}

static void usage(void)
{
    printf("usage: %s [options] IMAGE MOUNTPOINT\n"
           "\n"
           "Mounts the qcow2 or raw image IMAGE at MOUNTPOINT as a tree of\n"
           "files: disk, info.json, snapshots/NAME/{disk,info.json,vmstate/}\n"
           "and, for an overlay, backing/.  Unmount with fusermount3 -u.\n"
           "\n"
           "%s options:\n"
           "    -o rw                  open the image read-write (default:\n"
           "                           read-only, sharing it with a VM)\n"
           "    -o ro                  read-only (the default)\n"
           "    -o format=FMT          qcow2 or raw (default: probe)\n"
           "    -o cache_size=SIZE     metadata cache (bytes; K, M, G)\n"
           "    -o direct_io           do not use the kernel page cache\n"
           "\n",
           QF_PROG, QF_PROG);
}

/* Parses "123", "64K", "32M", "1G" into bytes. */
static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s) {
        return -EINVAL;
    }
    unsigned shift = 0;
    switch (*end) {
    case 'k':
    case 'K':
        shift = 10;
        end++;
        break;
    case 'm':
    case 'M':
        shift = 20;
        end++;
        break;
    case 'g':
    case 'G':
        shift = 30;
        end++;
        break;
    default:
        break;
    }
    if (*end || (shift && v > (UINT64_MAX >> shift))) {
        return -EINVAL;
    }
    *out = (uint64_t)v << shift;
    return 0;
}

/* Adds "-oNAME=VALUE", escaping the characters libfuse splits on. */
static int add_escaped_opt(struct fuse_args *args, const char *name,
                           const char *value)
{
    const size_t n = strlen(name) + 2 * strlen(value) + 4;
    char *s = malloc(n);
    if (!s) {
        return -1;
    }
    char *o = s + snprintf(s, n, "-o%s=", name);
    for (const char *p = value; *p; p++) {
        if (*p == ',' || *p == '\\') {
            *o++ = '\\';
        }
        *o++ = *p;
    }
    *o = '\0';
    const int ret = fuse_opt_add_arg(args, s);
    free(s);
    return ret;
}

/* -omax_read=QF_MAX_IO, as qf_init() sets conn->max_read. */
static int add_max_read(struct fuse_args *args)
{
    char opt[64];
    snprintf(opt, sizeof(opt), "-omax_read=%u", QF_MAX_IO);
    return fuse_opt_add_arg(args, opt);
}

static int open_image(struct qf_fs *fs, const struct cmdline *c)
{
    struct qsnap_open_opts o;
    char err[1024] = "";

    qsnap_open_opts_init(&o);
    o.flags = fs->o.rw ? QSNAP_OPEN_RDWR : QSNAP_OPEN_FORCE_SHARE;
    o.cache_size = fs->o.cache_size;
    if (!c->format) {
        o.format = QSNAP_FMT_AUTO;
    } else if (strcmp(c->format, "qcow2") == 0) {
        o.format = QSNAP_FMT_QCOW2;
    } else if (strcmp(c->format, "raw") == 0) {
        o.format = QSNAP_FMT_RAW;
    } else {
        fprintf(stderr, "%s: unknown format '%s' (qcow2 or raw)\n", QF_PROG,
                c->format);
        return -EINVAL;
    }
    const int ret = qsnap_open(fs->image_path, &o, &fs->img, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, "%s: %s\n", QF_PROG,
                err[0] ? err : qsnap_strerror(ret));
        return ret;
    }

    struct qsnap_info in;
    memset(&in, 0, sizeof(in));
    in.struct_size = sizeof(in);
    const int r = qsnap_get_info(fs->img, &in);
    if (r < 0) {
        fprintf(stderr, "%s: %s: %s\n", QF_PROG, fs->image_path,
                qsnap_strerror(r));
        return r;
    }
    atomic_store(&fs->size, in.virtual_size);
    if (fs->o.rw && in.corrupt) {
        fprintf(stderr, "%s: %s: the image is marked corrupt\n", QF_PROG,
                fs->image_path);
        return -EUCLEAN;
    }
    return 0;
}

/* Makes the backing layers' paths absolute: the daemon runs in "/". */
static int absolute_layers(struct qf_fs *fs)
{
    for (uint32_t i = 0; i < fs->n_layers; i++) {
        char *abs = realpath(fs->layers[i].path, NULL);
        if (abs) {
            free(fs->layers[i].path);
            fs->layers[i].path = abs;
        }
    }
    return 0;
}

static int run_session(struct qf_fs *fs, struct fuse_args *args,
                       const struct fuse_cmdline_opts *co)
{
    struct fuse_session *se =
        fuse_session_new(args, &qf_ops, sizeof(qf_ops), fs);
    int ret = 1;

    if (!se) {
        return 1;
    }
    fs->se = se;
    if (fuse_set_signal_handlers(se) != 0) {
        goto destroy;
    }
    if (fuse_session_mount(se, co->mountpoint) != 0) {
        goto handlers;
    }
    if (fuse_daemonize(co->foreground) != 0) {
        goto unmount;
    }
    if (!co->foreground) {
        openlog(QF_PROG, LOG_PID, LOG_DAEMON);
    }
    if (co->singlethread) {
        ret = fuse_session_loop(se);
    } else {
        struct fuse_loop_config *cfg = fuse_loop_cfg_create();
        if (!cfg) {
            goto unmount;
        }
        fuse_loop_cfg_set_clone_fd(cfg, (unsigned)co->clone_fd);
        /* UINT_MAX: not given, keep libfuse's default. */
        if (co->max_idle_threads != UINT_MAX) {
            fuse_loop_cfg_set_idle_threads(cfg, co->max_idle_threads);
        }
        if (co->max_threads != UINT_MAX) {
            fuse_loop_cfg_set_max_threads(cfg, co->max_threads);
        }
        ret = fuse_session_loop_mt(se, cfg);
        fuse_loop_cfg_destroy(cfg);
    }
    /* A stop by signal is the normal way out, not a failure. */
    if (ret == SIGTERM || ret == SIGINT || ret == SIGHUP || ret == -SIGTERM ||
        ret == -SIGINT || ret == -SIGHUP) {
        ret = 0;
    }
    ret = ret != 0;
unmount:
    fuse_session_unmount(se);
handlers:
    fuse_remove_signal_handlers(se);
destroy:
    fuse_session_destroy(se);
    qf_release_all(fs);
    fs->se = NULL;
    return ret;
}

int main(int argc, char **argv)
{
    struct fuse_args args = FUSE_ARGS_INIT(argc, argv);
    struct fuse_cmdline_opts co;
    struct cmdline c;
    struct qf_fs fs;
    int status = 1;

    memset(&co, 0, sizeof(co));
    memset(&c, 0, sizeof(c));
    memset(&fs, 0, sizeof(fs));
    if (fuse_opt_parse(&args, &c, opt_spec, opt_proc) != 0) {
        goto out;
    }
    if (fuse_parse_cmdline(&args, &co) != 0) {
        goto out;
    }
    if (co.show_help) {
        usage();
        fflush(stdout);
        fuse_cmdline_help();
        fuse_lowlevel_help();
        status = 0;
        goto out;
    }
    if (co.show_version) {
        printf("%s (libqsnap %s, libfuse %s)\n", QF_PROG, qsnap_version(),
               fuse_pkgversion());
        fflush(stdout);
        fuse_lowlevel_version();
        status = 0;
        goto out;
    }
    if (!c.image || !co.mountpoint) {
        fprintf(stderr,
                "%s: expecting an image and a mount point\n"
                "Try '%s --help' for more information.\n",
                QF_PROG, QF_PROG);
        goto out;
    }
    fs.o.rw = c.rw;
    fs.o.direct_io = c.direct_io;
    fs.o.foreground = co.foreground;
    fs.o.debug = co.debug;
    if (c.cache_size && parse_size(c.cache_size, &fs.o.cache_size) < 0) {
        fprintf(stderr, "%s: invalid cache_size '%s'\n", QF_PROG, c.cache_size);
        goto out;
    }
    fs.image_path = realpath(c.image, NULL);
    if (!fs.image_path) {
        fprintf(stderr, "%s: %s: %s\n", QF_PROG, c.image, strerror(errno));
        goto out;
    }
    fs.uid = getuid();
    fs.gid = getgid();
    clock_gettime(CLOCK_REALTIME, &fs.start);

    if (open_image(&fs, &c) < 0) {
        goto out;
    }
    int ret = qf_fs_init(&fs);
    if (ret < 0) {
        fprintf(stderr, "%s: %s: %s\n", QF_PROG, fs.image_path,
                qsnap_errmsg(fs.img)[0] ? qsnap_errmsg(fs.img)
                                        : qsnap_strerror(ret));
        goto fini;
    }
    absolute_layers(&fs);

    /* Mount options: read-only unless asked, permissions by the kernel. */
    if ((!fs.o.rw && fuse_opt_add_arg(&args, "-oro") != 0) ||
        fuse_opt_add_arg(&args, "-odefault_permissions") != 0 ||
        fuse_opt_add_arg(&args, "-osubtype=qsnap") != 0 ||
        add_escaped_opt(&args, "fsname", fs.image_path) != 0 ||
        add_max_read(&args) != 0) {
        fprintf(stderr, "%s: %s\n", QF_PROG, strerror(ENOMEM));
        goto fini;
    }
    status = run_session(&fs, &args, &co);

fini:
    qf_fs_fini(&fs);
out:
    if (fs.img) {
        const int ret2 = qsnap_close(fs.img);
        if (ret2 < 0) {
            qf_log(&fs, "%s: closing failed: %s", fs.image_path,
                   qsnap_strerror(ret2));
            status = 1;
        }
    }
    free(fs.image_path);
    free(co.mountpoint);
    free(c.image);
    free(c.format);
    free(c.cache_size);
    fuse_opt_free_args(&args);
    return status;
}
