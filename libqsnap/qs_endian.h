/*
 * qs_endian.h - big-endian loads and stores on byte buffers.
 *
 * qcow2 is big-endian throughout.  On-disk bytes are never cast to
 * structs; every field goes through these helpers.
 */
#ifndef QS_ENDIAN_H
#define QS_ENDIAN_H

#include <stdint.h>
#include <string.h>

static inline uint16_t qs_be16_load(const void *p)
{
    const uint8_t *b = p;
    return (uint16_t)((b[0] << 8) | b[1]);
}

static inline uint32_t qs_be32_load(const void *p)
{
    const uint8_t *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) |
           ((uint32_t)b[2] << 8) | b[3];
}

static inline uint64_t qs_be64_load(const void *p)
{
    const uint8_t *b = p;
    return ((uint64_t)qs_be32_load(b) << 32) | qs_be32_load(b + 4);
}

static inline void qs_be16_store(void *p, uint16_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 8);
    b[1] = (uint8_t)v;
}

static inline void qs_be32_store(void *p, uint32_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

static inline void qs_be64_store(void *p, uint64_t v)
{
    uint8_t *b = p;
    qs_be32_store(b, (uint32_t)(v >> 32));
    qs_be32_store(b + 4, (uint32_t)v);
}

#endif /* QS_ENDIAN_H */
