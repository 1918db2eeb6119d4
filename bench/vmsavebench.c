/*
 * vmsavebench.c - times saving a guest memory image as VM state.
 *
 *   vmsavebench sections|raw|raw-direct IMAGE [SIZE]
 *
 * Builds SIZE bytes (default 2 GiB) of guest-like memory, page-aligned as
 * guest RAM is, creates IMAGE (qcow2, 1 GiB disk, 64 KiB clusters) and
 * saves the memory in one checkpoint, either through the section
 * container (a section "ram", written with
 * qsnap_checkpoint_section_write) or as a raw stream
 * (qsnap_checkpoint_write); raw-direct is the raw stream with the image
 * opened QSNAP_OPEN_NOCACHE, so that it goes past the page cache as the
 * container's writes do.  All write 1 MiB at a time, as a VMM's
 * migration loop would.  The time runs from qsnap_checkpoint_begin() to
 * the end of qsnap_flush() after the commit, so the state is on disk.
 *
 * The memory: runs of 1..512 pages alternate between zero pages and data
 * pages, so about half the pages are zero and most zero runs span whole
 * container chunks.  A data page is a copy of one of 1024 template pages
 * (log text, kernel-like structures holding pointers and counters, or
 * random bytes) with four 8-byte words overwritten by random values.  The
 * content is the same on every run.
 *
 * Prints one line: seconds=S cpu=S vm_state_size=B file_size=B
 * disk_usage=B zero_pages=PERCENT (cpu: user + system time of the save).
 */
#define _DEFAULT_SOURCE

#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <qsnap.h>

#define PAGE 4096u
#define N_TEMPLATES 1024u
#define WRITE_SIZE (1024u * 1024)
#define DISK_SIZE (1024ull * 1024 * 1024)

static uint64_t rng_state = 0x243f6a8885a308d3ull;

static uint64_t rng(void)
{
    uint64_t x = rng_state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng_state = x;
    return x * 0x2545f4914f6cdd1dull;
}

static const char *const words[] = {
    "systemd", "kworker", "ext4",  "inode", "dentry",   "socket", "tcp",
    "listen",  "accept",  "mmap",  "brk",   "futex",    "epoll",  "read",
    "write",   "open",    "close", "/usr",  "/lib",     "/var",   "/etc",
    "libc.so", "nginx",   "GET",   "POST",  "HTTP/1.1", "200",    "404",
    "user",    "id",      "name",  "value", "true",     "false",  "null",
};

#define N_WORDS (sizeof(words) / sizeof(words[0]))

static void template_text(uint8_t *p)
{
    size_t pos = 0;
    while (pos < PAGE) {
        const char *w = words[rng() % N_WORDS];
        size_t n = strlen(w);
        if (n > PAGE - pos) {
            n = PAGE - pos;
        }
        memcpy(p + pos, w, n);
        pos += n;
        if (pos < PAGE) {
            p[pos++] = (rng() % 9 == 0) ? '\n' : ' ';
        }
    }
}

/* Arrays of 64-byte records: pointers, small counters, flags, padding. */
static void template_struct(uint8_t *p)
{
    const uint64_t base = 0xffff888000000000ull + ((rng() % 4096) << 20);
    for (size_t off = 0; off < PAGE; off += 64) {
        uint64_t rec[8];
        rec[0] = base + (rng() % 65536) * 64;
        rec[1] = base + (rng() % 65536) * 64;
        rec[2] = rng() % 1000;
        rec[3] = (rng() % 4) ? 0 : rng() % 65536;
        rec[4] = 0x0000000100000001ull * (rng() % 3);
        rec[5] = 0;
        rec[6] = rng() % 2 ? 0xdead4ead00000000ull : 0;
        rec[7] = off / 64;
        memcpy(p + off, rec, sizeof(rec));
    }
}

static void template_random(uint8_t *p)
{
    for (size_t off = 0; off < PAGE; off += 8) {
        const uint64_t r = rng();
        memcpy(p + off, &r, 8);
    }
}

/* Fills mem[0..size) as described at the top; returns zero pages. */
static uint64_t fill_memory(uint8_t *mem, uint64_t size)
{
    uint8_t *tpl = malloc((size_t)N_TEMPLATES * PAGE);
    if (!tpl) {
        return UINT64_MAX;
    }
    for (unsigned i = 0; i < N_TEMPLATES; i++) {
        const unsigned kind = (unsigned)(rng() % 10);
        uint8_t *p = tpl + (size_t)i * PAGE;
        if (kind < 4) {
            template_text(p);
        } else if (kind < 8) {
            template_struct(p);
        } else {
            template_random(p);
        }
    }
    const uint64_t n_pages = size / PAGE;
    uint64_t zero_pages = 0;
    bool zero = true;
    for (uint64_t pg = 0; pg < n_pages;) {
        uint64_t run = 1 + rng() % 512;
        if (run > n_pages - pg) {
            run = n_pages - pg;
        }
        for (uint64_t i = 0; i < run; i++) {
            uint8_t *p = mem + (pg + i) * PAGE;
            if (zero) {
                memset(p, 0, PAGE);
                continue;
            }
            memcpy(p, tpl + (rng() % N_TEMPLATES) * PAGE, PAGE);
            for (int k = 0; k < 4; k++) {
                const uint64_t r = rng();
                memcpy(p + (r % (PAGE / 8)) * 8, &r, 8);
            }
        }
        if (zero) {
            zero_pages += run;
        }
        pg += run;
        zero = !zero;
    }
    free(tpl);
    return zero_pages;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* CPU time (user + system) the process has used so far, in seconds. */
static double cpu_time(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static int fail(const char *what, qsnap_image *img, int err)
{
    const char *msg = img ? qsnap_errmsg(img) : "";
    fprintf(stderr, "vmsavebench: %s: %s\n", what,
            msg[0] ? msg : qsnap_strerror(err));
    return 1;
}

/* Writes the memory through an open checkpoint, 1 MiB per call. */
static int save(qsnap_checkpoint *ck, bool sections, const uint8_t *mem,
                uint64_t size)
{
    int ret = 0;
    if (sections) {
        ret = qsnap_checkpoint_section_begin(ck, "ram");
    }
    for (uint64_t off = 0; ret == 0 && off < size; off += WRITE_SIZE) {
        const size_t len =
            size - off < WRITE_SIZE ? (size_t)(size - off) : WRITE_SIZE;
        ret = sections ? qsnap_checkpoint_section_write(ck, mem + off, len)
                       : qsnap_checkpoint_write(ck, mem + off, len);
    }
    if (ret == 0 && sections) {
        ret = qsnap_checkpoint_section_end(ck);
    }
    return ret;
}

int main(int argc, char **argv)
{
    if (argc < 3 || argc > 4 ||
        (strcmp(argv[1], "sections") != 0 && strcmp(argv[1], "raw") != 0 &&
         strcmp(argv[1], "raw-direct") != 0)) {
        fprintf(stderr,
                "usage: vmsavebench sections|raw|raw-direct IMAGE [SIZE]\n");
        return 2;
    }
    const bool sections = strcmp(argv[1], "sections") == 0;
    const bool direct = strcmp(argv[1], "raw-direct") == 0;
    const char *path = argv[2];
    uint64_t size = 2ull << 30;
    if (argc == 4) {
        char *end;
        size = strtoull(argv[3], &end, 0);
        if (*end || size == 0 || size % PAGE != 0) {
            fprintf(stderr, "vmsavebench: bad size '%s'\n", argv[3]);
            return 2;
        }
    }

    uint8_t *mem = aligned_alloc(PAGE, size);
    if (!mem) {
        return fail("allocating the memory", NULL, -ENOMEM);
    }
    const uint64_t zero_pages = fill_memory(mem, size);
    if (zero_pages == UINT64_MAX) {
        free(mem);
        return fail("allocating templates", NULL, -ENOMEM);
    }

    char err[1024] = "";
    struct qsnap_create_opts copts;
    qsnap_create_opts_init(&copts);
    copts.size = DISK_SIZE;
    int ret = qsnap_create(path, &copts, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, "vmsavebench: %s: %s\n", path,
                err[0] ? err : qsnap_strerror(ret));
        free(mem);
        return 1;
    }
    struct qsnap_open_opts oopts;
    qsnap_open_opts_init(&oopts);
    oopts.flags = QSNAP_OPEN_RDWR | (direct ? QSNAP_OPEN_NOCACHE : 0);
    qsnap_image *img;
    ret = qsnap_open(path, &oopts, &img, err, sizeof(err));
    if (ret < 0) {
        fprintf(stderr, "vmsavebench: %s: %s\n", path,
                err[0] ? err : qsnap_strerror(ret));
        free(mem);
        return 1;
    }
    sync();

    const double t0 = now();
    const double c0 = cpu_time();
    qsnap_checkpoint *ck;
    ret = qsnap_checkpoint_begin(
        img, "vmsave", NULL,
        sections ? QSNAP_CHECKPOINT_SECTIONS : QSNAP_CHECKPOINT_RAW, &ck);
    if (ret < 0) {
        fail("beginning the checkpoint", img, ret);
        free(mem);
        qsnap_close(img);
        return 1;
    }
    ret = save(ck, sections, mem, size);
    if (ret < 0) {
        fail("writing the state", img, ret);
        qsnap_checkpoint_abort(ck);
        qsnap_close(img);
        free(mem);
        return 1;
    }
    ret = qsnap_checkpoint_commit(ck);
    if (ret == 0) {
        ret = qsnap_flush(img);
    }
    const double t1 = now();
    const double c1 = cpu_time();
    free(mem);
    if (ret < 0) {
        fail("committing", img, ret);
        qsnap_close(img);
        return 1;
    }

    struct qsnap_snapshot_info *list;
    uint32_t count;
    uint64_t vm_state_size = 0;
    if (qsnap_snapshot_list(img, &list, &count) == 0) {
        for (uint32_t i = 0; i < count; i++) {
            if (strcmp(list[i].name, "vmsave") == 0) {
                vm_state_size = list[i].vm_state_size;
            }
        }
        qsnap_snapshot_list_free(list, count);
    }
    ret = qsnap_close(img);
    if (ret < 0) {
        fprintf(stderr, "vmsavebench: closing %s: %s\n", path,
                qsnap_strerror(ret));
        return 1;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "vmsavebench: %s: %s\n", path, strerror(errno));
        return 1;
    }
    printf("seconds=%.3f cpu=%.3f vm_state_size=%" PRIu64 " file_size=%" PRIu64
           " disk_usage=%" PRIu64 " zero_pages=%.1f\n",
           t1 - t0, c1 - c0, vm_state_size, (uint64_t)st.st_size,
           (uint64_t)st.st_blocks * 512,
           100.0 * (double)zero_pages / (double)(size / PAGE));
    return 0;
}
