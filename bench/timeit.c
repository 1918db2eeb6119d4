/*
 * timeit.c - runs a command and records how long it took.
 *
 *   timeit RESULT_FILE COMMAND [ARG...]
 *
 * Runs COMMAND (searched in $PATH) with the same standard streams and
 * writes "WALL USER SYS" (seconds, wall clock from fork to exit, and the
 * command's CPU time) to RESULT_FILE.  Exits with the command's status.
 */
#define _DEFAULT_SOURCE

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double tv_sec(const struct timeval *tv)
{
    return (double)tv->tv_sec + (double)tv->tv_usec / 1e6;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: timeit RESULT_FILE COMMAND [ARG...]\n");
        return 2;
    }
    FILE *res = fopen(argv[1], "w");
    if (!res) {
        fprintf(stderr, "timeit: %s: %s\n", argv[1], strerror(errno));
        return 2;
    }
    const double t0 = now();
    const pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "timeit: fork: %s\n", strerror(errno));
        fclose(res);
        return 2;
    }
    if (pid == 0) {
        fclose(res);
        execvp(argv[2], argv + 2);
        fprintf(stderr, "timeit: %s: %s\n", argv[2], strerror(errno));
        _exit(127);
    }
    int status;
    struct rusage ru;
    while (wait4(pid, &status, 0, &ru) < 0) {
        if (errno != EINTR) {
            fprintf(stderr, "timeit: wait: %s\n", strerror(errno));
            fclose(res);
            return 2;
        }
    }
    const double t1 = now();
    fprintf(res, "%.6f %.6f %.6f\n", t1 - t0, tv_sec(&ru.ru_utime),
            tv_sec(&ru.ru_stime));
    if (fclose(res) != 0) {
        return 2;
    }
    if (WIFEXITED(status)) {
        return WEXITSTATUS(status);
    }
    return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}
