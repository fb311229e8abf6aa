/*
 * vmckpt test-guest disk workload: writes raw 4 KiB blocks to a block device
 * (O_DIRECT, so the device, not the page cache, holds them) and verifies them.
 *
 * State: owner[b] = the seq that last wrote block b (0 = never written, must
 * read as zeros), rng (xorshift64*, fixed seed), seq, sum (a rolling hash of
 * every (seq, block) written). All in memory, so a checkpoint restores it with
 * the guest's RAM; the disk must then hold exactly what owner[] says.
 *
 * Every step writes one block at a pseudo-random position: header
 * {magic, seq, block, payload hash} + payload derived from (seq, block), then
 * reads back the block just written and 4 random written blocks and 4 random
 * never-written ones. Every `check_every` steps, and on the first step after
 * the clock jumped by more than 1 s (the guest was stopped or restored), it
 * reads every written block. It prints
 *   DISK seq=<n> sum=<16 hex> ok
 * or on a mismatch (and keeps going)
 *   DISKBAD seq=<n> block=<b> want=<seq> got=<seq or "garbage"/"zero"/"data">
 * `sum` depends only on seq, so a restored guest prints the original's sums.
 *
 * Parameters (kernel command line): vmckpt.disk=/dev/vda (required),
 * vmckpt.disk_hz=5, vmckpt.disk_check_every=20, vmckpt.disk_blocks=N (only the
 * first N blocks are the workload's; default: the first 4 GiB).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pages.h"
#include "say.h"

#define BLOCK 4096u
#define MAGIC 0x6b7363646b736964ULL /* "diskcskd" */

static char disk[256];
static uint64_t hz = 5, check_every = 20, max_blocks = 0;

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
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
    for (char *save, *t = strtok_r(cl, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save)) {
        if (strncmp(t, "vmckpt.disk=", 12) == 0)
            snprintf(disk, sizeof disk, "%s", t + 12);
        else if (strncmp(t, "vmckpt.disk_hz=", 15) == 0)
            hz = strtoull(t + 15, NULL, 0);
        else if (strncmp(t, "vmckpt.disk_check_every=", 24) == 0)
            check_every = strtoull(t + 24, NULL, 0);
        else if (strncmp(t, "vmckpt.disk_blocks=", 19) == 0)
            max_blocks = strtoull(t + 19, NULL, 0);
    }
}

static void fill(uint64_t *b, uint64_t seq, uint64_t blk)
{
    uint64_t h = 0;
    for (unsigned i = 4; i < BLOCK / 8; i++) {
        b[i] = mix(seq * 0x9e3779b97f4a7c15ULL ^ blk * 0xd1b54a32d192ed03ULL ^ i);
        h = mix(h ^ b[i]);
    }
    b[0] = MAGIC;
    b[1] = seq;
    b[2] = blk;
    b[3] = h;
}

static int dfd;
static uint64_t *io;

/* 0 when block blk holds what owner says (want = 0: all zeros). */
static int check_block(uint64_t seq, uint64_t blk, uint64_t want)
{
    if (pread(dfd, io, BLOCK, (off_t)(blk * BLOCK)) != BLOCK) {
        say("DISKBAD seq=%llu block=%llu want=%llu got=ioerror:%s", (unsigned long long)seq,
            (unsigned long long)blk, (unsigned long long)want, strerror(errno));
        return 1;
    }
    if (want == 0) {
        for (unsigned i = 0; i < BLOCK / 8; i++)
            if (io[i]) {
                say("DISKBAD seq=%llu block=%llu want=0 got=%s", (unsigned long long)seq,
                    (unsigned long long)blk, io[0] == MAGIC ? "data" : "garbage");
                return 1;
            }
        return 0;
    }
    uint64_t got = io[0] == MAGIC && io[2] == blk ? io[1] : 0;
    uint64_t h = 0;
    for (unsigned i = 4; i < BLOCK / 8; i++)
        h = mix(h ^ io[i]);
    if (got != want || h != io[3]) {
        say("DISKBAD seq=%llu block=%llu want=%llu got=%llu%s", (unsigned long long)seq,
            (unsigned long long)blk, (unsigned long long)want, (unsigned long long)got,
            h != io[3] ? " (payload damaged)" : "");
        return 1;
    }
    return 0;
}

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(void)
{
    read_cmdline();
    if (!disk[0])
        return 0;
    if (hz == 0)
        hz = 1;
    dfd = open(disk, O_RDWR | O_DIRECT | O_SYNC);
    if (dfd < 0) {
        say("DISKLOAD error open %s: %s", disk, strerror(errno));
        return 1;
    }
    off_t size = lseek(dfd, 0, SEEK_END);
    uint64_t nblocks = size > 0 ? (uint64_t)size / BLOCK : 0;
    if (nblocks > (1u << 20))
        nblocks = 1u << 20;
    if (max_blocks && nblocks > max_blocks)
        nblocks = max_blocks; /* the rest of the disk is not the workload's: never checked */
    if (nblocks < 16) {
        say("DISKLOAD error %s is too small (%lld bytes)", disk, (long long)size);
        return 1;
    }
    uint64_t *owner = calloc(nblocks, sizeof *owner);
    uint64_t *blk_buf;
    if (!owner || posix_memalign((void **)&blk_buf, BLOCK, BLOCK) ||
        posix_memalign((void **)&io, BLOCK, BLOCK)) {
        say("DISKLOAD error out of memory");
        return 1;
    }
    say("DISKLOAD start disk=%s blocks=%llu hz=%llu", disk, (unsigned long long)nblocks,
        (unsigned long long)hz);

    uint64_t rng = 0x9e3779b97f4a7c15ULL, seq = 0, sum = 0;
    const int64_t period = 1000000000LL / (int64_t)hz;
    int64_t deadline = now_ns(), last = deadline;
    for (;;) {
        seq++;
        uint64_t blk = xorshift64s(&rng) % nblocks;
        fill(blk_buf, seq, blk);
        if (pwrite(dfd, blk_buf, BLOCK, (off_t)(blk * BLOCK)) != BLOCK) {
            say("DISKBAD seq=%llu block=%llu write failed: %s", (unsigned long long)seq,
                (unsigned long long)blk, strerror(errno));
        }
        owner[blk] = seq;
        sum = mix(sum ^ (seq << 20) ^ blk);

        int bad = check_block(seq, blk, seq);
        uint64_t probe = mix(seq ^ 0x5555);
        for (int k = 0; k < 8; k++) {
            uint64_t b = (probe = mix(probe)) % nblocks;
            if ((k < 4) == (owner[b] != 0))
                bad |= check_block(seq, b, owner[b]);
        }
        int64_t t = now_ns();
        if ((check_every && seq % check_every == 0) || t - last > 1000000000LL) {
            for (uint64_t b = 0; b < nblocks; b++)
                if (owner[b])
                    bad |= check_block(seq, b, owner[b]);
        }
        last = t;
        if (!bad)
            say("DISK seq=%llu sum=%016llx ok", (unsigned long long)seq, (unsigned long long)sum);

        deadline += period;
        t = now_ns();
        if (t - deadline > 1000000000LL)
            deadline = t;
        struct timespec dl = { deadline / 1000000000LL, deadline % 1000000000LL };
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &dl, NULL) == EINTR)
            ;
        last = now_ns();
    }
}
