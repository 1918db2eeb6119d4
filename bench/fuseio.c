/*
 * fuseio.c - I/O patterns through a mounted file, timed.
 *
 *   fuseio seqread|seqwrite|randread|randwrite FILE BLOCK BYTES [direct]
 *
 * Moves BYTES bytes in BLOCK-sized requests: sequentially from offset 0,
 * or at random BLOCK-aligned offsets inside the file (a fixed xorshift
 * sequence, so every target sees the same offsets).  Writes end with
 * fdatasync(), inside the timing.  "direct" opens with O_DIRECT.  Prints
 * "SECONDS MIB_PER_S IOPS".
 */
#define _GNU_SOURCE

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

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

int main(int argc, char **argv)
{
    if (argc < 5 || argc > 6) {
        fprintf(stderr, "usage: fuseio seqread|seqwrite|randread|randwrite "
                        "FILE BLOCK BYTES [direct]\n");
        return 2;
    }
    const char *mode = argv[1];
    const int writing = strstr(mode, "write") != NULL;
    const int random = strncmp(mode, "rand", 4) == 0;
    const size_t block = strtoull(argv[3], NULL, 0);
    const uint64_t bytes = strtoull(argv[4], NULL, 0);
    const int direct = argc == 6 && strcmp(argv[5], "direct") == 0;
    int flags = writing ? O_WRONLY : O_RDONLY;
    if (direct) {
        flags |= O_DIRECT;
    }
    const int fd = open(argv[2], flags);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || block == 0) {
        fprintf(stderr, "fuseio: %s: %s\n", argv[2], strerror(errno));
        return 1;
    }
    const uint64_t size = (uint64_t)st.st_size;
    const uint64_t n_blocks = size / block;
    if (n_blocks == 0) {
        fprintf(stderr, "fuseio: %s is smaller than a block\n", argv[2]);
        return 1;
    }
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, block) != 0) {
        return 1;
    }
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    unsigned char *p = buf;
    for (size_t i = 0; i < block; i++) {
        p[i] = (unsigned char)(xorshift(&seed) | 1);
    }

    const uint64_t count = bytes / block;
    uint64_t rs = 0x2545f4914f6cdd1dull;
    const double t0 = now();
    for (uint64_t i = 0; i < count; i++) {
        const uint64_t blk = random ? xorshift(&rs) % n_blocks : i % n_blocks;
        const off_t off = (off_t)(blk * block);
        const ssize_t n =
            writing ? pwrite(fd, buf, block, off) : pread(fd, buf, block, off);
        if (n != (ssize_t)block) {
            fprintf(stderr, "fuseio: %s at %lld: %s\n", mode, (long long)off,
                    n < 0 ? strerror(errno) : "short transfer");
            return 1;
        }
    }
    if (writing && fdatasync(fd) != 0) {
        fprintf(stderr, "fuseio: fdatasync: %s\n", strerror(errno));
        return 1;
    }
    const double t = now() - t0;
    close(fd);
    free(buf);
    printf("%.4f %.1f %.0f\n", t, (double)(count * block) / t / 1048576.0,
           (double)count / t);
    return 0;
}
