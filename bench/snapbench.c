/*
 * snapbench.c - creates or deletes one internal snapshot through the
 * library, for timing against "qemu-img snapshot -c/-d".
 *
 *   snapbench [snapshot] -c NAME FILE
 *   snapbench [snapshot] -d NAME FILE
 *
 * Opens FILE read-write, calls qsnap_snapshot_create() or
 * qsnap_snapshot_delete(), and closes it (which flushes), just as the
 * snapshot command of an image tool does.  The optional first word lets
 * it stand in for "qsnap-img" in a "snapshot -c NAME FILE" command line.
 */
#include <stdio.h>
#include <string.h>

#include <qsnap.h>

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "snapshot") == 0) {
        argc--;
        argv++;
    }
    if (argc != 4 ||
        (strcmp(argv[1], "-c") != 0 && strcmp(argv[1], "-d") != 0)) {
        fprintf(stderr, "usage: snapbench [snapshot] -c|-d NAME FILE\n");
        return 2;
    }
    const bool create = strcmp(argv[1], "-c") == 0;
    const char *name = argv[2];
    const char *path = argv[3];
    struct qsnap_open_opts opts;
    qsnap_open_opts_init(&opts);
    opts.flags = QSNAP_OPEN_RDWR;
    char err[1024] = "";
    qsnap_image *img;
    int ret = qsnap_open(path, &opts, &img, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, "snapbench: %s\n", err[0] ? err : qsnap_strerror(ret));
        return 1;
    }
    ret = create ? qsnap_snapshot_create(img, name, NULL)
                 : qsnap_snapshot_delete(img, name);
    if (ret < 0) {
        fprintf(stderr, "snapbench: %s\n", qsnap_errmsg(img));
        qsnap_close(img);
        return 1;
    }
    ret = qsnap_close(img);
    if (ret < 0) {
        fprintf(stderr, "snapbench: closing %s: %s\n", path,
                qsnap_strerror(ret));
        return 1;
    }
    return 0;
}
