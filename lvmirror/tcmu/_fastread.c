/*
 * lvmirror.tcmu._fastread: the ring thread's compiled path for READs the page cache holds, and
 * for the WRITEs of a volume (1-4 images) and large READs (take_batch, below).
 *
 * read_batch() walks the TCMU command ring from the caller's fetch cursor to the
 * kernel's cmd_head and answers every consecutive READ(10)/READ(16) it can serve from memory:
 * Data-In iovecs (at most MAX_IOVECS) of exactly the transfer length, in range, read with one preadv2() that
 * returns every byte without waiting (RWF_NOWAIT, or a plain read on a memory file system the
 * caller vouches for). It completes each one GOOD on the ring as the Python ring does
 * (CommandRing._complete_locked: the CMD entry at cmd_tail is "stolen", the kernel looks the
 * command up by the id written there, cmd_tail moves with one aligned 32-bit store after the
 * response bytes) and stops at the first entry it does not answer, which the Python fetch then
 * takes up as before. Layouts come from the kernel's own header (linux/target_core_user.h).
 *
 * take_batch(), run_batch() and complete_batch() make the WRITE(10)/WRITE(16) commands without
 * FUA of a volume whose 1-4 images are in sync (to each image in turn), and READs over
 * read_batch's size (up to 1 MiB; read_batch stops at one with STOP_BIG_READ), in three steps, because their I/O may wait (a buffered write: dirty-
 * page throttling, the journal, stable pages) or is long (a 1 MiB copy): take_batch parses up to
 * MAX_WRITES consecutive commands of one kind holding the GIL and the caller's ring lock, and
 * returns a packed copy of what the other two need (the caller moves its fetch cursor past
 * them); run_batch makes their I/O with the GIL RELEASED and without the ring's lock, so that a
 * ring thread that takes over from a stuck one (lvmirror/daemon/lunserver.py, the watchdog)
 * fetches and completes meanwhile; complete_batch answers GOOD those done whole, under the ring's
 * lock, after reading its `busy` conditions again (a group split's hold of the LUN's completions
 * that began during the I/O holds theirs too). The caller keeps the volume as it was meanwhile
 * (MirrorVolume.begin_fast_writes/begin_fast_reads: the split epoch entered; lock_fast: a region
 * lock over the blocks the commands cover).
 *
 * lease_batch() makes the same three steps in one call for a ring thread that holds its lease on
 * a one-image volume (lvmirror/mirror/ringlease.py: the whole LUN locked and the epoch entered
 * across batches), taking the ring's lock itself around the take and the completions, never
 * around the I/O, and moving the ring's own fetch cursor and counts as ring.py does: at queue
 * depth 1 a batch is one command, and the Python between the three calls was most of what a
 * 4 KiB WRITE cost the ring thread beyond the pwritev.
 *
 * lease_serve() is the ring thread's loop itself under that lease: batches of both kinds up to
 * cmd_head, the kernel told (a 4-byte write to the UIO descriptor), poll(2) on the UIO descriptor
 * and the LUN's wake-up pipe with the GIL released, the event counter read - tcmu-runner's loop -
 * returning to Python only for what the Python loop answers (another opcode, a failed, slow or
 * handed-over batch, a wake-up). Each batch is counted in the LUN's Python counters before the
 * kernel is told. On a mirror the lease is for READs only (no descriptor to write): the loop
 * returns at the first WRITE, which the Python loop makes outside the lease.
 *
 * Why C: the Python path spends 20-40 us of CPU on such a READ (fetch, the SCSI core, the
 * volume, completion); in the kernel lab the ring thread answered 99-100 % of 4 KiB commands
 * and lvmirror stayed at 0.6-0.7x the IOPS of tcmu-runner on the same ring, the gap being that
 * per-command cost (bench/results, the closing notes of issue 15).
 *
 * Safety: read_batch holds the GIL from its first check to its last completion and calls no
 * Python code, so no other thread of the process can change the volume meanwhile. Its
 * conditions (`checks`, `busy`) are read at its start from the objects themselves, not from a
 * copy: the volume open and online, no restore, no torn region, the same split epoch, the
 * image in sync and still open on the same descriptor, no region lock held or awaited, the LUN
 * serving that LU with no completions held and no unit attention pending. Every offset read
 * from the ring is checked before use, as ring.py checks it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
/* the kernel header includes linux/uio.h, whose struct iovec glibc's sys/uio.h (preadv2)
 * already declares with the same layout */
#define __LINUX_UIO_H
#include <linux/target_core_user.h>

#define CHECK_IS 0      /* getattr(obj, name) is value */
#define CHECK_FALSY 1   /* not getattr(obj, name): None, bool, int, str, bytes, list, tuple, dict, set */
#define CHECK_EQ 2      /* getattr(obj, name) == value, both exact ints */

/* the most Data-In/Data-Out iovecs of a command it answers (a 1 MiB transfer in 4 KiB data
 * blocks the kernel found apart is 256); a command with more is the Python path's */
#define MAX_IOVECS 256

/* what one take_batch takes at most, besides its `max_commands`: the iovecs of its commands
 * (run_batch's pool on the stack) and their bytes */
#define BATCH_IOVECS 1024
#define BATCH_BYTES (8u << 20)

/* why read_batch stopped (the fifth item it returns) */
#define STOP_HEAD 0     /* it reached cmd_head: every command there was answered */
#define STOP_OTHER 1    /* the next entry is not one it answers: the Python fetch takes it */
#define STOP_STALE 2    /* a `checks` condition no longer holds: the caller arms again */
#define STOP_BUSY 3     /* a `busy` condition holds (a region lock, held completions) */
#define STOP_MISS 4     /* the data is not all in memory, or the read failed: the Python path */
#define STOP_WRITE 5    /* read_batch: the next entry is a WRITE a WRITE batch may make */
#define STOP_MISS_WRITE 6   /* a WRITE batch: a write failed or was short (the caller's code) */
#define STOP_READ 7     /* take_batch of WRITEs: the next entry is a READ read_batch may answer */
#define STOP_BIG_READ 8 /* read_batch: the next entry is a READ over `max_bytes` that a READ
                         * batch may answer; take_batch of READs: its batch is full */

/* the most commands one take_batch takes */
#define MAX_WRITES 64

static int
falsy_builtin(PyObject *v)
{
    /* 1: v is false; 0: true; -1: a type whose truth might run Python code */
    if (v == Py_None || v == Py_False)
        return 1;
    if (v == Py_True)
        return 0;
    if (PyLong_CheckExact(v) || PyUnicode_CheckExact(v) || PyBytes_CheckExact(v)
            || PyList_CheckExact(v) || PyTuple_CheckExact(v) || PyDict_CheckExact(v)
            || PyAnySet_CheckExact(v))
        return PyObject_IsTrue(v) ? 0 : 1;
    return -1;
}

/* 1 when every (obj, name, mode, value) of `checks` holds, 0 when one does not, -1 on a
 * malformed tuple (TypeError set) */
static int
conditions_hold(PyObject *checks)
{
    Py_ssize_t n = PyTuple_GET_SIZE(checks);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(checks, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 4) {
            PyErr_SetString(PyExc_TypeError, "a check is (obj, name, mode, value)");
            return -1;
        }
        PyObject *obj = PyTuple_GET_ITEM(item, 0), *name = PyTuple_GET_ITEM(item, 1);
        long mode = PyLong_AsLong(PyTuple_GET_ITEM(item, 2));
        if (mode == -1 && PyErr_Occurred())
            return -1;
        PyObject *want = PyTuple_GET_ITEM(item, 3);
        PyObject *v = PyObject_GetAttr(obj, name);
        if (v == NULL) {
            PyErr_Clear();
            return 0;
        }
        int ok;
        if (mode == CHECK_IS)
            ok = v == want;
        else if (mode == CHECK_FALSY)
            ok = falsy_builtin(v) == 1;
        else if (mode == CHECK_EQ)
            ok = PyLong_CheckExact(v) && PyLong_CheckExact(want)
                 && PyObject_RichCompareBool(v, want, Py_EQ) == 1;
        else {
            Py_DECREF(v);
            PyErr_SetString(PyExc_ValueError, "unknown check mode");
            return -1;
        }
        Py_DECREF(v);
        if (!ok)
            return 0;
    }
    return 1;
}

static inline uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static inline uint64_t be64(const uint8_t *p)
{
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* Complete command `cmd_id` GOOD at cmd_tail (ring.py's _complete_locked for a GOOD status
 * without sense or read_len). The caller has fetched the command, so a CMD entry lies between
 * cmd_tail and its fetch cursor, and every entry there was checked when it was fetched. */
static void
complete_good(uint8_t *map, uint32_t cmdr_off, uint32_t size, uint16_t cmd_id)
{
    struct tcmu_mailbox *mb = (struct tcmu_mailbox *)map;
    uint32_t tail = mb->cmd_tail % size;
    struct tcmu_cmd_entry *ent;
    for (;;) {
        ent = (struct tcmu_cmd_entry *)(map + cmdr_off + tail);
        if (tcmu_hdr_get_op(ent->hdr.len_op) == TCMU_OP_CMD)
            break;
        tail = (tail + tcmu_hdr_get_len(ent->hdr.len_op)) % size;
    }
    ent->hdr.cmd_id = cmd_id;
    ent->hdr.uflags &= (uint8_t)~(TCMU_UFLAG_UNKNOWN_OP | TCMU_UFLAG_READ_LEN | TCMU_UFLAG_KEEP_BUF);
    ent->rsp.scsi_status = 0;       /* GOOD */
    __atomic_store_n(&mb->cmd_tail, (tail + tcmu_hdr_get_len(ent->hdr.len_op)) % size,
                     __ATOMIC_RELEASE);
}

/* One READ/WRITE command parsed from the ring by parse_entry. */
struct rw_cmd {
    uint32_t length;            /* the entry's length in the command ring (bytes) */
    uint16_t cmd_id;
    uint64_t lba, want;         /* first block; bytes to transfer (TRANSFER LENGTH x block) */
    uint32_t iov_cnt;
    struct iovec *iov;          /* iov_cnt iovecs in the caller's pool, into the data area */
    const uint8_t *cdb;         /* in the ring entry */
    uint8_t cdb_len;            /* 10 or 16 */
};

#define ENT_PAD 0       /* a PAD entry of cmd->length bytes */
#define ENT_READ 1      /* a READ(10)/READ(16) this module may answer, in `cmd` */
#define ENT_WRITE 2     /* a WRITE(10)/WRITE(16) without FUA it may answer, in `cmd` */
#define ENT_OTHER 3     /* anything else: the Python fetch takes it (and logs a corrupt one) */
#define ENT_FULL 4      /* a READ/WRITE of more iovecs than `room` left in the caller's pool */

/* Parse the entry at ring offset `fetch` (before `head`) of a ring whose geometry the caller
 * checked, its iovecs into `pool` (`room` of them free). Every offset read from the ring is
 * checked before use, as ring.py checks it. */
static int
parse_entry(uint8_t *map, uint32_t cmdr_off, uint32_t cmdr_size, uint64_t data_off,
            uint64_t map_size, uint32_t fetch, uint32_t head, uint64_t num_blocks,
            uint32_t block_size, uint64_t max_bytes, uint64_t max_blocks, struct iovec *pool,
            uint32_t room, struct rw_cmd *c)
{
    struct tcmu_cmd_entry *e = (struct tcmu_cmd_entry *)(map + cmdr_off + fetch);
    uint32_t len_op = e->hdr.len_op;
    uint32_t length = tcmu_hdr_get_len(len_op);
    if (length < sizeof(struct tcmu_cmd_entry_hdr) || (uint64_t)fetch + length > cmdr_size
            || length > ((uint64_t)head + cmdr_size - fetch) % cmdr_size)
        return ENT_OTHER;               /* corrupt: ring.py's fetch logs and stops there */
    c->length = length;
    int op = tcmu_hdr_get_op(len_op);
    if (op == TCMU_OP_PAD)
        return ENT_PAD;
    if (op != TCMU_OP_CMD || length < sizeof(struct tcmu_cmd_entry))
        return ENT_OTHER;
    uint32_t iov_cnt = e->req.iov_cnt;
    if (iov_cnt == 0 || iov_cnt > MAX_IOVECS || e->req.iov_bidi_cnt || e->req.iov_dif_cnt)
        return ENT_OTHER;
    uint64_t ent_off = (uint64_t)cmdr_off + fetch, ent_end = ent_off + length;
    uint64_t iov_end = ent_off + offsetof(struct tcmu_cmd_entry, req.iov)
                       + (uint64_t)iov_cnt * sizeof(struct iovec);
    uint64_t cdb_off = e->req.cdb_off;
    if (iov_end > ent_end || cdb_off < iov_end || cdb_off >= ent_end)
        return ENT_OTHER;
    const uint8_t *cdb = map + cdb_off;
    uint64_t lba, nblk;
    unsigned int control;
    if ((cdb[0] == 0x28 || cdb[0] == 0x2A) && cdb_off + 10 <= ent_end) {  /* READ/WRITE(10) */
        c->cdb_len = 10;
        lba = be32(cdb + 2);
        nblk = ((unsigned)cdb[7] << 8) | cdb[8];
        control = cdb[9];
    } else if ((cdb[0] == 0x88 || cdb[0] == 0x8A) && cdb_off + 16 <= ent_end) {   /* (16) */
        c->cdb_len = 16;
        lba = be64(cdb + 2);
        nblk = be32(cdb + 10);
        control = cdb[15];
    } else {
        return ENT_OTHER;
    }
    int is_write = cdb[0] == 0x2A || cdb[0] == 0x8A;
    /* RD/WRPROTECT (no protection information here) and NACA (no ACA) get CHECK CONDITION
     * from the SCSI core; TRANSFER LENGTH 0 is GOOD with no data, also its answer; a WRITE with
     * FUA (SBC-4 5.40: durable before GOOD) is the Python path's, which makes it durable */
    if ((cdb[1] & 0xE0) || (is_write && (cdb[1] & 0x08)) || (control & 0x04) || nblk == 0
            || nblk > max_blocks || lba > num_blocks || nblk > num_blocks - lba
            || nblk * block_size > max_bytes)
        return ENT_OTHER;
    uint64_t want = nblk * block_size, total = 0;
    struct iovec scratch;
    c->iov = pool;
    for (uint32_t k = 0; k < iov_cnt; k++) {
        /* the kernel writes each iov_base as an offset from the map's start */
        uint64_t base = (uint64_t)(uintptr_t)e->req.iov[k].iov_base;
        uint64_t ilen = e->req.iov[k].iov_len;
        if (base < data_off || base > map_size || ilen > map_size - base)
            return ENT_OTHER;
        struct iovec *v = k < room ? &pool[k] : &scratch;   /* (counted, not kept) */
        v->iov_base = map + base;
        v->iov_len = ilen;
        total += ilen;
    }
    if (total != want)              /* outside the data area, or not the transfer length */
        return ENT_OTHER;
    if (iov_cnt > room)             /* checked last: a full pool ends a batch, no more */
        return ENT_FULL;
    c->cmd_id = e->hdr.cmd_id;
    c->cdb = cdb;
    c->lba = lba;
    c->want = want;
    c->iov_cnt = iov_cnt;
    return is_write ? ENT_WRITE : ENT_READ;
}

/* What every entry point does first: check the ring's geometry and the fetch cursor
 * (ValueError), read the conditions (`checks` then `busy`) and the kernel's cmd_head. Returns
 * STOP_HEAD when the batch may start, STOP_STALE/STOP_BUSY when a condition does not hold,
 * STOP_OTHER for a cmd_head that is not a ring offset (ring.py's fetch logs it), or -1 with an
 * exception set (the caller releases `ring`). */
static int
begin_batch(Py_buffer *ring, uint32_t cmdr_off, uint32_t cmdr_size, uint64_t data_off,
            uint64_t map_size, uint32_t fetch, uint32_t block_size, PyObject *checks,
            PyObject *busy, uint32_t *head)
{
    if ((unsigned long long)ring->len < map_size || map_size < sizeof(struct tcmu_mailbox)
            || cmdr_off < sizeof(struct tcmu_mailbox) || cmdr_size < sizeof(struct tcmu_cmd_entry)
            || (unsigned long long)cmdr_off + cmdr_size > data_off || data_off > map_size
            || cmdr_size % TCMU_OP_ALIGN_SIZE || fetch >= cmdr_size
            || fetch % TCMU_OP_ALIGN_SIZE || block_size == 0) {
        PyErr_SetString(PyExc_ValueError, "ring geometry or fetch cursor out of range");
        return -1;
    }
    int ok = conditions_hold(checks);
    if (ok == 0)
        return STOP_STALE;
    if (ok > 0)
        ok = conditions_hold(busy);
    if (ok < 0)
        return -1;
    if (ok == 0)
        return STOP_BUSY;
    struct tcmu_mailbox *mb = (struct tcmu_mailbox *)ring->buf;
    *head = __atomic_load_n(&mb->cmd_head, __ATOMIC_ACQUIRE);
    if (*head >= cmdr_size || *head % TCMU_OP_ALIGN_SIZE)
        return STOP_OTHER;
    return STOP_HEAD;
}

/* read_batch's walk, after begin_batch said it may start (`head` the kernel's cmd_head): answers
 * the READs from `fetch` on that one preadv2(`fd`, ..., `rwf`) serves whole, in ring order, and
 * returns the new fetch cursor; adds the commands answered, their bytes and the PAD entries
 * skipped to `*answered`, `*nbytes`, `*pads`, and says why it stopped in `*why`. */
static uint32_t
read_run(uint8_t *map, uint32_t cmdr_off, uint32_t cmdr_size, uint64_t data_off,
         uint64_t map_size, uint32_t fetch, uint32_t head, int fd, int rwf, uint64_t num_blocks,
         uint32_t block_size, uint64_t max_bytes, uint64_t max_blocks, uint64_t big_bytes,
         uint64_t write_bytes, Py_ssize_t *answered, unsigned long long *nbytes,
         Py_ssize_t *pads, int *why)
{
    if (write_bytes == 0)
        write_bytes = max_bytes;
    uint64_t parse_max = big_bytes > max_bytes ? big_bytes : max_bytes;
    if (write_bytes > parse_max)
        parse_max = write_bytes;
    struct iovec pool[MAX_IOVECS];
    struct rw_cmd c;
    *why = STOP_HEAD;
    while (fetch != head) {
        int kind = parse_entry(map, cmdr_off, cmdr_size, data_off, map_size, fetch, head,
                               num_blocks, block_size, parse_max, max_blocks, pool, MAX_IOVECS,
                               &c);
        if (kind == ENT_PAD) {
            (*pads)++;
            fetch = (fetch + c.length) % cmdr_size;
            continue;
        }
        if (kind != ENT_READ) {
            /* (a WRITE over `write_bytes`, the WRITE batch's largest, is the Python fetch's,
             * and no whole-volume lock is taken for nothing) */
            *why = kind == ENT_WRITE && c.want <= write_bytes ? STOP_WRITE : STOP_OTHER;
            break;
        }
        if (c.want > max_bytes) {
            *why = STOP_BIG_READ;       /* a READ batch's, copied without the GIL */
            break;
        }
        ssize_t got = preadv2(fd, c.iov, (int)c.iov_cnt, (off_t)(c.lba * block_size), rwf);
        if (got < 0 || (uint64_t)got != c.want) {
            *why = STOP_MISS;           /* EAGAIN, short, an error: the Python path */
            break;
        }
        fetch = (fetch + c.length) % cmdr_size;
        complete_good(map, cmdr_off, cmdr_size, c.cmd_id);
        (*answered)++;
        *nbytes += c.want;
    }
    return fetch;
}

PyDoc_STRVAR(read_batch_doc,
"read_batch(ring, cmdr_off, cmdr_size, data_off, map_size, fetch, fd, rwf, num_blocks,\n"
"           block_size, max_bytes, max_blocks, checks, busy, big_bytes=0, write_bytes=0)\n"
"    -> (fetch, answered, nbytes, pads, why)\n"
"\n"
"Answer the READ(10)/READ(16) commands from ring offset `fetch` (bytes) on, in ring order,\n"
"while each is served from memory: 1-256 Data-In iovecs of exactly TRANSFER LENGTH x\n"
"`block_size` bytes in all (at most `max_bytes`), TRANSFER LENGTH 1..`max_blocks`, the range inside\n"
"`num_blocks`, no RDPROTECT, no NACA (SBC-4 5.15/5.16; anything else is the SCSI core's to\n"
"answer), and one preadv2(`fd`, ..., `rwf`) returning every byte. `ring`: the writable map\n"
"(mailbox, command ring, data area), `cmdr_off`/`cmdr_size`/`data_off`/`map_size` its checked\n"
"geometry in bytes. `checks` and `busy`: tuples of (obj, name, mode, value), mode 0\n"
"`getattr(obj, name) is value`, 1 false (a builtin type), 2 equal (ints); read once, first.\n"
"It holds the GIL throughout. A READ over `max_bytes` and at most `big_bytes` stops it with 8\n"
"(take_batch's, whose READs are copied without the GIL). A WRITE of at most `write_bytes`\n"
"(0: `max_bytes`), the WRITE batch's largest, stops it with 5, a larger one with 1.\n"
"\n"
"Returns the new fetch cursor, the commands answered GOOD, their bytes, the PAD entries\n"
"skipped, and why it stopped: 0 cmd_head reached, 1 an entry it does not answer, 2 a\n"
"`checks` condition failed, 3 a `busy` one, 4 a read not served from memory (nothing\n"
"answered for that command), 5 a WRITE a WRITE batch may make (take_batch), 8 a READ over\n"
"`max_bytes` for a READ batch (take_batch). TypeError/ValueError for malformed arguments; never an I/O\n"
"error (the Python path reads such a command again and reports it).");

static PyObject *
read_batch(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring;
    unsigned int cmdr_off, cmdr_size, fetch;
    unsigned long long data_off, map_size, num_blocks, max_bytes, max_blocks, big_bytes = 0;
    unsigned long long write_bytes = 0;
    int fd, rwf;
    unsigned int block_size;
    PyObject *checks, *busy;

    if (!PyArg_ParseTuple(args, "w*IIKKIiiKIKKO!O!|KK", &ring, &cmdr_off, &cmdr_size, &data_off,
                          &map_size, &fetch, &fd, &rwf, &num_blocks, &block_size, &max_bytes,
                          &max_blocks, &PyTuple_Type, &checks, &PyTuple_Type, &busy,
                          &big_bytes, &write_bytes))
        return NULL;
    uint8_t *map = ring.buf;
    Py_ssize_t answered = 0, pads = 0;
    unsigned long long nbytes = 0;
    uint32_t head = 0;
    int why = begin_batch(&ring, cmdr_off, cmdr_size, data_off, map_size, fetch, block_size,
                          checks, busy, &head);
    if (why < 0) {
        PyBuffer_Release(&ring);
        return NULL;
    }
    if (why == STOP_HEAD)
        fetch = read_run(map, cmdr_off, cmdr_size, data_off, map_size, fetch, head, fd, rwf,
                         num_blocks, block_size, max_bytes, max_blocks, big_bytes,
                         write_bytes, &answered, &nbytes, &pads, &why);
    PyBuffer_Release(&ring);
    return Py_BuildValue("(InKni)", fetch, answered, nbytes, pads, why);
}

/* One command take_batch took, as it packs it in the bytes it returns (after a struct
 * taken_hdr, then the records, then their iovecs as struct taken_iov): what run_batch needs for
 * its I/O, what complete_batch needs to answer it, and what ring.py needs to make it a Command
 * for the Python path. Native byte order; ring.py unpacks it as "=QQIIHB5x16s". */
struct taken_hdr {
    uint32_t n;                 /* records */
    uint32_t iovs;              /* iovecs after them */
};
struct taken {
    uint64_t offset;            /* bytes: its first block x the block size */
    uint64_t want;              /* bytes */
    uint32_t iov_first;         /* its first iovec, an index into the iovecs */
    uint32_t iov_cnt;
    uint16_t cmd_id;
    uint8_t cdb_len;            /* 10 or 16 */
    uint8_t reserved[5];
    uint8_t cdb[16];
};
struct taken_iov {
    uint64_t off;               /* from the map's start, inside the data area */
    uint64_t len;
};

PyDoc_STRVAR(take_batch_doc,
"take_batch(ring, cmdr_off, cmdr_size, data_off, map_size, fetch, num_blocks, block_size,\n"
"           max_bytes, max_blocks, max_commands, checks, busy, writes, other_bytes=0)\n"
"    -> (fetch, taken, pads, why, packed, first, blocks)\n"
"\n"
"TAKE the consecutive WRITE(10)/WRITE(16) commands without FUA (`writes` true) or\n"
"READ(10)/READ(16) commands (false) from ring offset `fetch` (bytes) on, in ring order, up to\n"
"`max_commands` of them (at most 64), 1,024 iovecs and 8 MiB, with read_batch's field checks\n"
"(SBC-4 5.15/5.16/5.40: no RD/WRPROTECT, no NACA, no FUA, TRANSFER LENGTH 1..`max_blocks`,\n"
"at most `max_bytes`, inside `num_blocks`), after `checks` and `busy` hold. It does NO I/O and\n"
"answers nothing: the caller moves its fetch cursor, counts the commands outstanding (the\n"
"ring's lock held: ring.py's take_fast), makes their I/O with run_batch WITHOUT that lock, and\n"
"answers them with complete_batch, or as Commands on the Python path. `packed` (bytes)\n"
"describes them: a header (records, iovecs: 2 x uint32), the records (struct taken: offset\n"
"and length in bytes, first iovec, iovecs, cmd_id, CDB length, CDB; 48 bytes each), their iovecs (offset\n"
"in the map, length: 2 x uint64).\n"
"\n"
"Returns the new fetch cursor, the commands taken, the PAD entries skipped, why it stopped\n"
"(0 cmd_head reached, 1 an entry neither path's batch answers - one of its own kind over\n"
"`max_bytes` too - 2/3 a `checks`/`busy` condition, 5 a WRITE next or the WRITE batch is full\n"
"(call again), 7 a READ next, 8 the READ batch is full), `packed`, and the blocks the\n"
"commands cover (`first`, `blocks`: 0, 0 for none). The other kind's\n"
"commands are parsed up to the larger of `max_bytes` and `other_bytes` (bytes), so that one up\n"
"to that size stops it with 5 or 7 rather than 1 (the other kind's batch decides).\n"
"TypeError/ValueError for malformed arguments.");

/* What take_batch and lease_batch take: the parse of up to `max_commands` consecutive
 * commands of one kind (`writes`) from `fetch` on, after begin_batch said the batch may start
 * (`why` STOP_HEAD, `head` the kernel's cmd_head). Fills `cmds` and `pool` and returns the
 * commands taken; `*cur`, `*pads`, `*why`, `*lo`, `*hi` get the new fetch cursor, the PAD
 * entries skipped, why it stopped and the blocks [lo, hi) the commands cover. */
static uint32_t
take_into(uint8_t *map, uint32_t cmdr_off, uint32_t cmdr_size, uint64_t data_off,
          uint64_t map_size, uint32_t fetch, uint32_t head, uint64_t num_blocks,
          uint32_t block_size, uint64_t max_bytes, uint64_t max_blocks, uint32_t max_commands,
          int writes, uint64_t other_bytes, struct rw_cmd *cmds, struct iovec *pool,
          uint32_t *used_out, uint32_t *cur_out, Py_ssize_t *pads_out, int *why_io,
          uint64_t *lo_out, uint64_t *hi_out)
{
    int why = *why_io;
    int mine = writes ? ENT_WRITE : ENT_READ;
    int full = writes ? STOP_WRITE : STOP_BIG_READ;     /* the caller calls again */
    int other = writes ? STOP_READ : STOP_WRITE;        /* the other function's */
    uint64_t parse_max = other_bytes > max_bytes ? other_bytes : max_bytes;
    uint32_t n = 0, cur = fetch, used = 0;
    uint64_t batch_bytes = 0, lo = 0, hi = 0;   /* the blocks [lo, hi) the commands cover */
    Py_ssize_t pads = 0;
    if (max_commands > MAX_WRITES)
        max_commands = MAX_WRITES;
    while (why == STOP_HEAD && cur != head) {
        if (n == max_commands) {
            why = full;
            break;
        }
        /* parsed up to the other kind's size too, so that a READ of up to 1 MiB after a WRITE
         * is the READ path's (read_batch passes it on), not the Python fetch's */
        int kind = parse_entry(map, cmdr_off, cmdr_size, data_off, map_size, cur, head,
                               num_blocks, block_size, parse_max, max_blocks, pool + used,
                               BATCH_IOVECS - used, &cmds[n]);
        if (kind == ENT_PAD) {
            pads++;
            cur = (cur + cmds[n].length) % cmdr_size;
            continue;
        }
        if (kind == mine && cmds[n].want > max_bytes) {
            why = STOP_OTHER;           /* over this kind's size: the Python fetch's */
            break;
        }
        if (kind == ENT_FULL || (kind == mine && n && batch_bytes + cmds[n].want > BATCH_BYTES)) {
            why = full;
            break;
        }
        if (kind != mine) {
            why = kind == ENT_OTHER ? STOP_OTHER : other;
            break;
        }
        used += cmds[n].iov_cnt;
        batch_bytes += cmds[n].want;
        cur = (cur + cmds[n].length) % cmdr_size;
        uint64_t end = cmds[n].lba + cmds[n].want / block_size;
        if (n == 0 || cmds[n].lba < lo)
            lo = cmds[n].lba;
        if (end > hi)
            hi = end;
        n++;
    }
    *used_out = used;
    *cur_out = cur;
    *pads_out = pads;
    *why_io = why;
    *lo_out = lo;
    *hi_out = hi;
    return n;
}

/* take_batch's `packed` for the `n` commands `cmds` (`used` iovecs in all, into `map`), or
 * NULL with MemoryError set. */
static PyObject *
pack_taken(uint8_t *map, const struct rw_cmd *cmds, uint32_t n, uint32_t used,
           uint32_t block_size)
{
    Py_ssize_t size = sizeof(struct taken_hdr) + (Py_ssize_t)n * sizeof(struct taken)
                      + (Py_ssize_t)used * sizeof(struct taken_iov);
    PyObject *packed = PyBytes_FromStringAndSize(NULL, size);
    if (packed == NULL)
        return NULL;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(packed);
    memset(out, 0, (size_t)size);
    struct taken_hdr hdr = {n, used};
    memcpy(out, &hdr, sizeof hdr);
    uint8_t *recs = out + sizeof hdr;
    uint8_t *iovs = recs + (size_t)n * sizeof(struct taken);
    uint32_t first = 0;
    for (uint32_t k = 0; k < n; k++) {
        const struct rw_cmd *c = &cmds[k];
        struct taken t;
        memset(&t, 0, sizeof t);
        t.offset = c->lba * block_size;
        t.want = c->want;
        t.iov_first = first;
        t.iov_cnt = c->iov_cnt;
        t.cmd_id = c->cmd_id;
        t.cdb_len = c->cdb_len;
        memcpy(t.cdb, c->cdb, c->cdb_len);
        memcpy(recs + (size_t)k * sizeof t, &t, sizeof t);
        for (uint32_t j = 0; j < c->iov_cnt; j++) {
            struct taken_iov v = {(uint64_t)((uint8_t *)c->iov[j].iov_base - map),
                                  c->iov[j].iov_len};
            memcpy(iovs + (size_t)(first + j) * sizeof v, &v, sizeof v);
        }
        first += c->iov_cnt;
    }
    return packed;
}

static PyObject *
take_batch(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring;
    unsigned int cmdr_off, cmdr_size, fetch, max_commands;
    unsigned long long data_off, map_size, num_blocks, max_bytes, max_blocks;
    unsigned int block_size;
    PyObject *checks, *busy;
    int writes;

    unsigned long long other_bytes = 0;

    if (!PyArg_ParseTuple(args, "w*IIKKIKIKKIO!O!p|K", &ring, &cmdr_off, &cmdr_size, &data_off,
                          &map_size, &fetch, &num_blocks, &block_size, &max_bytes,
                          &max_blocks, &max_commands, &PyTuple_Type, &checks, &PyTuple_Type,
                          &busy, &writes, &other_bytes))
        return NULL;
    uint8_t *map = ring.buf;
    uint32_t head = 0;
    int why = begin_batch(&ring, cmdr_off, cmdr_size, data_off, map_size, fetch, block_size,
                          checks, busy, &head);
    if (why < 0) {
        PyBuffer_Release(&ring);
        return NULL;
    }
    struct rw_cmd cmds[MAX_WRITES];
    struct iovec pool[BATCH_IOVECS];
    uint32_t used = 0, cur = fetch;
    uint64_t lo = 0, hi = 0;
    Py_ssize_t pads = 0;
    uint32_t n = take_into(map, cmdr_off, cmdr_size, data_off, map_size, fetch, head,
                           num_blocks, block_size, max_bytes, max_blocks, max_commands, writes,
                           other_bytes, cmds, pool, &used, &cur, &pads, &why, &lo, &hi);
    PyObject *packed = pack_taken(map, cmds, n, used, block_size);
    PyBuffer_Release(&ring);
    if (packed == NULL)
        return NULL;
    return Py_BuildValue("(IIniNKK)", cur, n, pads, why, packed, lo, hi - lo);
}

/* The header and records of `packed` (take_batch's), checked against the map's data area:
 * 0, or -1 with ValueError set. */
static int
check_taken(const Py_buffer *packed, uint64_t data_off, uint64_t map_size,
            struct taken_hdr *hdr, const uint8_t **recs, const uint8_t **iovs)
{
    if ((size_t)packed->len < sizeof *hdr)
        goto bad;
    memcpy(hdr, packed->buf, sizeof *hdr);
    if (hdr->n > MAX_WRITES || hdr->iovs > BATCH_IOVECS
            || (size_t)packed->len != sizeof *hdr + (size_t)hdr->n * sizeof(struct taken)
                                      + (size_t)hdr->iovs * sizeof(struct taken_iov))
        goto bad;
    *recs = (const uint8_t *)packed->buf + sizeof *hdr;
    *iovs = *recs + (size_t)hdr->n * sizeof(struct taken);
    for (uint32_t k = 0; k < hdr->n; k++) {
        struct taken t;
        memcpy(&t, *recs + (size_t)k * sizeof t, sizeof t);
        if (t.iov_cnt == 0 || t.iov_cnt > MAX_IOVECS || t.iov_first > hdr->iovs
                || t.iov_cnt > hdr->iovs - t.iov_first)
            goto bad;
        uint64_t total = 0;
        for (uint32_t j = 0; j < t.iov_cnt; j++) {
            struct taken_iov v;
            memcpy(&v, *iovs + (size_t)(t.iov_first + j) * sizeof v, sizeof v);
            if (v.off < data_off || v.off > map_size || v.len > map_size - v.off)
                goto bad;
            total += v.len;
        }
        if (total != t.want)
            goto bad;
    }
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "not a batch take_batch packed for this map");
    return -1;
}

#define MAX_LEGS 4      /* a mirror set's images */

/* One command's I/O to each of the `legs` descriptors `fds` in turn, without the GIL: a
 * pwritev() of its `cnt` iovecs at byte `at` (`writes`), else a preadv2(fds[0], ..., `rwf`).
 * 1 when every call moved all `want` bytes; 0 with `*err` (the errno, 0 for a short transfer)
 * and `*bad` (the descriptor's index) set at the first that did not. */
static int
io_one(const int *fds, Py_ssize_t legs, const struct iovec *iov, uint32_t cnt, off_t at,
       uint64_t want, int rwf, int writes, int *err, int *bad)
{
    for (Py_ssize_t i = 0; i < legs; i++) {
        ssize_t got = writes ? pwritev(fds[i], iov, (int)cnt, at)
                             : preadv2(fds[i], iov, (int)cnt, at, rwf);
        if (got < 0 || (uint64_t)got != want) {
            *err = got < 0 ? errno : 0;
            *bad = (int)i;
            return 0;
        }
    }
    return 1;
}

PyDoc_STRVAR(run_batch_doc,
"run_batch(ring, data_off, map_size, packed, count, fds, rwf, writes)\n"
"    -> (done, nbytes, err, leg)\n"
"\n"
"The I/O of the first `count` commands take_batch took (`packed`), in order, WITHOUT the GIL\n"
"(the caller locked their ranges): for a WRITE\n"
"batch (`writes` true) one pwritev() of each command's Data-Out to every descriptor of `fds`\n"
"(a tuple of 1-4: the images to write); for a READ batch one preadv2(fds[0], ..., `rwf`) into\n"
"its Data-In. A buffered write may wait (dirty-page throttling, the journal, a stable page), so\n"
"the caller must hold neither the ring's lock nor anything a ring thread needs, and must hold\n"
"what keeps the volume as it is (its split epoch entered, a region lock over the commands'\n"
"blocks). It stops at the first command not done whole on every descriptor (an error, a\n"
"short transfer, RWF_NOWAIT's EAGAIN).\n"
"\n"
"Returns how many commands were done whole (the first `done`), their bytes, the errno of the\n"
"one that failed (0: none, or short) and the index in `fds` of the descriptor it failed on\n"
"(0 when none failed): the caller fails that image, as the Python path fails an image whose\n"
"write errs. ValueError for a `packed` that take_batch did not make for this map, TypeError\n"
"for malformed arguments.");

static PyObject *
run_batch(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring, packed;
    unsigned long long data_off, map_size;
    unsigned int count;
    PyObject *fds_obj;
    int rwf, writes;

    if (!PyArg_ParseTuple(args, "w*KKy*IO!ip", &ring, &data_off, &map_size, &packed, &count,
                          &PyTuple_Type, &fds_obj, &rwf, &writes))
        return NULL;
    struct taken_hdr hdr;
    const uint8_t *recs, *iovs;
    int fds[MAX_LEGS];
    Py_ssize_t legs = PyTuple_GET_SIZE(fds_obj);
    if ((unsigned long long)ring.len < map_size
            || check_taken(&packed, data_off, map_size, &hdr, &recs, &iovs) < 0)
        goto fail;
    if (legs < 1 || legs > MAX_LEGS || (!writes && legs != 1)) {
        PyErr_SetString(PyExc_ValueError, "fds: 1-4 descriptors to write, 1 to read");
        goto fail;
    }
    if (count > hdr.n) {
        PyErr_SetString(PyExc_ValueError, "count over the commands taken");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < legs; i++) {
        fds[i] = PyLong_AsLong(PyTuple_GET_ITEM(fds_obj, i));
        if (fds[i] == -1 && PyErr_Occurred())
            goto fail;
    }
    uint8_t *map = ring.buf;
    struct taken cmds[MAX_WRITES];
    struct iovec pool[BATCH_IOVECS];
    for (uint32_t j = 0; j < hdr.iovs; j++) {
        struct taken_iov v;
        memcpy(&v, iovs + (size_t)j * sizeof v, sizeof v);
        pool[j].iov_base = map + v.off;
        pool[j].iov_len = v.len;
    }
    for (uint32_t k = 0; k < hdr.n; k++)
        memcpy(&cmds[k], recs + (size_t)k * sizeof cmds[k], sizeof cmds[k]);
    uint32_t done = 0;
    unsigned long long nbytes = 0;
    int err = 0, bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; done < count; done++) {
        struct taken *c = &cmds[done];
        if (!io_one(fds, legs, pool + c->iov_first, c->iov_cnt, (off_t)c->offset, c->want, rwf,
                    writes, &err, &bad))
            break;
        nbytes += c->want;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&packed);
    PyBuffer_Release(&ring);
    return Py_BuildValue("(IKii)", done, nbytes, err, bad);
fail:
    PyBuffer_Release(&packed);
    PyBuffer_Release(&ring);
    return NULL;
}
PyDoc_STRVAR(complete_batch_doc,
"complete_batch(ring, cmdr_off, cmdr_size, data_off, map_size, packed, count, busy)\n"
"    -> (completed, nbytes)\n"
"\n"
"Answer GOOD the first `count` commands take_batch took (`packed`), whose I/O run_batch did\n"
"whole, on the ring as ring.py's _complete_locked does; the caller holds the ring's lock and\n"
"counts them no longer outstanding. `busy` (read_batch's conditions) is read first, holding\n"
"the GIL until the last completion: should one hold now (a group split's hold of the LUN's\n"
"completions begun during the I/O), it answers none, and the caller gives them all to the\n"
"Python path, which does their I/O again with the same data and holds their completions as it\n"
"holds any other's.\n"
"\n"
"Returns the commands answered and their bytes. ValueError for a `packed` that take_batch did\n"
"not make for this map or a `count` over its commands, TypeError for malformed arguments.");

static PyObject *
complete_batch(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring, packed;
    unsigned int cmdr_off, cmdr_size, count;
    unsigned long long data_off, map_size;
    PyObject *busy;

    if (!PyArg_ParseTuple(args, "w*IIKKy*IO!", &ring, &cmdr_off, &cmdr_size, &data_off,
                          &map_size, &packed, &count, &PyTuple_Type, &busy))
        return NULL;
    struct taken_hdr hdr;
    const uint8_t *recs, *iovs;
    PyObject *result = NULL;
    if ((unsigned long long)ring.len < map_size || map_size < sizeof(struct tcmu_mailbox)
            || cmdr_off < sizeof(struct tcmu_mailbox) || cmdr_size < sizeof(struct tcmu_cmd_entry)
            || (unsigned long long)cmdr_off + cmdr_size > data_off || data_off > map_size
            || cmdr_size % TCMU_OP_ALIGN_SIZE) {
        PyErr_SetString(PyExc_ValueError, "ring geometry out of range");
        goto out;
    }
    if (check_taken(&packed, data_off, map_size, &hdr, &recs, &iovs) < 0)
        goto out;
    if (count > hdr.n) {
        PyErr_SetString(PyExc_ValueError, "count over the commands taken");
        goto out;
    }
    int free_now = count ? conditions_hold(busy) : 1;
    if (free_now < 0)
        goto out;
    unsigned long long nbytes = 0;
    if (free_now == 0)
        count = 0;
    for (uint32_t k = 0; k < count; k++) {
        struct taken t;
        memcpy(&t, recs + (size_t)k * sizeof t, sizeof t);
        complete_good(ring.buf, cmdr_off, cmdr_size, t.cmd_id);
        nbytes += t.want;
    }
    result = Py_BuildValue("(IK)", count, nbytes);
out:
    PyBuffer_Release(&packed);
    PyBuffer_Release(&ring);
    return result;
}

/* Names lease_batch reads and writes on the ring, the LUN server and the lease (interned at
 * import). */
static PyObject *s_fetch, *s_outstanding, *s_stats, *s_pending_notify, *s_acquire, *s_release,
                *s_inline_t0, *s_watch_idle, *s_watch_wake, *s_set, *s_gen, *s_batch,
                *s_fetched, *s_pads, *s_completed, *s_revoked, *s_commands, *s_inline,
                *s_compiled, *s_compiled_writes, *s_reads, *s_writes, *s_read_bytes,
                *s_write_bytes, *s_lead, *s_inline_after, *s_since, *s_fast;

/* obj.name += delta (an int attribute); -1 with an exception set on failure. */
static int
attr_add(PyObject *obj, PyObject *name, long long delta)
{
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    long long x = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred())
        return -1;
    PyObject *nv = PyLong_FromLongLong(x + delta);
    if (nv == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, nv);
    Py_DECREF(nv);
    return r;
}

/* d[key] += delta in the dict obj.stats; -1 with an exception set on failure. */
static int
stat_add(PyObject *obj, PyObject *key, long long delta)
{
    if (!delta)
        return 0;
    PyObject *d = PyObject_GetAttr(obj, s_stats);
    if (d == NULL)
        return -1;
    int r = -1;
    PyObject *v = PyDict_Check(d) ? PyDict_GetItemWithError(d, key) : NULL;
    if (v != NULL) {
        long long x = PyLong_AsLongLong(v);
        if (!(x == -1 && PyErr_Occurred())) {
            PyObject *nv = PyLong_FromLongLong(x + delta);
            if (nv != NULL) {
                r = PyDict_SetItem(d, key, nv);
                Py_DECREF(nv);
            }
        }
    } else if (!PyErr_Occurred()) {
        PyErr_SetString(PyExc_TypeError, "ring.stats lacks a counter");
    }
    Py_DECREF(d);
    return r;
}

/* lock.acquire() / lock.release() of a threading.Lock; -1 with an exception set. */
static int
lock_call(PyObject *lock, PyObject *name)
{
    PyObject *r = PyObject_CallMethodNoArgs(lock, name);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* With nothing outstanding, move cmd_tail up to the fetch cursor (ring.py's
 * _retire_idle_locked) and say the kernel is to be told: ring_obj.pending_notify, or `*retired`
 * when not NULL (lease_serve tells it itself); -1 with an exception set. */
static int
retire_idle(PyObject *ring_obj, uint8_t *map, uint32_t size, uint32_t fetch, int *retired)
{
    PyObject *o = PyObject_GetAttr(ring_obj, s_outstanding);
    if (o == NULL)
        return -1;
    long long out = PyLong_AsLongLong(o);
    Py_DECREF(o);
    if (out == -1 && PyErr_Occurred())
        return -1;
    if (out != 0)
        return 0;
    struct tcmu_mailbox *mb = (struct tcmu_mailbox *)map;
    if (__atomic_load_n(&mb->cmd_tail, __ATOMIC_ACQUIRE) % size != fetch) {
        __atomic_store_n(&mb->cmd_tail, fetch % size, __ATOMIC_RELEASE);
        if (retired != NULL) {
            *retired = 1;
            return 0;
        }
        return PyObject_SetAttr(ring_obj, s_pending_notify, Py_True);
    }
    return 0;
}

/* The ring, the LUN server and the lease a lease batch works on (lease_batch's and lease_serve's
 * first arguments, parsed once a call). */
struct lease_ctx {
    uint8_t *map;
    uint32_t cmdr_off, cmdr_size, block_size;
    uint64_t data_off, map_size, num_blocks;
    PyObject *ring_obj, *ring_lock, *server, *role_mu, *lease;
    Py_ssize_t gen;
};

/* The ring's geometry into `*x` (lease_batch's and lease_serve's common arguments: offsets and
 * sizes in bytes, the LUN's size in blocks of block_size bytes). */
static void
lease_ctx_geometry(struct lease_ctx *x, const Py_buffer *ring, unsigned int cmdr_off,
                   unsigned int cmdr_size, unsigned long long data_off,
                   unsigned long long map_size, unsigned long long num_blocks,
                   unsigned int block_size)
{
    x->map = ring->buf;
    x->cmdr_off = cmdr_off;
    x->cmdr_size = cmdr_size;
    x->block_size = block_size;
    x->data_off = data_off;
    x->map_size = map_size;
    x->num_blocks = num_blocks;
}

/* One lease batch's kind: WRITEs (`writes`, to every descriptor of `fds`) or large READs (from
 * fds[0] with preadv2 flags `rwf`), take_batch's limits and conditions. */
struct lease_kind {
    uint64_t max_bytes, max_blocks, other_bytes;
    uint32_t max_commands;
    PyObject *checks, *busy, *hold;
    int writes, rwf;
    int fds[MAX_LEGS];
    Py_ssize_t legs;
};

/* What one lease batch did (lease_batch's return value, less `packed`'s Python shape). */
struct lease_out {
    uint32_t n, done, completed;
    int why, err, bad, lost;
    unsigned long long nbytes;      /* the completed commands' bytes; every done one's if lost */
    PyObject *packed;               /* a new reference, or NULL when none was taken */
    double t0, t1;                  /* CLOCK_MONOTONIC seconds: the I/O began, the batch ended */
};

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* How long the ring thread waited for the GIL after a blocking call of the compiled path
 * returned: after a lease batch's I/O (GIL_AFTER_IO, lease_one) and after the compiled loop's
 * poll(2) (GIL_AFTER_POLL, lease_serve). Another of the process's threads running Python then
 * (a watchdog's look, a status call, the metrics writer) delays the command by as much. A
 * histogram per place, with the bucket edges below (seconds; the last bucket is open), their
 * sum and the longest wait; process-wide (a volume process serves one volume's LUNs), updated
 * holding the GIL, so never concurrently. Read by gil_waits(). */
enum { GIL_AFTER_IO, GIL_AFTER_POLL, GIL_PLACES };
static const double gil_edges[] = {10e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3};
#define GIL_BUCKETS (sizeof gil_edges / sizeof gil_edges[0] + 1)
static struct {
    unsigned long long counts[GIL_BUCKETS];
    double seconds, longest;
} gil_hist[GIL_PLACES];

/* Count one wait for the GIL at `place` that began at `since` (monotonic_now's seconds). */
static void
gil_note(int place, double since)
{
    double w = monotonic_now() - since;
    size_t i = 0;
    while (i < GIL_BUCKETS - 1 && w > gil_edges[i])      /* an edge's own bucket: at most it */
        i++;
    gil_hist[place].counts[i]++;
    gil_hist[place].seconds += w;
    if (w > gil_hist[place].longest)
        gil_hist[place].longest = w;
}

PyDoc_STRVAR(gil_waits_doc,
"gil_waits() -> {'edges': (seconds, ...), 'after_io': {...}, 'after_poll': {...}}\n"
"\n"
"How long this process's ring threads waited for the GIL after a blocking call of the compiled\n"
"path returned: 'after_io' after a lease batch's preadv/pwritev (lease_batch, lease_serve),\n"
"'after_poll' after the compiled loop's poll(2) woke (lease_serve). Each is {'counts': [n, ...]\n"
"one more than the edges: waits of at most edges[0], then above one edge and at most the next\n"
"(Prometheus's `le`), then above the last; 'seconds': their sum; 'longest': the longest, in\n"
"seconds}. Counted\n"
"since the module was loaded; a process serves one volume's LUNs, or every LUN with\n"
"lvmirrord --no-processes.");

static PyObject *
gil_waits(PyObject *Py_UNUSED(self), PyObject *Py_UNUSED(args))
{
    static const char *names[GIL_PLACES] = {"after_io", "after_poll"};
    PyObject *edges = PyTuple_New(GIL_BUCKETS - 1);
    PyObject *out = edges != NULL ? Py_BuildValue("{s:N}", "edges", edges) : NULL;
    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < GIL_BUCKETS - 1; i++)
        PyTuple_SET_ITEM(edges, i, PyFloat_FromDouble(gil_edges[i]));
    for (int p = 0; p < GIL_PLACES; p++) {
        PyObject *counts = PyList_New(GIL_BUCKETS);
        if (counts == NULL)
            goto fail;
        for (size_t i = 0; i < GIL_BUCKETS; i++)
            PyList_SET_ITEM(counts, i, PyLong_FromUnsignedLongLong(gil_hist[p].counts[i]));
        PyObject *one = Py_BuildValue("{s:N,s:d,s:d}", "counts", counts, "seconds",
                                      gil_hist[p].seconds, "longest", gil_hist[p].longest);
        if (one == NULL || PyDict_SetItemString(out, names[p], one) < 0) {
            Py_XDECREF(one);
            goto fail;
        }
        Py_DECREF(one);
    }
    if (PyErr_Occurred())          /* (a float or an int that could not be made) */
        goto fail;
    return out;
fail:
    Py_DECREF(out);
    return NULL;
}

/* fds_obj (a tuple of 1-4 ints; exactly 1 to read) into k->fds; -1 with ValueError set. */
static int
parse_fds(PyObject *fds_obj, struct lease_kind *k)
{
    k->legs = PyTuple_GET_SIZE(fds_obj);
    if (k->legs < 1 || k->legs > MAX_LEGS || (!k->writes && k->legs != 1)) {
        PyErr_SetString(PyExc_ValueError, "fds: 1-4 descriptors to write, 1 to read");
        return -1;
    }
    for (Py_ssize_t i = 0; i < k->legs; i++) {
        k->fds[i] = PyLong_AsLong(PyTuple_GET_ITEM(fds_obj, i));
        if (k->fds[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* Release `lock` keeping the exception set; returns -1 for `return unlock_failing(...)`. */
static int
unlock_failing(PyObject *lock)
{
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    lock_call(lock, s_release);
    PyErr_Restore(et, ev, tb);
    return -1;
}

/* One batch under the lease, lease_batch's three steps (its docstring): 0 with `*o` filled, or
 * -1 with an exception set and nothing taken. With `retired` NULL, entries the ring retires
 * itself set ring_obj.pending_notify for the Python loop; otherwise `*retired` is set and the
 * caller notifies the kernel. */
static int
lease_one(const struct lease_ctx *x, const struct lease_kind *k, struct lease_out *o,
          int *retired)
{
    uint8_t *map = x->map;
    memset(o, 0, sizeof *o);
    if (k->legs < 1) {
        /* (a WRITE kind with no descriptor - a lease for READs only - never makes a batch: its
         * WRITEs would be answered GOOD with nothing written) */
        PyErr_SetString(PyExc_ValueError, "lease batch: no descriptor to read or write");
        return -1;
    }
    /* 1. take, under the ring's lock */
    if (lock_call(x->ring_lock, s_acquire) < 0)
        return -1;
    PyObject *f = PyObject_GetAttr(x->ring_obj, s_fetch);
    long long fetch_ll = f == NULL ? -1 : PyLong_AsLongLong(f);
    Py_XDECREF(f);
    if (fetch_ll < 0 || fetch_ll > UINT32_MAX) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "ring fetch cursor out of range");
        return unlock_failing(x->ring_lock);
    }
    uint32_t fetch = (uint32_t)fetch_ll, head = 0;
    Py_buffer view = {.buf = map, .len = (Py_ssize_t)x->map_size};
    int why = begin_batch(&view, x->cmdr_off, x->cmdr_size, x->data_off, x->map_size, fetch,
                          x->block_size, k->checks, k->busy, &head);
    if (why < 0)
        return unlock_failing(x->ring_lock);
    struct rw_cmd cmds[MAX_WRITES];
    struct iovec pool[BATCH_IOVECS];
    uint32_t used = 0, cur = fetch;
    uint64_t lo = 0, hi = 0;
    Py_ssize_t pads = 0;
    uint32_t n = take_into(map, x->cmdr_off, x->cmdr_size, x->data_off, x->map_size, fetch,
                           head, x->num_blocks, x->block_size, k->max_bytes, k->max_blocks,
                           k->max_commands, k->writes, k->other_bytes, cmds, pool, &used, &cur,
                           &pads, &why, &lo, &hi);
    PyObject *packed = NULL;
    if (n) {
        packed = pack_taken(map, cmds, n, used, x->block_size);
        if (packed == NULL)
            return unlock_failing(x->ring_lock);    /* nothing taken: the cursor is as it was */
    }
    if (cur != fetch) {
        PyObject *c = PyLong_FromUnsignedLong(cur);
        int r = c == NULL ? -1 : PyObject_SetAttr(x->ring_obj, s_fetch, c);
        Py_XDECREF(c);
        if (r < 0 || attr_add(x->ring_obj, s_outstanding, n) < 0
                || stat_add(x->ring_obj, s_fetched, n) < 0
                || stat_add(x->ring_obj, s_pads, pads) < 0
                || (!n && pads && retire_idle(x->ring_obj, map, x->cmdr_size, cur,
                                              retired) < 0)) {
            /* (cannot happen with ring.py's CommandRing; the commands would be lost) */
            Py_XDECREF(packed);
            return unlock_failing(x->ring_lock);
        }
    }
    if (lock_call(x->ring_lock, s_release) < 0) {
        Py_XDECREF(packed);
        return -1;
    }
    o->n = n;
    o->why = why;
    if (!n)
        return 0;
    o->packed = packed;
    /* 2. the I/O, watched, without the GIL or a lock. From here on the commands are taken:
     * an error setting the watchdog's fields is cleared, never raised (the caller must answer
     * them). */
    double t0 = o->t0 = monotonic_now();
    PyObject *cover = Py_BuildValue("(KKO)", lo, hi - lo, k->writes ? Py_False : Py_True);
    PyObject *t0_obj = PyFloat_FromDouble(t0);
    if (cover == NULL || t0_obj == NULL || PyObject_SetAttr(x->lease, s_batch, cover) < 0
            || PyObject_SetAttr(x->server, s_inline_t0, t0_obj) < 0)
        PyErr_Clear();
    Py_XDECREF(cover);
    Py_XDECREF(t0_obj);
    PyObject *idle = PyObject_GetAttr(x->server, s_watch_idle);
    if (idle == NULL) {
        PyErr_Clear();
    } else {
        if (idle == Py_True) {        /* (read after _inline_t0 is set: see LunServer._watch) */
            PyObject *wake = NULL, *r = NULL;
            if (PyObject_SetAttr(x->server, s_watch_idle, Py_False) == 0
                    && (wake = PyObject_GetAttr(x->server, s_watch_wake)) != NULL)
                r = PyObject_CallMethodNoArgs(wake, s_set);
            Py_XDECREF(r);
            Py_XDECREF(wake);
            PyErr_Clear();
        }
        Py_DECREF(idle);
    }
    uint32_t done = 0;
    unsigned long long nbytes = 0;
    int err = 0, bad = 0;
    double gil_t0;    /* the blocking call returned (gil_note) */
    Py_BEGIN_ALLOW_THREADS
    for (; done < n; done++) {
        struct rw_cmd *c = &cmds[done];
        if (!io_one(k->fds, k->legs, c->iov, c->iov_cnt, (off_t)(c->lba * x->block_size),
                    c->want, k->rwf, k->writes, &err, &bad))
            break;
        nbytes += c->want;
    }
    gil_t0 = monotonic_now();
    Py_END_ALLOW_THREADS
    gil_note(GIL_AFTER_IO, gil_t0);
    /* 3. the ring thread's role, then the completions under the ring's lock */
    int lost = 0;
    if (lock_call(x->role_mu, s_acquire) < 0) {
        PyErr_Clear();
    } else {
        PyObject *g = PyObject_GetAttr(x->server, s_gen);
        Py_ssize_t now_gen = g == NULL ? x->gen : PyLong_AsSsize_t(g);
        Py_XDECREF(g);
        PyErr_Clear();
        lost = now_gen != x->gen;
        if (PyObject_SetAttr(x->lease, s_batch, Py_None) < 0)
            PyErr_Clear();
        if (!lost) {
            PyObject *zero = PyFloat_FromDouble(0.0);
            if (zero == NULL || PyObject_SetAttr(x->server, s_inline_t0, zero) < 0)
                PyErr_Clear();
            Py_XDECREF(zero);
        }
        if (lock_call(x->role_mu, s_release) < 0)
            PyErr_Clear();
    }
    uint32_t completed = 0;
    unsigned long long cbytes = 0;
    if (!lost && done) {
        if (lock_call(x->ring_lock, s_acquire) < 0) {
            PyErr_Clear();          /* (not answered here: the caller's Python path does) */
        } else {
            int free_now = conditions_hold(k->hold);
            if (free_now < 0)
                PyErr_Clear();
            if (free_now == 1) {
                for (uint32_t j = 0; j < done; j++) {
                    complete_good(map, x->cmdr_off, x->cmdr_size, cmds[j].cmd_id);
                    cbytes += cmds[j].want;
                }
                completed = done;
                if (attr_add(x->ring_obj, s_outstanding, -(long long)completed) < 0
                        || stat_add(x->ring_obj, s_completed, completed) < 0
                        || retire_idle(x->ring_obj, map, x->cmdr_size, cur, retired) < 0)
                    PyErr_Clear();
            }
            if (lock_call(x->ring_lock, s_release) < 0)
                PyErr_Clear();
        }
    }
    o->done = done;
    o->completed = completed;
    o->nbytes = lost ? nbytes : cbytes;
    o->err = err;
    o->bad = bad;
    o->lost = lost;
    o->t1 = monotonic_now();
    return 0;
}

/* lease_batch's return tuple for `o` (its `packed` reference stolen); NULL on MemoryError. */
static PyObject *
lease_result(struct lease_out *o)
{
    PyObject *packed = o->packed != NULL ? o->packed : (Py_INCREF(Py_None), Py_None);
    o->packed = NULL;
    return Py_BuildValue("(IiIIKiiNdO)", o->n, o->why, o->done, o->completed, o->nbytes, o->err,
                         o->bad, packed, o->t0, o->lost ? Py_True : Py_False);
}

PyDoc_STRVAR(lease_batch_doc,
"lease_batch(ring, cmdr_off, cmdr_size, data_off, map_size, ring_obj, ring_lock, num_blocks,\n"
"            block_size, max_bytes, max_blocks, max_commands, checks, busy, hold, writes,\n"
"            other_bytes, fds, server, role_mu, rwf, gen, lease)\n"
"    -> (taken, why, done, completed, nbytes, err, leg, packed, t0, lost)\n"
"\n"
"take_batch, run_batch and complete_batch in one call, for the ring thread (generation `gen`)\n"
"holding its lease on the volume (lvmirror/mirror/ringlease.py: the whole LUN locked for it,\n"
"the split epoch entered), as LunServer._leased_batch makes a batch:\n"
"1. under `ring_lock` (ring_obj's, a threading.Lock) it takes the commands as take_batch does,\n"
"   from ring_obj._fetch on, and moves ring_obj's fetch cursor, outstanding count and\n"
"   statistics (`fetched`, `pads`) as CommandRing.take_fast does;\n"
"2. it sets lease.batch to (first block, blocks, not writes) and server._inline_t0 to the time\n"
"   (CLOCK_MONOTONIC, as time.monotonic()), wakes the watchdog as the ring thread does\n"
"   (server._watch_idle, server._watch_wake.set()), then makes the I/O as run_batch does with the\n"
"   GIL released and neither lock held (a write may wait);\n"
"3. under `role_mu` it reads server._gen: another generation means the watchdog handed the ring\n"
"   over meanwhile (`lost`: nothing completed, the caller completes as a worker would);\n"
"   otherwise it clears server._inline_t0, and under `ring_lock` answers GOOD the commands done\n"
"   whole unless a `hold` condition holds now (as complete_batch does), counts them no longer\n"
"   outstanding and, with none outstanding, retires the ring's idle entries (pending_notify).\n"
"Returns the commands taken, why the take stopped (STOP_*), how many were done whole, how many\n"
"it completed and their bytes (all done ones' when lost), the errno and descriptor index of a\n"
"failed one (run_batch's), `packed` (take_batch's, None when none was taken: for the Python\n"
"path's commands), the time the I/O began and `lost`. ValueError/TypeError for malformed\n"
"arguments, before anything is taken.");

static PyObject *
lease_batch(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring;
    unsigned int cmdr_off, cmdr_size, max_commands, block_size;
    unsigned long long data_off, map_size, num_blocks, max_bytes, max_blocks, other_bytes;
    PyObject *fds_obj;
    struct lease_ctx x;
    struct lease_kind k;

    if (!PyArg_ParseTuple(args, "w*IIKKOOKIKKIO!O!O!pKO!OOinO", &ring, &cmdr_off, &cmdr_size,
                          &data_off, &map_size, &x.ring_obj, &x.ring_lock, &num_blocks,
                          &block_size, &max_bytes, &max_blocks, &max_commands, &PyTuple_Type,
                          &k.checks, &PyTuple_Type, &k.busy, &PyTuple_Type, &k.hold, &k.writes,
                          &other_bytes, &PyTuple_Type, &fds_obj, &x.server, &x.role_mu, &k.rwf,
                          &x.gen, &x.lease))
        return NULL;
    lease_ctx_geometry(&x, &ring, cmdr_off, cmdr_size, data_off, map_size, num_blocks,
                       block_size);
    k.max_bytes = max_bytes;
    k.max_blocks = max_blocks;
    k.other_bytes = other_bytes;
    k.max_commands = max_commands;
    struct lease_out o;
    PyObject *result = NULL;
    if ((unsigned long long)ring.len >= map_size && parse_fds(fds_obj, &k) == 0
            && lease_one(&x, &k, &o, NULL) == 0)
        result = lease_result(&o);
    else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "ring geometry or fetch cursor out of range");
    PyBuffer_Release(&ring);
    return result;
}

/* The latency histogram's bounds (iostats.BUCKETS), read once a lease_serve call. */
#define MAX_BUCKETS 32
struct hist {
    Py_ssize_t nb;
    double bound[MAX_BUCKETS];
    PyObject *lists[2];         /* a LatencyHistogram's read and write lists (counts()) */
};

/* list[i] += delta (an int item, or the float sum when `is_sum`); -1 with an exception set. */
static int
list_add(PyObject *l, Py_ssize_t i, double delta, int is_sum)
{
    PyObject *v = PyList_GET_ITEM(l, i);
    PyObject *nv = is_sum ? PyFloat_FromDouble(PyFloat_AsDouble(v) + delta)
                          : PyLong_FromLongLong(PyLong_AsLongLong(v) + (long long)delta);
    if (nv == NULL)
        return -1;
    if (PyErr_Occurred()) {
        Py_DECREF(nv);
        return -1;
    }
    return PyList_SetItem(l, i, nv);       /* (steals nv) */
}

/* `n` commands of kind `op` (0 READ, 1 WRITE) that took `secs` each, completed on the ring
 * thread's compiled loop: counted as LunServer._count_batch counts them (the server's
 * `commands`, `inline`, `compiled`/`compiled_writes`; the histogram's bucket found as
 * bisect_left finds it, and its sum) and in the lease (`reads`/`read_bytes`,
 * `writes`/`write_bytes`), before the kernel is told; -1 with an exception set. */
static int
count_done(const struct lease_ctx *x, struct hist *h, int op, uint32_t n,
           unsigned long long nbytes, double secs)
{
    Py_ssize_t i = 0;
    while (i < h->nb && h->bound[i] < secs)
        i++;
    if (attr_add(x->server, s_commands, n) < 0 || attr_add(x->server, s_inline, n) < 0
            || attr_add(x->server, op ? s_compiled_writes : s_compiled, n) < 0
            || attr_add(x->lease, op ? s_writes : s_reads, n) < 0
            || attr_add(x->lease, op ? s_write_bytes : s_read_bytes, (long long)nbytes) < 0
            || list_add(h->lists[op], i, n, 0) < 0
            || list_add(h->lists[op], h->nb + 1, secs * n, 1) < 0)
        return -1;
    return 0;
}

/* Tell the kernel to reap completions: tcmu-runner's tcmulib_processing_complete, a 4-byte write
 * to the UIO descriptor (TCMU ABI, ../shared/reference: target_core_user's uio irqcontrol). */
static void
uio_notify(int uio_fd)
{
    uint32_t one = 1;
    ssize_t r;
    do
        r = write(uio_fd, &one, sizeof one);
    while (r < 0 && errno == EINTR);
}

/* server._lead = lead (the kind the compiled path asks first, LunServer._compiled_reads); -1
 * with an exception set. */
static int
set_lead(PyObject *server, int lead)
{
    PyObject *v = PyLong_FromLong(lead);
    int r = v == NULL ? -1 : PyObject_SetAttr(server, s_lead, v);
    Py_XDECREF(v);
    return r;
}

/* 1 while the lease may serve: the compiled path still armed (server._fast not None), the lease
 * not revoked, and WRITEs not sent to the worker pool since it was taken (server._inline_after
 * > lease.since: a slow write, a stall handed over - LunServer._compiled_reads' own tests); 0
 * otherwise; -1 with an exception set. */
static int
lease_serves(const struct lease_ctx *x)
{
    PyObject *armed = PyObject_GetAttr(x->server, s_fast);
    if (armed == NULL)
        return -1;
    Py_DECREF(armed);
    if (armed == Py_None)
        return 0;
    PyObject *rv = PyObject_GetAttr(x->lease, s_revoked);
    int revoked = rv == NULL ? -1 : PyObject_IsTrue(rv);
    Py_XDECREF(rv);
    if (revoked)
        return revoked < 0 ? -1 : 0;
    PyObject *after = PyObject_GetAttr(x->server, s_inline_after);
    PyObject *since = after == NULL ? NULL : PyObject_GetAttr(x->lease, s_since);
    int later = since == NULL ? -1 : PyObject_RichCompareBool(after, since, Py_GT);
    Py_XDECREF(after);
    Py_XDECREF(since);
    return later < 0 ? -1 : !later;
}

/* lease_serve's batches between two notifications of the kernel while the ring is refilled
 * as fast as they empty it (LunServer.COMPILED_TURNS' count for the Python turns). Not fewer
 * for large commands: each uio write runs the kernel's tcmu_irqcontrol, which takes the
 * device's cmdr_lock, the mutex the kernel holds while it copies the next WRITE's Data-Out into
 * the data area, so a notification waits, or spins, behind that copy. Batches of at most 1 MiB
 * with a notification as each MiB was answered (2026-12-07) cost the ring thread 2 ms more a
 * 1 MiB WRITE in the kernel lab and made 0.83 and 0.69 of tcmu-runner's IOPS, against 1.06 and
 * 0.98 without (test_lease_loop.py). */
#define SERVE_TURNS 8

PyDoc_STRVAR(lease_serve_doc,
"lease_serve(ring, cmdr_off, cmdr_size, data_off, map_size, ring_obj, ring_lock, num_blocks,\n"
"            block_size, server, role_mu, reads, writes, loop, rwf, gen, lease, lead,\n"
"            timeout)\n"
"    -> (why, lead, last)\n"
"\n"
"The ring thread's loop while it holds its lease (lvmirror/mirror/ringlease.py), for\n"
"LunServer._lease_serve: batch after batch, in ring order, until the kernel's cmd_head, then\n"
"tell the kernel (a 4-byte write to the UIO descriptor) and wait for its next event, all without\n"
"returning to Python:\n"
"- the READs the page cache holds, as read_batch answers them under the ring's lock (`reads`:\n"
"  (max_read, big_read, max_blocks, checks, busy, fd) and preadv2 flags `rwf`; -1: no READ\n"
"  of either size, the first returns);\n"
"- larger READs (up to big_read bytes) and WRITEs without FUA as lease_batch makes them\n"
"  (`writes`: (max_write, max_commands, write_checks, hold, fds); `fds` empty: a lease for\n"
"  READs only, which makes no WRITE - at one it returns, `why` STOP_WRITE);\n"
"  (while the ring refills as fast as they empty it, every 8 batches the kernel is told, and\n"
"  the lease, the wake-up pipe and the time are looked at as before a wait);\n"
"- then poll(2) on the UIO descriptor and `wake_fd` with the GIL released, and read the\n"
"  UIO event counter (4 bytes) before the next batch (`loop`: (uio_fd, wake_fd, max_rounds,\n"
"  slow, buckets, read_histogram, write_histogram)).\n"
"It returns, the kernel told of every command it completed, when:\n"
"- a take stops at anything but cmd_head or the other kind (`why`: STOP_OTHER, STOP_STALE,\n"
"  STOP_BUSY, STOP_MISS; the Python path takes it);\n"
"- a batch was not completed whole, lost the ring to the watchdog, failed, or took longer than\n"
"  `slow` seconds: `last` is then lease_batch's tuple for it, neither counted nor notified;\n"
"- `wake_fd` is readable (the LUN's wake-up pipe, left unread: a revocation, a stop, a\n"
"  worker's completion), `timeout` seconds passed without an event, or it has waited\n"
"  `max_rounds` times (`why` STOP_HEAD);\n"
"- before a round (and every 8 batches: `why` then too), server._fast is None (disarmed),\n"
"  lease.revoked is set or\n"
"  server._inline_after is later than lease.since (WRITEs sent to the worker pool\n"
"  meanwhile): `why` is then the kind it would begin with\n"
"  (STOP_READ or STOP_WRITE) and the Python turns go on.\n"
"It sets server._lead whenever the kind of its batches changes.\n"
"The commands it completed outside `last` are counted as each batch completes, before the\n"
"kernel is told: in server.commands, .inline, .compiled (READs) or .compiled_writes, in\n"
"lease.reads/.read_bytes or .writes/.write_bytes, and in the histograms' lists\n"
"(iostats.LatencyHistogram.counts: each batch's time shared out, bisected over `buckets`). `lead`:\n"
"the kind to try first (STOP_READ or STOP_WRITE); returned, the kind of the last batch made\n"
"(`last`'s when there is one).\n"
"ValueError/TypeError for malformed arguments; OSError when poll(2) fails.");

static PyObject *
lease_serve(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring;
    unsigned int cmdr_off, cmdr_size, block_size;
    unsigned long long data_off, map_size, num_blocks;
    PyObject *reads_t, *writes_t, *loop_t;
    struct lease_ctx x;
    int rwf, lead;
    double timeout;

    if (!PyArg_ParseTuple(args, "w*IIKKOOKIOOO!O!O!inOid", &ring, &cmdr_off, &cmdr_size,
                          &data_off, &map_size, &x.ring_obj, &x.ring_lock, &num_blocks,
                          &block_size, &x.server, &x.role_mu, &PyTuple_Type, &reads_t,
                          &PyTuple_Type, &writes_t, &PyTuple_Type, &loop_t, &rwf, &x.gen,
                          &x.lease, &lead, &timeout))
        return NULL;
    lease_ctx_geometry(&x, &ring, cmdr_off, cmdr_size, data_off, map_size, num_blocks,
                       block_size);
    unsigned long long max_read, big_read, max_blocks, max_write;
    unsigned int max_commands;
    int rfd, uio_fd, wake_fd;
    long max_rounds;
    double slow;
    PyObject *rchecks, *rbusy, *wchecks, *hold, *wfds, *buckets;
    struct lease_kind big = {0}, wk = {0};
    struct hist h;
    if (!PyArg_ParseTuple(reads_t, "KKKO!O!i;reads: (max_read, big_read, max_blocks, checks, "
                          "busy, fd)", &max_read, &big_read, &max_blocks, &PyTuple_Type,
                          &rchecks, &PyTuple_Type, &rbusy, &rfd)
            || !PyArg_ParseTuple(writes_t, "KIO!O!O!;writes: (max_write, max_commands, checks, "
                                 "hold, fds)", &max_write, &max_commands, &PyTuple_Type,
                                 &wchecks, &PyTuple_Type, &hold, &PyTuple_Type, &wfds)
            || !PyArg_ParseTuple(loop_t, "iildO!O!O!;loop: (uio_fd, wake_fd, max_rounds, slow, "
                                 "buckets, read_histogram, write_histogram)", &uio_fd, &wake_fd,
                                 &max_rounds, &slow, &PyTuple_Type, &buckets, &PyList_Type,
                                 &h.lists[0], &PyList_Type, &h.lists[1]))
        goto bad_args;
    h.nb = PyTuple_GET_SIZE(buckets);
    if ((unsigned long long)ring.len < map_size || h.nb > MAX_BUCKETS
            || PyList_GET_SIZE(h.lists[0]) != h.nb + 2 || PyList_GET_SIZE(h.lists[1]) != h.nb + 2
            || (lead != STOP_READ && lead != STOP_WRITE)) {
        PyErr_SetString(PyExc_ValueError, "lease_serve: ring, histogram or lead out of range");
        goto bad_args;
    }
    for (Py_ssize_t i = 0; i < h.nb; i++) {
        h.bound[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(buckets, i));
        if (PyErr_Occurred())
            goto bad_args;
    }
    for (int op = 0; op < 2; op++)
        for (Py_ssize_t i = 0; i <= h.nb + 1; i++) {
            PyObject *v = PyList_GET_ITEM(h.lists[op], i);
            if (i <= h.nb ? !PyLong_CheckExact(v) : !PyFloat_CheckExact(v)) {
                PyErr_SetString(PyExc_TypeError, "lease_serve: a histogram is [int..., float]");
                goto bad_args;
            }
        }
    /* large READs (lease_batch's READ batch) and WRITEs */
    big.max_bytes = big_read;
    big.max_blocks = max_blocks;
    big.other_bytes = max_write;
    big.max_commands = MAX_WRITES;
    big.checks = rchecks;
    big.busy = hold;
    big.hold = hold;
    big.writes = 0;
    big.rwf = rwf;
    big.legs = 1;
    big.fds[0] = rfd;
    wk.max_bytes = max_write;
    wk.max_blocks = max_blocks;
    wk.other_bytes = big_read;
    wk.max_commands = max_commands;
    wk.checks = wchecks;
    wk.busy = hold;
    wk.hold = hold;
    wk.writes = 1;
    wk.rwf = 0;
    /* no descriptor to write (wk.legs stays 0): a lease for READs only (a mirror's,
     * ringlease.py) */
    if (PyTuple_GET_SIZE(wfds) != 0 && parse_fds(wfds, &wk) < 0)
        goto bad_args;

    uint32_t unnotified = 0;
    int retired = 0, why = STOP_HEAD;
    long rounds = 0;
    PyObject *last = NULL;
    double deadline = monotonic_now() + timeout;
    for (;;) {
        /* one round: batches until cmd_head, each kind stopping at the other's */
        int kind = lead;
        int serves = lease_serves(&x);
        if (serves < 0)
            goto fail;
        if (!serves) {
            why = kind;                 /* (the Python turns end the lease and go on) */
            goto out;
        }
        for (int turn = 1;; turn++) {
            if (turn % SERVE_TURNS == 0) {
                /* a ring refilled as fast as it is served: the kernel told of what is done,
                 * the lease looked at again, as between rounds */
                if (unnotified || retired) {
                    uio_notify(uio_fd);
                    unnotified = 0;
                    retired = 0;
                }
                serves = lease_serves(&x);
                if (serves < 0)
                    goto fail;
                struct pollfd wp = {.fd = wake_fd, .events = POLLIN};
                if (!serves || poll(&wp, 1, 0) != 0 || monotonic_now() > deadline) {
                    why = kind;         /* (a wake-up, the lease, the time: Python's turn) */
                    goto out;
                }
            }
            if ((rwf < 0 && kind != STOP_WRITE) || (wk.legs == 0 && kind == STOP_WRITE)) {
                why = kind;             /* READs (WRITEs) are not the compiled path's here */
                goto out;
            }
            if (kind == STOP_READ) {
                if (lock_call(x.ring_lock, s_acquire) < 0)
                    goto fail;
                PyObject *f = PyObject_GetAttr(x.ring_obj, s_fetch);
                long long fetch_ll = f == NULL ? -1 : PyLong_AsLongLong(f);
                Py_XDECREF(f);
                if (fetch_ll < 0 || fetch_ll > UINT32_MAX) {
                    if (!PyErr_Occurred())
                        PyErr_SetString(PyExc_ValueError, "ring fetch cursor out of range");
                    unlock_failing(x.ring_lock);
                    goto fail;
                }
                uint32_t fetch = (uint32_t)fetch_ll, head = 0, cur = fetch;
                Py_ssize_t answered = 0, pads = 0;
                unsigned long long nbytes = 0;
                double t0 = monotonic_now();
                why = begin_batch(&ring, cmdr_off, cmdr_size, data_off, map_size, fetch,
                                  block_size, rchecks, rbusy, &head);
                if (why < 0) {
                    unlock_failing(x.ring_lock);
                    goto fail;
                }
                if (why == STOP_HEAD)
                    cur = read_run(x.map, cmdr_off, cmdr_size, data_off, map_size, fetch, head,
                                   rfd, rwf, num_blocks, block_size, max_read, max_blocks,
                                   big_read, max_write, &answered, &nbytes, &pads, &why);
                /* ring.py's _fast_done_locked (they were fetched and completed at once) */
                if (cur != fetch) {
                    PyObject *c = PyLong_FromUnsignedLong(cur);
                    int r = c == NULL ? -1 : PyObject_SetAttr(x.ring_obj, s_fetch, c);
                    Py_XDECREF(c);
                    if (r < 0 || stat_add(x.ring_obj, s_fetched, answered) < 0
                            || stat_add(x.ring_obj, s_completed, answered) < 0
                            || stat_add(x.ring_obj, s_pads, pads) < 0
                            || retire_idle(x.ring_obj, x.map, cmdr_size, cur, &retired) < 0) {
                        /* (cannot happen with ring.py's CommandRing) */
                        unlock_failing(x.ring_lock);
                        goto fail;
                    }
                }
                if (lock_call(x.ring_lock, s_release) < 0)
                    goto fail;
                if (answered) {
                    unnotified += answered;
                    if (lead != STOP_READ && set_lead(x.server, lead = STOP_READ) < 0)
                        goto fail;
                    if (count_done(&x, &h, 0, answered, nbytes,
                                   (monotonic_now() - t0) / answered) < 0)
                        goto fail;
                }
            } else {
                int writes = kind == STOP_WRITE;
                struct lease_out o;
                if (lease_one(&x, writes ? &wk : &big, &o, &retired) < 0)
                    goto fail;
                why = o.why;
                if (o.n) {
                    double took = o.t1 - o.t0;
                    if (o.completed < o.n || o.lost || o.err || (writes && took > slow)) {
                        lead = writes ? STOP_WRITE : STOP_READ;     /* (`last`'s kind) */
                        last = lease_result(&o);
                        if (last == NULL)   /* (MemoryError: its commands stay outstanding
                                             * until the kernel's command timeout aborts them) */
                            goto fail;
                        goto out;
                    }
                    Py_CLEAR(o.packed);
                    unnotified += o.completed;
                    int now_lead = writes ? STOP_WRITE : STOP_READ;
                    if (lead != now_lead && set_lead(x.server, lead = now_lead) < 0)
                        goto fail;
                    if (count_done(&x, &h, writes, o.completed, o.nbytes,
                                   took / o.completed) < 0)
                        goto fail;
                }
            }
            if (why == STOP_READ || why == STOP_WRITE || why == STOP_BIG_READ)
                kind = why;
            else
                break;
        }
        if (why != STOP_HEAD)
            goto out;
        /* every command up to cmd_head answered: tell the kernel, then wait for its next */
        if (unnotified || retired) {
            uio_notify(uio_fd);
            unnotified = 0;
            retired = 0;
        }
        if (++rounds > max_rounds)
            goto out;
        double left = deadline - monotonic_now();
        if (left <= 0)
            goto out;
        struct pollfd pfd[2] = {{.fd = uio_fd, .events = POLLIN},
                                {.fd = wake_fd, .events = POLLIN}};
        int pr, perr = 0;
        double gil_t0;    /* the blocking call returned (gil_note) */
        Py_BEGIN_ALLOW_THREADS
        pr = poll(pfd, 2, (int)(left * 1000.0) + 1);
        if (pr < 0)
            perr = errno;
        gil_t0 = monotonic_now();
        Py_END_ALLOW_THREADS
        gil_note(GIL_AFTER_POLL, gil_t0);
        if (pr < 0) {
            if (perr == EINTR)
                goto out;               /* (a signal: Python's handlers run first) */
            errno = perr;
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        if (pr == 0 || (pfd[1].revents & (POLLIN | POLLERR | POLLHUP | POLLNVAL))
                || (pfd[0].revents & (POLLERR | POLLHUP | POLLNVAL)))
            goto out;                   /* idle, a wake-up, or the device going: Python's */
        if (pfd[0].revents & POLLIN) {
            uint32_t events;
            if (read(uio_fd, &events, sizeof events) < 0 && errno != EAGAIN && errno != EINTR)
                goto out;               /* (the Python loop's clear_event raises it) */
        }
    }
out:
    if (unnotified || retired)
        uio_notify(uio_fd);
    PyBuffer_Release(&ring);
    PyObject *result = Py_BuildValue("(iiO)", why, lead, last != NULL ? last : Py_None);
    Py_XDECREF(last);
    return result;
fail:
    /* an exception (a bug) after commands were completed here: the kernel is told */
    if (unnotified || retired)
        uio_notify(uio_fd);
bad_args:
    PyBuffer_Release(&ring);
    return NULL;
}

static PyMethodDef methods[] = {
    {"read_batch", read_batch, METH_VARARGS, read_batch_doc},
    {"take_batch", take_batch, METH_VARARGS, take_batch_doc},
    {"run_batch", run_batch, METH_VARARGS, run_batch_doc},
    {"complete_batch", complete_batch, METH_VARARGS, complete_batch_doc},
    {"lease_batch", lease_batch, METH_VARARGS, lease_batch_doc},
    {"lease_serve", lease_serve, METH_VARARGS, lease_serve_doc},
    {"gil_waits", gil_waits, METH_NOARGS, gil_waits_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lvmirror.tcmu._fastread",
    "The ring thread's compiled path: READs the page cache holds (read_batch), a volume's "
    "WRITEs and large READs in three steps (take_batch, run_batch, complete_batch), and under "
    "the ring thread's lease in one call (lease_batch) or its whole loop (lease_serve).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastread(void)
{
    struct { PyObject **var; const char *text; } names[] = {
        {&s_fetch, "_fetch"}, {&s_outstanding, "_outstanding"}, {&s_stats, "stats"},
        {&s_pending_notify, "pending_notify"}, {&s_acquire, "acquire"},
        {&s_release, "release"}, {&s_inline_t0, "_inline_t0"}, {&s_watch_idle, "_watch_idle"},
        {&s_watch_wake, "_watch_wake"}, {&s_set, "set"}, {&s_gen, "_gen"}, {&s_batch, "batch"},
        {&s_fetched, "fetched"}, {&s_pads, "pads"}, {&s_completed, "completed"},
        {&s_revoked, "revoked"}, {&s_commands, "commands"}, {&s_inline, "inline"},
        {&s_compiled, "compiled"}, {&s_compiled_writes, "compiled_writes"},
        {&s_reads, "reads"}, {&s_writes, "writes"}, {&s_read_bytes, "read_bytes"},
        {&s_write_bytes, "write_bytes"}, {&s_lead, "_lead"}, {&s_inline_after, "_inline_after"},
        {&s_since, "since"}, {&s_fast, "_fast"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (*names[i].var == NULL && (*names[i].var = PyUnicode_InternFromString(names[i].text))
                                      == NULL)
            return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "CHECK_IS", CHECK_IS) || PyModule_AddIntConstant(m, "CHECK_FALSY", CHECK_FALSY)
            || PyModule_AddIntConstant(m, "CHECK_EQ", CHECK_EQ)
            || PyModule_AddIntConstant(m, "STOP_HEAD", STOP_HEAD)
            || PyModule_AddIntConstant(m, "STOP_OTHER", STOP_OTHER)
            || PyModule_AddIntConstant(m, "STOP_STALE", STOP_STALE)
            || PyModule_AddIntConstant(m, "STOP_BUSY", STOP_BUSY)
            || PyModule_AddIntConstant(m, "STOP_MISS", STOP_MISS)
            || PyModule_AddIntConstant(m, "STOP_WRITE", STOP_WRITE)
            || PyModule_AddIntConstant(m, "STOP_MISS_WRITE", STOP_MISS_WRITE)
            || PyModule_AddIntConstant(m, "STOP_READ", STOP_READ)
            || PyModule_AddIntConstant(m, "STOP_BIG_READ", STOP_BIG_READ)
            || PyModule_AddIntConstant(m, "MAX_IOVECS", MAX_IOVECS)
            || PyModule_AddIntConstant(m, "MAX_WRITES", MAX_WRITES)
            || PyModule_AddIntConstant(m, "MAX_LEGS", MAX_LEGS)
            || PyModule_AddIntConstant(m, "BATCH_IOVECS", BATCH_IOVECS)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
