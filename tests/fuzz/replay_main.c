/*
 * replay_main.c - runs a fuzz harness over saved inputs, without libFuzzer.
 *
 *   replay-NAME [-v] PATH...
 *
 * Each PATH that is a file, and every regular file directly inside each
 * PATH that is a directory (in name order), is read into a buffer of
 * exactly its size and passed to LLVMFuzzerTestOneInput once.  -v names
 * each input before it runs, so a crash can be traced to its file.
 * Exit status: 0 when every input ran, 1 when a path could not be read,
 * 2 on a usage error.  A harness that finds a bug aborts.
 */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "fuzz_util.h"

static bool verbose;
static unsigned long n_inputs;

static int run_file(const char *path)
{
    uint8_t *data = NULL;
    size_t len = 0;
    const int rc = fz_slurp(path, &data, &len);

    if (rc < 0) {
        fprintf(stderr, "replay: %s: %s\n", path, strerror(-rc));
        return 1;
    }
    if (verbose) {
        printf("replay: %s (%zu bytes)\n", path, len);
        fflush(stdout);
    }
    LLVMFuzzerTestOneInput(data, len);
    free(data);
    n_inputs++;
    return 0;
}

static int only_files(const struct dirent *e)
{
    return e->d_name[0] != '.';
}

static int run_dir(const char *dir)
{
    struct dirent **names = NULL;
    char path[PATH_MAX];
    int status = 0;
    const int n = scandir(dir, &names, only_files, alphasort);

    if (n < 0) {
        fprintf(stderr, "replay: %s: %s\n", dir, strerror(errno));
        return 1;
    }
    for (int i = 0; i < n; i++) {
        struct stat st;

        if (snprintf(path, sizeof(path), "%s/%s", dir, names[i]->d_name) >=
            (int)sizeof(path)) {
            fprintf(stderr, "replay: %s/%s: name too long\n", dir,
                    names[i]->d_name);
            status = 1;
        } else if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            status |= run_file(path);
        }
        free(names[i]);
    }
    free(names);
    return status;
}

int main(int argc, char **argv)
{
    int status = 0;
    int first = 1;

    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        verbose = true;
        first = 2;
    }
    if (first >= argc) {
        fprintf(stderr, "usage: %s [-v] FILE|DIR...\n", argv[0]);
        return 2;
    }
    LLVMFuzzerInitialize(&argc, &argv);
    for (int i = first; i < argc; i++) {
        struct stat st;

        if (stat(argv[i], &st) < 0) {
            fprintf(stderr, "replay: %s: %s\n", argv[i], strerror(errno));
            status = 1;
        } else if (S_ISDIR(st.st_mode)) {
            status |= run_dir(argv[i]);
        } else {
            status |= run_file(argv[i]);
        }
    }
    printf("replay: %lu inputs\n", n_inputs);
    return status;
}
