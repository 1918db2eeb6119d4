/*
 * rawread.c - the plain-file baseline for sequential reads.
 *
 *   rawread FILE BUFFER_SIZE COUNT
 *
 * Reads COUNT buffers of BUFFER_SIZE bytes with pread(), one after the
 * other from offset 0, starting over at 0 when the next buffer would
 * cross the end of the file (the same walk "qsnap-img bench" makes).
 * Prints "Run completed in S seconds." like the bench commands.
 */
#define _DEFAULT_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: rawread FILE BUFFER_SIZE COUNT\n");
        return 2;
    }
    const size_t bufsize = strtoull(argv[2], NULL, 0);
    const uint64_t count = strtoull(argv[3], NULL, 0);
    const int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        fprintf(stderr, "rawread: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    const uint64_t size = (uint64_t)st.st_size;
    void *buf = NULL;
    if (bufsize == 0 || bufsize > size ||
        posix_memalign(&buf, 4096, bufsize) != 0) {
        fprintf(stderr, "rawread: bad buffer size %zu\n", bufsize);
        close(fd);
        return 1;
    }
    uint64_t off = 0;
    const double t0 = now();
    for (uint64_t i = 0; i < count; i++) {
        if (off + bufsize > size) {
            off = 0;
        }
        size_t done = 0;
        while (done < bufsize) {
            const ssize_t n = pread(fd, (char *)buf + done, bufsize - done,
                                    (off_t)(off + done));
            if (n <= 0) {
                fprintf(stderr, "rawread: %s: %s\n", argv[1],
                        n < 0 ? strerror(errno) : "unexpected end of file");
                free(buf);
                close(fd);
                return 1;
            }
            done += (size_t)n;
        }
        off += bufsize;
    }
    const double t1 = now();
    printf("Run completed in %.3f seconds.\n", t1 - t0);
    free(buf);
    close(fd);
    return 0;
}
