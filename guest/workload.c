/*
 * vmckpt test-guest workload: keeps a verifiable state in memory and prints
 * it on stdout (the serial console) once per step.
 *
 * State (all in this process's memory, nothing time-dependent feeds into it):
 *   buf   buf_mb MiB, initialised deterministically page by page
 *   seq   step counter
 *   rng   xorshift64* PRNG state (chooses pages and seeds their new content)
 *   sum   sum (mod 2^64) over all pages of page_hash(page index, content),
 *         maintained incrementally when a page is rewritten
 *
 * Every step rewrites `pages` random 4 KiB pages, updates sum, seq++, prints
 *   STATE seq=<n> sum=<16 hex> ok
 * Every `check_every` steps the whole buffer is rehashed and compared with
 * sum; on mismatch the step prints instead
 *   BAD seq=<n> sum=<16 hex> expected=<16 hex>
 * (sum = the incrementally kept value, as in STATE lines; expected = the
 * value recomputed from the buffer). sum is NOT corrected, so a mismatch
 * shows again at every later check.
 *
 * Parameters: vmckpt.buf_mb= vmckpt.pages= vmckpt.hz= vmckpt.check_every=
 * read from /proc/cmdline, then overridden by argv entries of the same form
 * (with or without the "vmckpt." prefix), e.g. ./workload pages=8 hz=50.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "pages.h"
#include "say.h"

static uint64_t buf_mb = 64, pages = 4, hz = 10, check_every = 20;

static void set_param(const char *tok)
{
    static const struct { const char *name; uint64_t *var; } tab[] = {
        { "buf_mb", &buf_mb }, { "pages", &pages },
        { "hz", &hz }, { "check_every", &check_every },
    };
    if (strncmp(tok, "vmckpt.", 7) == 0)
        tok += 7;
    for (unsigned i = 0; i < sizeof tab / sizeof tab[0]; i++) {
        size_t l = strlen(tab[i].name);
        if (strncmp(tok, tab[i].name, l) == 0 && tok[l] == '=') {
            char *end;
            unsigned long long v = strtoull(tok + l + 1, &end, 0);
            if (end != tok + l + 1 && (*end == 0 || *end == ' ' || *end == '\n'))
                *tab[i].var = v;
            return;
        }
    }
}

static void read_cmdline(void)
{
    char cl[4096];
    FILE *f = fopen("/proc/cmdline", "r");
    if (!f)
        return;
    size_t n = fread(cl, 1, sizeof cl - 1, f);
    fclose(f);
    cl[n] = 0;
    for (char *save, *t = strtok_r(cl, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save))
        if (strncmp(t, "vmckpt.", 7) == 0)
            set_param(t);
}

static int64_t ts_ns(const struct timespec *t)
{
    return (int64_t)t->tv_sec * 1000000000LL + t->tv_nsec;
}

int main(int argc, char **argv)
{
    read_cmdline();
    for (int i = 1; i < argc; i++)
        set_param(argv[i]);
    if (buf_mb == 0)
        buf_mb = 1;
    if (hz == 0)
        hz = 1;

    say("WORKLOAD start buf_mb=%llu pages=%llu hz=%llu", (unsigned long long)buf_mb,
        (unsigned long long)pages, (unsigned long long)hz);

    uint64_t npages = buf_mb * (1024 * 1024 / PAGE);
    size_t len = (size_t)npages * PAGE;
    uint64_t *buf = mmap(NULL, len, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (buf == MAP_FAILED) {
        say("WORKLOAD error mmap %llu MiB: %s", (unsigned long long)buf_mb, strerror(errno));
        return 1;
    }

    /* Deterministic initial content and checksum. */
    uint64_t sum = 0;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t *p = buf + i * WORDS;
        fill_page(p, 0x766d636b70740000ULL ^ (i * 0xd1b54a32d192ed03ULL));
        sum += page_hash(p, i);
    }
    uint64_t rng = 0x2545f4914f6cdd1dULL; /* fixed seed */
    uint64_t seq = 0;

    const int64_t period = 1000000000LL / (int64_t)hz;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    int64_t deadline = ts_ns(&now);

    for (;;) {
        for (uint64_t k = 0; k < pages; k++) {
            uint64_t idx = xorshift64s(&rng) % npages;
            uint64_t seed = xorshift64s(&rng);
            uint64_t *p = buf + idx * WORDS;
            sum -= page_hash(p, idx);
            fill_page(p, seed);
            sum += page_hash(p, idx);
        }
        seq++;

        if (check_every && seq % check_every == 0) {
            uint64_t full = 0;
            for (uint64_t i = 0; i < npages; i++)
                full += page_hash(buf + i * WORDS, i);
            if (full != sum)
                say("BAD seq=%llu sum=%016llx expected=%016llx", (unsigned long long)seq,
                    (unsigned long long)sum, (unsigned long long)full);
            else
                say("STATE seq=%llu sum=%016llx ok", (unsigned long long)seq,
                    (unsigned long long)sum);
        } else {
            say("STATE seq=%llu sum=%016llx ok", (unsigned long long)seq,
                (unsigned long long)sum);
        }

        /* Absolute deadlines; resynchronise instead of bursting when more
         * than 1 s late (e.g. after the VM was stopped or restored). */
        deadline += period;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (ts_ns(&now) - deadline > 1000000000LL)
            deadline = ts_ns(&now);
        struct timespec dl = { deadline / 1000000000LL, deadline % 1000000000LL };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL) == EINTR)
            ;
    }
}
