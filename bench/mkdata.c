/*
 * mkdata.c - writes a deterministic, semi-compressible raw disk image.
 *
 *   mkdata SIZE FILE
 *
 * The file is cut into 64 KiB pieces; a fixed pseudo-random sequence
 * makes each piece one of
 *   - zeros (about 30 %), written as real zero bytes, not holes;
 *   - log-like text (about 45 %): lines of words, counters, hex values;
 *   - random bytes (about 25 %), which do not compress.
 * With deflate or zstd this gives a whole-file ratio of about 2-3x.  The
 * same SIZE always produces the same bytes.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PIECE (64u * 1024)

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

/* xorshift64*: fast, and the same sequence everywhere. */
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
    "kernel",   "block",    "request", "queue",    "device",   "sector",
    "write",    "read",     "flush",   "complete", "error",    "warning",
    "info",     "debug",    "cluster", "offset",   "length",   "mapping",
    "snapshot", "refcount", "table",   "entry",    "allocate", "free",
    "network",  "packet",   "eth0",    "received", "sent",     "timeout",
    "user",     "session",  "opened",  "closed",   "for",      "the",
    "a",        "of",       "to",      "in",       "on",       "with",
    "service",  "started",  "stopped", "restart",  "config",   "loaded",
    "memory",   "page",     "cache",   "hit",      "miss",     "evict",
    "cpu",      "thread",   "lock",    "wait",     "signal",   "done",
    "status",   "ok",       "failed",  "retry",
};

#define N_WORDS (sizeof(words) / sizeof(words[0]))

/* Fills p[0..len) with lines that look like a system log. */
static void fill_text(char *p, size_t len)
{
    static uint64_t clock_ms = 1700000000000ull;
    char line[256];
    size_t pos = 0;
    while (pos < len) {
        const uint64_t r = rng();
        clock_ms += r % 50;
        int n = snprintf(line, sizeof(line), "[%" PRIu64 ".%03u] host%02u ",
                         clock_ms / 1000, (unsigned)(clock_ms % 1000),
                         (unsigned)(r >> 56) % 4);
        const unsigned n_words = 4 + (unsigned)((r >> 8) % 8);
        for (unsigned i = 0; i < n_words && n < 200; i++) {
            const uint64_t w = rng();
            if (w % 11 == 0) {
                n += snprintf(line + n, sizeof(line) - (size_t)n, "0x%06x ",
                              (unsigned)(w >> 40));
            } else {
                n += snprintf(line + n, sizeof(line) - (size_t)n, "%s ",
                              words[(w >> 8) % N_WORDS]);
            }
        }
        line[n - 1] = '\n';
        const size_t take = (size_t)n < len - pos ? (size_t)n : len - pos;
        memcpy(p + pos, line, take);
        pos += take;
    }
}

static void fill_random(uint8_t *p, size_t len)
{
    for (size_t i = 0; i + 8 <= len; i += 8) {
        const uint64_t r = rng();
        memcpy(p + i, &r, 8);
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: mkdata SIZE FILE\n");
        return 2;
    }
    char *end;
    const uint64_t size = strtoull(argv[1], &end, 0);
    if (*end || size == 0) {
        fprintf(stderr, "mkdata: bad size '%s'\n", argv[1]);
        return 2;
    }
    FILE *f = fopen(argv[2], "wb");
    if (!f) {
        fprintf(stderr, "mkdata: %s: %s\n", argv[2], strerror(errno));
        return 1;
    }
    static uint8_t buf[PIECE];
    for (uint64_t off = 0; off < size; off += PIECE) {
        const size_t len = size - off < PIECE ? (size_t)(size - off) : PIECE;
        const unsigned kind = (unsigned)(rng() % 100);
        if (kind < 30) {
            memset(buf, 0, len);
        } else if (kind < 75) {
            fill_text((char *)buf, len);
        } else {
            fill_random(buf, len);
        }
        if (fwrite(buf, 1, len, f) != len) {
            fprintf(stderr, "mkdata: %s: %s\n", argv[2], strerror(errno));
            fclose(f);
            return 1;
        }
    }
    if (fclose(f) != 0) {
        fprintf(stderr, "mkdata: %s: %s\n", argv[2], strerror(errno));
        return 1;
    }
    return 0;
}
