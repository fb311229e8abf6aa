/*
 * The test guests' verifiable state, shared by the Linux workload (workload.c)
 * and the GNU Mach bootstrap task (mach/bootstrap.c): a seeded PRNG, page
 * contents derived from a seed, and a position-dependent page hash. Pure
 * functions with no libc, so a freestanding task can use them too. The same
 * seed always gives the same pages and hashes, which is what lets a test
 * compare a restored run with the original step by step.
 */
#ifndef VMCKPT_GUEST_PAGES_H
#define VMCKPT_GUEST_PAGES_H

#include <stdint.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)

static inline uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t xorshift64s(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dULL;
}

static inline void fill_page(uint64_t *p, uint64_t seed)
{
    for (unsigned i = 0; i < WORDS; i++)
        p[i] = splitmix64(&seed);
}

/* Position-dependent page hash: word order and page index both matter. */
static inline uint64_t page_hash(const uint64_t *p, uint64_t idx)
{
    uint64_t a = 0, b = 0;
    for (unsigned i = 0; i < WORDS; i += 2) {
        a += (p[i] ^ (i * 0x9e3779b97f4a7c15ULL)) * 0xff51afd7ed558ccdULL;
        b += (p[i + 1] ^ ((i + 1) * 0xc2b2ae3d27d4eb4fULL)) * 0xc4ceb9fe1a85ec53ULL;
    }
    uint64_t h = a ^ (b << 1 | b >> 63) ^ (idx * 0x9e3779b97f4a7c15ULL);
    h = (h ^ (h >> 33)) * 0xff51afd7ed558ccdULL;
    h = (h ^ (h >> 33)) * 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

#endif
