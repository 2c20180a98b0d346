/*
 * Hive test guest: proves the VMM's devices from the inside.
 *
 * Reads the command line the VMM wrote (PVH start info or Linux boot_params), finds every
 * `virtio_mmio.device=<size>@<addr>:<irq>` entry, and drives each virtio-mmio device by polling
 * (no interrupts): block (write a sector pattern, read it back, flush), vsock (a guest-initiated
 * connection to host port 5000 and a host-initiated one to guest port 1024), net (a frame out to
 * the TAP and one back), rng (entropy, not all zero). One `OK <dev> ...` or `FAIL <dev> <why>`
 * line per device on COM1, then `DONE ok=N fail=M`, then an i8042 reset to stop the VM.
 *
 * Freestanding, integer-only (built with -mgeneral-regs-only): the nested KVM on the
 * development machines cannot emulate SSE, popcnt, int3 or xsave after an exit.
 */
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define barrier() __asm__ volatile("" ::: "memory")

/* ---- libc bits gcc may call ---- */
void *memset(void *d, int c, usize n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}
void *memcpy(void *d, const void *s, usize n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}
int memcmp(const void *a, const void *b, usize n)
{
	const u8 *p = a, *q = b;
	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}
static usize slen(const char *s)
{
	usize n = 0;
	while (s[n])
		n++;
	return n;
}

/* ---- port I/O, serial ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void pause(void) { __asm__ volatile("pause"); }

static void putc_(char c) { outb(0x3f8, (u8)c); }
static void puts_(const char *s)
{
	while (*s)
		putc_(*s++);
}
static void puthex(u64 v)
{
	static const char digits[] = "0123456789abcdef";
	char buf[19];
	int i = 18;
	buf[i] = 0;
	do {
		buf[--i] = digits[v & 15];
		v >>= 4;
	} while (v && i > 2);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts_(&buf[i]);
}
static void putdec(u64 v)
{
	char buf[24];
	int i = 23;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts_(&buf[i]);
}

static int n_ok, n_fail;
static int fail(const char *dev, const char *why)
{
	puts_("FAIL ");
	puts_(dev);
	putc_(' ');
	puts_(why);
	putc_('\n');
	n_fail++;
	return -1;
}

/* ---- virtio-mmio ---- */
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEV_FEAT 0x010
#define R_DEV_FEAT_SEL 0x014
#define R_DRV_FEAT 0x020
#define R_DRV_FEAT_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_STATUS 0x070
#define R_DESC_LO 0x080
#define R_DESC_HI 0x084
#define R_AVAIL_LO 0x090
#define R_AVAIL_HI 0x094
#define R_USED_LO 0x0a0
#define R_USED_HI 0x0a4
#define R_CONFIG 0x100

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

static u32 r32(u64 base, u32 off) { return *(volatile u32 *)(usize)(base + off); }
static u8 r8(u64 base, u32 off) { return *(volatile u8 *)(usize)(base + off); }
static void w32(u64 base, u32 off, u32 v) { *(volatile u32 *)(usize)(base + off) = v; }

#define QSZ 16
struct vdesc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};
struct vavail {
	u16 flags;
	u16 idx;
	u16 ring[QSZ];
	u16 used_event;
};
struct vused_elem {
	u32 id;
	u32 len;
};
struct vused {
	u16 flags;
	u16 idx;
	struct vused_elem ring[QSZ];
	u16 avail_event;
};
struct vq {
	u64 base;
	u32 index;
	u16 size;
	u16 avail_idx;
	u16 last_used;
	struct vdesc *desc;
	struct vavail *avail;
	struct vused *used;
};

/* Page-aligned arena for rings and buffers; reset per device (devices run one at a time). */
/* Not in .bss: clearing 256 KiB costs most of a second on the nested KVM here; alloc() zeroes
 * what it hands out instead. */
static u8 arena[256 * 1024] __attribute__((aligned(4096), section(".arena")));
static usize arena_used;
static void *alloc(usize n, usize align)
{
	usize at = (arena_used + align - 1) & ~(align - 1);
	if (at + n > sizeof(arena))
		return 0;
	arena_used = at + n;
	memset(&arena[at], 0, n);
	return &arena[at];
}

/* Feature negotiation: accept VERSION_1 plus the low feature bits in `want`. */
static int dev_begin(const char *name, u64 base, u32 want, u32 *accepted)
{
	w32(base, R_STATUS, 0);
	w32(base, R_STATUS, ST_ACK);
	w32(base, R_STATUS, ST_ACK | ST_DRIVER);
	w32(base, R_DEV_FEAT_SEL, 1);
	u32 hi = r32(base, R_DEV_FEAT);
	w32(base, R_DEV_FEAT_SEL, 0);
	u32 lo = r32(base, R_DEV_FEAT);
	if (!(hi & 1))
		return fail(name, "device lacks VIRTIO_F_VERSION_1");
	*accepted = lo & want;
	w32(base, R_DRV_FEAT_SEL, 0);
	w32(base, R_DRV_FEAT, *accepted);
	w32(base, R_DRV_FEAT_SEL, 1);
	w32(base, R_DRV_FEAT, 1);
	w32(base, R_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	if (!(r32(base, R_STATUS) & ST_FEATURES_OK))
		return fail(name, "device refused FEATURES_OK");
	return 0;
}

static int vq_setup(const char *name, u64 base, u32 index, struct vq *q)
{
	w32(base, R_QUEUE_SEL, index);
	if (r32(base, R_QUEUE_READY))
		return fail(name, "queue already ready after reset");
	u32 max = r32(base, R_QUEUE_NUM_MAX);
	if (max == 0)
		return fail(name, "queue not available (QueueNumMax 0)");
	q->base = base;
	q->index = index;
	q->size = max < QSZ ? (u16)max : QSZ;
	q->avail_idx = 0;
	q->last_used = 0;
	u8 *page = alloc(4096, 4096);
	if (!page)
		return fail(name, "guest arena exhausted");
	q->desc = (struct vdesc *)page;
	q->avail = (struct vavail *)(page + 1024);
	q->used = (struct vused *)(page + 2048);
	w32(base, R_QUEUE_NUM, q->size);
	w32(base, R_DESC_LO, (u32)(usize)q->desc);
	w32(base, R_DESC_HI, 0);
	w32(base, R_AVAIL_LO, (u32)(usize)q->avail);
	w32(base, R_AVAIL_HI, 0);
	w32(base, R_USED_LO, (u32)(usize)q->used);
	w32(base, R_USED_HI, 0);
	w32(base, R_QUEUE_READY, 1);
	return 0;
}

static void dev_ready(u64 base)
{
	w32(base, R_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
}

struct buf {
	void *addr;
	u32 len;
	int writable;
};

/* Makes descriptors first..first+n-1 one chain and offers it; returns the head index. */
static u16 vq_offer(struct vq *q, u16 first, const struct buf *b, int n)
{
	for (int i = 0; i < n; i++) {
		struct vdesc *d = &q->desc[(first + i) % q->size];
		d->addr = (u64)(usize)b[i].addr;
		d->len = b[i].len;
		d->flags = (u16)((b[i].writable ? VIRTQ_DESC_F_WRITE : 0) | (i + 1 < n ? VIRTQ_DESC_F_NEXT : 0));
		d->next = (u16)((first + i + 1) % q->size);
	}
	q->avail->ring[q->avail_idx % q->size] = first;
	barrier();
	q->avail_idx++;
	q->avail->idx = q->avail_idx;
	barrier();
	return first;
}
static void vq_kick(struct vq *q) { w32(q->base, R_QUEUE_NOTIFY, q->index); }

static int vq_poll(struct vq *q, u32 *id, u32 *len)
{
	u16 idx = *(volatile u16 *)&q->used->idx;
	if (idx == q->last_used)
		return 0;
	barrier();
	struct vused_elem *e = &q->used->ring[q->last_used % q->size];
	*id = e->id;
	*len = e->len;
	q->last_used++;
	return 1;
}
static int vq_wait(struct vq *q, u32 *id, u32 *len, u64 spins)
{
	while (spins--) {
		if (vq_poll(q, id, len))
			return 1;
		pause();
	}
	return 0;
}

#define SPINS_SHORT 50000000ULL
#define SPINS_PEER 1500000000ULL

/* ---- block ---- */
#define BLK_F_RO (1u << 5)
#define BLK_F_FLUSH (1u << 9)
struct blk_req {
	u32 type;
	u32 reserved;
	u64 sector;
};
static int blk_io(struct vq *q, u32 type, u64 sector, u8 *data, u32 len, u8 *status)
{
	struct blk_req *h = alloc(sizeof(*h), 16);
	h->type = type;
	h->sector = sector;
	*status = 0xff;
	struct buf b[3];
	int n = 0;
	b[n++] = (struct buf){h, sizeof(*h), 0};
	if (len)
		b[n++] = (struct buf){data, len, type == 0};
	b[n++] = (struct buf){status, 1, 1};
	vq_offer(q, 0, b, n);
	vq_kick(q);
	u32 id, used_len;
	if (!vq_wait(q, &id, &used_len, SPINS_SHORT))
		return -1;
	return 0;
}
static void test_block(u64 base)
{
	const char *n = "block";
	u32 feat;
	struct vq q;
	if (dev_begin(n, base, BLK_F_RO | BLK_F_FLUSH, &feat) || vq_setup(n, base, 0, &q))
		return;
	dev_ready(base);
	u64 sectors = (u64)r32(base, R_CONFIG) | ((u64)r32(base, R_CONFIG + 4) << 32);
	if (sectors < 4) {
		fail(n, "capacity below 4 sectors");
		return;
	}
	u8 *wbuf = alloc(512, 512), *rbuf = alloc(512, 512), *st = alloc(16, 16);
	for (int i = 0; i < 512; i++)
		wbuf[i] = (u8)(i * 7 + 0x5a);
	u64 sector = sectors - 2;
	if (feat & BLK_F_RO) {
		if (blk_io(&q, 1, sector, wbuf, 512, st))
			return (void)fail(n, "write request not completed");
		if (*st != 1)
			return (void)fail(n, "write to read-only disk did not fail with IOERR");
		if (blk_io(&q, 0, 0, rbuf, 512, st) || *st != 0)
			return (void)fail(n, "read from read-only disk failed");
		puts_("OK block ro sectors=");
		putdec(sectors);
		putc_('\n');
		n_ok++;
		return;
	}
	if (blk_io(&q, 1, sector, wbuf, 512, st) || *st != 0)
		return (void)fail(n, "write failed");
	if (blk_io(&q, 0, sector, rbuf, 512, st) || *st != 0)
		return (void)fail(n, "read failed");
	if (memcmp(wbuf, rbuf, 512))
		return (void)fail(n, "read back differs from written pattern");
	if (feat & BLK_F_FLUSH) {
		if (blk_io(&q, 4, 0, 0, 0, st) || *st != 0)
			return (void)fail(n, "flush failed");
	}
	/* A read past the end must fail, not wrap. */
	if (blk_io(&q, 0, sectors, rbuf, 512, st) || *st == 0)
		return (void)fail(n, "read past end of disk succeeded");
	puts_("OK block rw sectors=");
	putdec(sectors);
	puts_((feat & BLK_F_FLUSH) ? " flush" : " noflush");
	putc_('\n');
	n_ok++;
}

/* ---- rng ---- */
static void test_rng(u64 base)
{
	const char *n = "rng";
	u32 feat;
	struct vq q;
	if (dev_begin(n, base, 0, &feat) || vq_setup(n, base, 0, &q))
		return;
	dev_ready(base);
	u8 *b = alloc(64, 64);
	struct buf bb = {b, 64, 1};
	vq_offer(&q, 0, &bb, 1);
	vq_kick(&q);
	u32 id, len;
	if (!vq_wait(&q, &id, &len, SPINS_SHORT))
		return (void)fail(n, "no entropy returned");
	if (len == 0 || len > 64)
		return (void)fail(n, "bad used length");
	u32 nz = 0;
	for (u32 i = 0; i < len; i++)
		nz |= b[i];
	if (!nz)
		return (void)fail(n, "entropy all zero");
	puts_("OK rng bytes=");
	putdec(len);
	putc_('\n');
	n_ok++;
}

/* ---- net ---- */
#define NET_F_MAC (1u << 5)
#define NET_HDR 12
#define ETH_TYPE_HIVE 0x88b5
#define NET_RX_BUFS 4
#define NET_BUF 1536
static void test_net(u64 base)
{
	const char *n = "net";
	u32 feat;
	struct vq rx, tx;
	if (dev_begin(n, base, NET_F_MAC, &feat) || vq_setup(n, base, 0, &rx) || vq_setup(n, base, 1, &tx))
		return;
	u8 mac[6] = {0x02, 0, 0, 0, 0, 0x01};
	if (feat & NET_F_MAC)
		for (int i = 0; i < 6; i++)
			mac[i] = r8(base, R_CONFIG + i);
	dev_ready(base);
	u8 *rxb[NET_RX_BUFS];
	for (int i = 0; i < NET_RX_BUFS; i++) {
		rxb[i] = alloc(NET_BUF, 64);
		struct buf b = {rxb[i], NET_BUF, 1};
		vq_offer(&rx, (u16)i, &b, 1);
	}
	vq_kick(&rx);
	u8 *frame = alloc(NET_BUF, 64);
	static const char ping[] = "HIVE-PING";
	static const char pong[] = "HIVE-PONG";
	u8 *eth = frame + NET_HDR;
	for (int i = 0; i < 6; i++) {
		eth[i] = 0xff;
		eth[6 + i] = mac[i];
	}
	eth[12] = ETH_TYPE_HIVE >> 8;
	eth[13] = ETH_TYPE_HIVE & 0xff;
	memcpy(eth + 14, ping, sizeof(ping) - 1);
	u32 frame_len = NET_HDR + 60;
	u32 sent = 0;
	u64 spins = SPINS_PEER;
	while (spins) {
		if (sent == 0 || (spins % 100000000ULL) == 0) {
			struct buf b = {frame, frame_len, 0};
			vq_offer(&tx, 0, &b, 1);
			vq_kick(&tx);
			u32 id, len;
			if (!vq_wait(&tx, &id, &len, SPINS_SHORT))
				return (void)fail(n, "tx frame not consumed");
			sent++;
		}
		u32 id, len;
		if (vq_poll(&rx, &id, &len)) {
			if (id >= NET_RX_BUFS)
				return (void)fail(n, "rx used id out of range");
			u8 *f = rxb[id] + NET_HDR;
			int match = len >= NET_HDR + 14 + sizeof(pong) - 1 && f[12] == (ETH_TYPE_HIVE >> 8) &&
				    f[13] == (ETH_TYPE_HIVE & 0xff) && !memcmp(f, mac, 6) &&
				    !memcmp(f + 14, pong, sizeof(pong) - 1);
			/* give the buffer back, whatever it held (the host may send IPv6 chatter) */
			struct buf b = {rxb[id], NET_BUF, 1};
			vq_offer(&rx, (u16)id, &b, 1);
			vq_kick(&rx);
			if (match) {
				puts_("OK net mac=");
				puthex(((u64)mac[0] << 40) | ((u64)mac[1] << 32) | ((u64)mac[2] << 24) |
				       ((u64)mac[3] << 16) | ((u64)mac[4] << 8) | mac[5]);
				puts_(" pings=");
				putdec(sent);
				putc_('\n');
				n_ok++;
				return;
			}
		}
		pause();
		spins--;
	}
	fail(n, "no HIVE-PONG frame from the TAP peer");
}

/* ---- vsock ---- */
struct __attribute__((packed)) vsock_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
};
#define VS_OP_REQUEST 1
#define VS_OP_RESPONSE 2
#define VS_OP_RST 3
#define VS_OP_SHUTDOWN 4
#define VS_OP_RW 5
#define VS_OP_CREDIT_UPDATE 6
#define VS_OP_CREDIT_REQUEST 7
#define VS_RX_BUFS 4
#define VS_BUF 4096
#define VS_HOST_PORT 5000
#define VS_GUEST_LOCAL 41000
#define VS_LISTEN_PORT 1024
#define VS_BUF_ALLOC 65536

struct vsock_state {
	struct vq tx;
	u64 cid;
	u8 *txbuf;
	u32 fwd_connect, fwd_listen;
};
static int vs_send(struct vsock_state *s, u32 src_port, u64 dst_cid, u32 dst_port, u16 op, u32 flags,
		   const void *payload, u32 len, u32 fwd)
{
	struct vsock_hdr *h = (struct vsock_hdr *)s->txbuf;
	memset(h, 0, sizeof(*h));
	h->src_cid = s->cid;
	h->dst_cid = dst_cid;
	h->src_port = src_port;
	h->dst_port = dst_port;
	h->len = len;
	h->type = 1;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = VS_BUF_ALLOC;
	h->fwd_cnt = fwd;
	struct buf b[2] = {{h, sizeof(*h), 0}, {s->txbuf + 64, len, 0}};
	if (len)
		memcpy(s->txbuf + 64, payload, len);
	vq_offer(&s->tx, 0, b, len ? 2 : 1);
	vq_kick(&s->tx);
	u32 id, ul;
	return vq_wait(&s->tx, &id, &ul, SPINS_SHORT) ? 0 : -1;
}
static void test_vsock(u64 base)
{
	const char *n = "vsock";
	u32 feat;
	struct vq rx, ev;
	struct vsock_state s;
	if (dev_begin(n, base, 0, &feat) || vq_setup(n, base, 0, &rx) || vq_setup(n, base, 1, &s.tx) ||
	    vq_setup(n, base, 2, &ev))
		return;
	s.cid = (u64)r32(base, R_CONFIG) | ((u64)r32(base, R_CONFIG + 4) << 32);
	s.fwd_connect = s.fwd_listen = 0;
	dev_ready(base);
	u8 *evb = alloc(64, 64);
	struct buf eb = {evb, 64, 1};
	vq_offer(&ev, 0, &eb, 1);
	vq_kick(&ev);
	u8 *rxb[VS_RX_BUFS];
	for (int i = 0; i < VS_RX_BUFS; i++) {
		rxb[i] = alloc(VS_BUF, 64);
		struct buf b = {rxb[i], VS_BUF, 1};
		vq_offer(&rx, (u16)i, &b, 1);
	}
	vq_kick(&rx);
	s.txbuf = alloc(VS_BUF, 64);

	static const char hello[] = "HELLO from hive guest";
	static const char want_reply[] = "REPLY from host";
	int connect_done = 0, listen_done = 0;
	u32 listen_peer_port = 0;
	u64 listen_peer_cid = 2;
	if (vs_send(&s, VS_GUEST_LOCAL, 2, VS_HOST_PORT, VS_OP_REQUEST, 0, 0, 0, 0))
		return (void)fail(n, "REQUEST not consumed");
	u64 spins = SPINS_PEER * 2;
	while (spins-- && !(connect_done && listen_done)) {
		u32 id, len;
		if (!vq_poll(&rx, &id, &len)) {
			pause();
			continue;
		}
		if (id >= VS_RX_BUFS)
			return (void)fail(n, "rx used id out of range");
		struct vsock_hdr h;
		memcpy(&h, rxb[id], sizeof(h));
		u8 *payload = rxb[id] + sizeof(h);
		if (len < sizeof(h) || h.len > len - sizeof(h))
			return (void)fail(n, "short packet from device");
		if (h.dst_cid != s.cid || h.type != 1)
			return (void)fail(n, "packet for another cid or type");
		int err = 0;
		if (h.dst_port == VS_GUEST_LOCAL) {
			if (h.op == VS_OP_RESPONSE) {
				err = vs_send(&s, VS_GUEST_LOCAL, 2, VS_HOST_PORT, VS_OP_RW, 0, hello, sizeof(hello) - 1,
					      s.fwd_connect);
			} else if (h.op == VS_OP_RW) {
				s.fwd_connect += h.len;
				if (h.len != sizeof(want_reply) - 1 || memcmp(payload, want_reply, h.len))
					return (void)fail(n, "unexpected reply on the guest-initiated connection");
				connect_done = 1;
				err = vs_send(&s, VS_GUEST_LOCAL, 2, VS_HOST_PORT, VS_OP_SHUTDOWN, 3, 0, 0, s.fwd_connect);
			} else if (h.op == VS_OP_RST && !connect_done) {
				return (void)fail(n, "host reset the connection to port 5000");
			} else if (h.op == VS_OP_CREDIT_REQUEST) {
				err = vs_send(&s, VS_GUEST_LOCAL, 2, VS_HOST_PORT, VS_OP_CREDIT_UPDATE, 0, 0, 0,
					      s.fwd_connect);
			}
		} else if (h.dst_port == VS_LISTEN_PORT) {
			if (h.op == VS_OP_REQUEST) {
				listen_peer_port = h.src_port;
				listen_peer_cid = h.src_cid;
				err = vs_send(&s, VS_LISTEN_PORT, listen_peer_cid, listen_peer_port, VS_OP_RESPONSE, 0, 0, 0,
					      0);
			} else if (h.op == VS_OP_RW && h.src_port == listen_peer_port) {
				s.fwd_listen += h.len;
				u8 reply[128];
				memcpy(reply, "ECHO:", 5);
				u32 l = h.len > 100 ? 100 : h.len;
				memcpy(reply + 5, payload, l);
				err = vs_send(&s, VS_LISTEN_PORT, listen_peer_cid, listen_peer_port, VS_OP_RW, 0, reply, l + 5,
					      s.fwd_listen);
				listen_done = 1;
			} else if (h.op == VS_OP_CREDIT_REQUEST) {
				err = vs_send(&s, VS_LISTEN_PORT, listen_peer_cid, listen_peer_port, VS_OP_CREDIT_UPDATE, 0, 0,
					      0, s.fwd_listen);
			}
		} else if (h.op != VS_OP_RST) {
			/* Unknown port: answer with RST, as a real guest would. */
			err = vs_send(&s, h.dst_port, h.src_cid, h.src_port, VS_OP_RST, 0, 0, 0, 0);
		}
		if (err)
			return (void)fail(n, "tx packet not consumed");
		struct buf b = {rxb[id], VS_BUF, 1};
		vq_offer(&rx, (u16)id, &b, 1);
		vq_kick(&rx);
	}
	if (!connect_done)
		return (void)fail(n, "no reply from host port 5000");
	if (!listen_done)
		return (void)fail(n, "no host connection to guest port 1024");
	puts_("OK vsock cid=");
	putdec(s.cid);
	puts_(" connect=5000 listen=1024\n");
	n_ok++;
}

/* ---- command line ---- */
static int parse_num(const char **p, u64 *out)
{
	const char *s = *p;
	u64 v = 0;
	int any = 0;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		s += 2;
		for (;; s++) {
			u8 c = (u8)*s;
			u32 d;
			if (c >= '0' && c <= '9')
				d = c - '0';
			else if (c >= 'a' && c <= 'f')
				d = c - 'a' + 10;
			else if (c >= 'A' && c <= 'F')
				d = c - 'A' + 10;
			else
				break;
			v = v * 16 + d;
			any = 1;
		}
	} else {
		for (; *s >= '0' && *s <= '9'; s++) {
			v = v * 10 + (u64)(*s - '0');
			any = 1;
		}
	}
	if (*s == 'K' || *s == 'k') {
		v <<= 10;
		s++;
	} else if (*s == 'M' || *s == 'm') {
		v <<= 20;
		s++;
	}
	*p = s;
	*out = v;
	return any ? 0 : -1;
}

#define MAX_DEVS 32
struct mmio_dev {
	u64 size, addr, irq;
};

static const char *dev_name(u32 id)
{
	switch (id) {
	case 1:
		return "net";
	case 2:
		return "block";
	case 4:
		return "rng";
	case 19:
		return "vsock";
	default:
		return "unknown";
	}
}

void guest_main(u32 protocol, u64 info)
{
	extern u8 __bss_start[], __bss_end[];
	memset(__bss_start, 0, (usize)(__bss_end - __bss_start));
	/* first serial byte as early as possible: the benchmark times it */
	puts_("HIVE-GUEST boot=");
	puts_(protocol == 1 ? "pvh" : "linux64");
	putc_('\n');

	const char *cmdline = 0;
	if (protocol == 1) {
		u32 *si = (u32 *)(usize)info;
		if (si[0] != 0x336ec578) {
			fail("boot", "bad hvm_start_info magic");
		} else {
			cmdline = (const char *)(usize)(*(u64 *)(usize)(info + 24));
		}
	} else {
		u32 ptr = *(u32 *)(usize)(info + 0x228);
		cmdline = (const char *)(usize)ptr;
	}
	if (!cmdline)
		cmdline = "";

	struct mmio_dev devs[MAX_DEVS];
	int ndev = 0;
	static const char key[] = "virtio_mmio.device=";
	usize klen = slen(key);
	for (const char *p = cmdline; *p;) {
		while (*p == ' ')
			p++;
		if (!memcmp(p, key, klen) && ndev < MAX_DEVS) {
			const char *q = p + klen;
			struct mmio_dev d;
			if (parse_num(&q, &d.size) || *q++ != '@' || parse_num(&q, &d.addr) || *q++ != ':' ||
			    parse_num(&q, &d.irq))
				fail("cmdline", "malformed virtio_mmio.device entry");
			else
				devs[ndev++] = d;
		}
		while (*p && *p != ' ')
			p++;
	}

	/* A summary, not the line itself: one serial exit per byte, and QEMU's line (24 transport
	 * slots) is far longer than ours, which would skew the benchmark. */
	puts_("cmdline bytes=");
	putdec(slen(cmdline));
	puts_(" virtio_mmio=");
	putdec((u64)ndev);
	putc_('\n');
	for (int i = 0; i < ndev; i++) {
		u64 b = devs[i].addr;
		if (r32(b, R_MAGIC) != 0x74726976) {
			fail("probe", "bad magic");
			continue;
		}
		if (r32(b, R_VERSION) != 2) {
			fail("probe", "not virtio-mmio version 2");
			continue;
		}
		u32 id = r32(b, R_DEVICE_ID);
		if (id == 0)
			continue; /* empty transport slot (QEMU microvm has several) */
		puts_("device ");
		puts_(dev_name(id));
		puts_(" at ");
		puthex(b);
		puts_(" irq ");
		putdec(devs[i].irq);
		putc_('\n');
		arena_used = 0;
		switch (id) {
		case 2:
			test_block(b);
			break;
		case 4:
			test_rng(b);
			break;
		case 1:
			test_net(b);
			break;
		case 19:
			test_vsock(b);
			break;
		default:
			fail("probe", "unknown device id");
		}
		w32(b, R_STATUS, 0); /* leave every device reset */
	}
	puts_("DONE ok=");
	putdec((u64)n_ok);
	puts_(" fail=");
	putdec((u64)n_fail);
	putc_('\n');
	/* i8042 reset stops our VMM (and QEMU); isa-debug-exit at 0xf4 stops QEMU microvm without it. */
	outb(0x64, 0xfe);
	outb(0xf4, 0);
}
