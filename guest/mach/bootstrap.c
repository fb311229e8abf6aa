/*
 * vmckpt GNU Mach test guest: the bootstrap task.
 *
 * GNU Mach runs the multiboot modules' strings as a boot script (the syntax
 * of the Hurd's serverboot). This task's module string is
 *     <path> ${device-port} [pages=<p>] [hz=<h>] $(task-create) $(task-resume)
 * so it starts with argv = { <path>, <device master port name>, params... }.
 * (A single module without arguments would be started in "compat mode"
 * instead; GNU Mach 1.8+git20221224 panics there in thread_deallocate.)
 * This task has no libc and no MiG stubs: it talks
 * to the kernel with raw Mach IPC (mach_msg through the i386 call gate
 * `lcall $7,$0`), opens the "console" device on the device master port and
 * device_write_inband()s its lines to it.
 *
 * It keeps the same kind of verifiable state as the Linux guest's workload
 * (workload.c): a buffer of BUF_PAGES pages, initialised deterministically;
 * every step rewrites `pages` pseudo-random pages, keeps a checksum over all
 * pages up to date incrementally and prints
 *     STATE seq=<n> sum=<16 hex digits> ok
 * Every CHECK_EVERY steps the whole buffer is rehashed and compared; on a
 * mismatch the line is BAD seq=<n> sum=<16 hex> expected=<16 hex>.
 * The run is deterministic: seq=N always prints the same sum.
 * Parameters (module arguments): pages=<p> (pages rewritten per step, 4),
 * hz=<h> (steps per second, 10).
 *
 * Built -m32 -ffreestanding -nostdlib -static as an ELF32 i386 executable;
 * no 64-bit division is used, so no libgcc is needed.
 */
typedef unsigned int u32;
typedef unsigned long long u64;

#include "../pages.h"
typedef u32 mach_port_t;

/* <mach/message.h> */
typedef struct {
	u32 msgh_bits;
	u32 msgh_size;
	mach_port_t msgh_remote_port;
	mach_port_t msgh_local_port;
	u32 msgh_seqno;
	int msgh_id;
} mach_msg_header_t;

typedef struct {
	unsigned msgt_name : 8, msgt_size : 8, msgt_number : 12, msgt_inline : 1,
		msgt_longform : 1, msgt_deallocate : 1, msgt_unused : 1;
} mach_msg_type_t;

typedef struct {
	mach_msg_type_t msgtl_header;
	unsigned short msgtl_name;
	unsigned short msgtl_size;
	u32 msgtl_number;
} mach_msg_type_long_t;

#define MACH_MSG_TYPE_INTEGER_32 2
#define MACH_MSG_TYPE_CHAR 8
#define MACH_MSG_TYPE_STRING_C 12
#define MACH_MSG_TYPE_COPY_SEND 19
#define MACH_MSG_TYPE_MAKE_SEND_ONCE 21
#define MACH_MSGH_BITS(remote, local) ((remote) | ((local) << 8))
#define MACH_SEND_MSG 0x1
#define MACH_RCV_MSG 0x2
#define MACH_RCV_TIMEOUT 0x100
#define MACH_PORT_NULL 0
#define MACH_RCV_TIMED_OUT 0x10004003

/* <device/device.defs>: subsystem device 2800 */
#define DEVICE_OPEN_ID 2800
#define DEVICE_WRITE_INBAND_ID 2803
#define D_READ 0x1
#define D_WRITE 0x2

int mach_msg_trap(void *msg, int option, u32 send_size, u32 rcv_size, mach_port_t rcv_name,
		  u32 timeout, mach_port_t notify);
mach_port_t mach_reply_port(void);

/* Mach traps: number in %eax, arguments on the user stack, call gate 7. */
__asm__(".text\n"
	".globl mach_msg_trap\n"
	"mach_msg_trap:\n"
	"	movl $-25, %eax\n"
	"	lcall $7, $0\n"
	"	ret\n"
	".globl mach_reply_port\n"
	"mach_reply_port:\n"
	"	movl $-26, %eax\n"
	"	lcall $7, $0\n"
	"	ret\n"
	".globl _start\n"
	"_start:\n"
	"	movl %esp, %eax\n" /* points at argc, argv..., 0, envp..., 0 */
	"	andl $-16, %esp\n"
	"	subl $12, %esp\n"
	"	pushl %eax\n"
	"	call bootstrap_main\n"
	"1:	hlt\n" /* not reached; hlt faults in user mode */
	"	jmp 1b\n");

/* Status words kept where a debugger (or QMP memsave) can find them. */
volatile int last_error;
volatile int stage;

static mach_port_t reply_port;
static mach_port_t console;

static int prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static u32 atou(const char *s)
{
	u32 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u32)(*s++ - '0');
	return v;
}

static int device_open(mach_port_t master, const char *name, mach_port_t *device)
{
	union {
		struct {
			mach_msg_header_t head;
			mach_msg_type_t mode_type;
			int mode;
			mach_msg_type_long_t name_type;
			char name[128];
		} in;
		struct {
			mach_msg_header_t head;
			mach_msg_type_t ret_type;
			int ret;
			mach_msg_type_t device_type;
			mach_port_t device;
		} out;
		char space[512];
	} m;
	for (u32 i = 0; i < sizeof m; i++)
		m.space[i] = 0;
	m.in.head.msgh_bits =
		MACH_MSGH_BITS(MACH_MSG_TYPE_COPY_SEND, MACH_MSG_TYPE_MAKE_SEND_ONCE);
	m.in.head.msgh_size = sizeof m.in;
	m.in.head.msgh_remote_port = master;
	m.in.head.msgh_local_port = reply_port;
	m.in.head.msgh_id = DEVICE_OPEN_ID;
	m.in.mode_type = (mach_msg_type_t){ MACH_MSG_TYPE_INTEGER_32, 32, 1, 1, 0, 0, 0 };
	m.in.mode = D_READ | D_WRITE;
	/* dev_name_t is (MACH_MSG_TYPE_STRING_C, 8*128): one 1024-bit string, which
	 * needs the long type form (a short form gets MIG_BAD_ARGUMENTS, -304). */
	m.in.name_type = (mach_msg_type_long_t){ { 0, 0, 0, 1, 1, 0, 0 },
						 MACH_MSG_TYPE_STRING_C, 8 * 128, 1 };
	for (u32 i = 0; name[i] && i < 127; i++)
		m.in.name[i] = name[i];
	int kr = mach_msg_trap(&m, MACH_SEND_MSG | MACH_RCV_MSG, sizeof m.in, sizeof m, reply_port,
			       0, MACH_PORT_NULL);
	if (kr != 0)
		return kr;
	if (m.out.head.msgh_id != DEVICE_OPEN_ID + 100)
		return -1000 - m.out.head.msgh_id;
	if (m.out.ret != 0)
		return m.out.ret;
	*device = m.out.device;
	return 0;
}

static int device_write_inband(mach_port_t device, const char *data, u32 len)
{
	union {
		struct {
			mach_msg_header_t head;
			mach_msg_type_t mode_type;
			int mode;
			mach_msg_type_t recnum_type;
			u32 recnum;
			mach_msg_type_t data_type;
			char data[128];
		} in;
		struct {
			mach_msg_header_t head;
			mach_msg_type_t ret_type;
			int ret;
			mach_msg_type_t count_type;
			int count;
		} out;
		char space[512];
	} m;
	if (len > 128)
		len = 128;
	m.in.head.msgh_bits =
		MACH_MSGH_BITS(MACH_MSG_TYPE_COPY_SEND, MACH_MSG_TYPE_MAKE_SEND_ONCE);
	m.in.head.msgh_size = (u32)((char *)m.in.data - (char *)&m.in) + ((len + 3) & ~3u);
	m.in.head.msgh_remote_port = device;
	m.in.head.msgh_local_port = reply_port;
	m.in.head.msgh_seqno = 0;
	m.in.head.msgh_id = DEVICE_WRITE_INBAND_ID;
	m.in.mode_type = (mach_msg_type_t){ MACH_MSG_TYPE_INTEGER_32, 32, 1, 1, 0, 0, 0 };
	m.in.mode = 0;
	m.in.recnum_type = (mach_msg_type_t){ MACH_MSG_TYPE_INTEGER_32, 32, 1, 1, 0, 0, 0 };
	m.in.recnum = 0;
	m.in.data_type = (mach_msg_type_t){ MACH_MSG_TYPE_CHAR, 8, len, 1, 0, 0, 0 };
	for (u32 i = 0; i < len; i++)
		m.in.data[i] = data[i];
	int kr = mach_msg_trap(&m, MACH_SEND_MSG | MACH_RCV_MSG, m.in.head.msgh_size, sizeof m,
			       reply_port, 0, MACH_PORT_NULL);
	if (kr != 0)
		return kr;
	return m.out.ret;
}

/* Wait `ms` milliseconds: a receive on a port nobody sends to, with a timeout. */
static void sleep_ms(u32 ms)
{
	union {
		mach_msg_header_t head;
		char space[256];
	} m;
	mach_msg_trap(&m, MACH_RCV_MSG | MACH_RCV_TIMEOUT, 0, sizeof m, reply_port, ms,
		      MACH_PORT_NULL);
}

/* --- output ------------------------------------------------------------- */

static char line[128];
static u32 line_len;

static void put_str(const char *s)
{
	while (*s && line_len < sizeof line - 2)
		line[line_len++] = *s++;
}

static void put_dec(u32 v)
{
	char tmp[12];
	int n = 0;
	do {
		tmp[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		line[line_len < sizeof line - 2 ? line_len++ : line_len] = tmp[--n];
}

static void put_hex64(u64 v)
{
	for (int shift = 60; shift >= 0; shift -= 4)
		line[line_len < sizeof line - 2 ? line_len++ : line_len] =
			"0123456789abcdef"[(v >> shift) & 0xf];
}

static void flush_line(void)
{
	line[line_len++] = '\r';
	line[line_len++] = '\n';
	int err = device_write_inband(console, line, line_len);
	if (err)
		last_error = err;
	line_len = 0;
}

/* --- the workload (same construction as guest/workload.c) ---------------- */

#define BUF_PAGES 1024u /* 4 MiB; a power of two, so no 64-bit modulo */
#define CHECK_EVERY 20u

static u64 buf[BUF_PAGES * WORDS];

void bootstrap_main(u32 *sp)
{
	u32 argc = sp[0];
	char **argv = (char **)(sp + 1);
	u32 pages = 4, hz = 10;

	stage = 1;
	reply_port = mach_reply_port();
	if (argc < 2) {
		last_error = -1;
		for (;;)
			sleep_ms(1000);
	}
	mach_port_t master = atou(argv[1]);
	for (u32 i = 2; i < argc; i++) {
		if (prefix(argv[i], "pages="))
			pages = atou(argv[i] + 6);
		else if (prefix(argv[i], "hz="))
			hz = atou(argv[i] + 3);
	}
	if (hz == 0)
		hz = 1;

	stage = 2;
	int err = device_open(master, "console", &console);
	if (err)
		err = device_open(master, "com0", &console);
	if (err) {
		last_error = err;
		for (;;) /* spin: the CPU stays in this task, so a debugger sees its memory */
			;
	}
	stage = 3;
	put_str("VMCKPT-MACH up");
	flush_line();
	put_str("WORKLOAD start buf_pages=");
	put_dec(BUF_PAGES);
	put_str(" pages=");
	put_dec(pages);
	put_str(" hz=");
	put_dec(hz);
	flush_line();

	u64 sum = 0;
	for (u32 i = 0; i < BUF_PAGES; i++) {
		u64 *p = buf + i * WORDS;
		fill_page(p, 0x766d636b70740000ULL ^ (i * 0xd1b54a32d192ed03ULL));
		sum += page_hash(p, i);
	}
	u64 rng = 0x2545f4914f6cdd1dULL;
	u32 seq = 0;
	stage = 4;
	for (;;) {
		for (u32 k = 0; k < pages; k++) {
			u32 idx = (u32)(xorshift64s(&rng) >> 32) & (BUF_PAGES - 1);
			u64 seed = xorshift64s(&rng);
			u64 *p = buf + idx * WORDS;
			sum -= page_hash(p, idx);
			fill_page(p, seed);
			sum += page_hash(p, idx);
		}
		seq++;
		u64 full = sum;
		if (seq % CHECK_EVERY == 0) {
			full = 0;
			for (u32 i = 0; i < BUF_PAGES; i++)
				full += page_hash(buf + i * WORDS, i);
		}
		put_str(full == sum ? "STATE seq=" : "BAD seq=");
		put_dec(seq);
		put_str(" sum=");
		put_hex64(sum);
		if (full == sum) {
			put_str(" ok");
		} else {
			put_str(" expected=");
			put_hex64(full);
		}
		flush_line();
		sleep_ms(1000 / hz);
	}
}
