/*
 * lvmirror.tcmu._fastread: the ring thread's compiled path for READs the page cache holds, and
 * for the WRITEs of a one-image volume (write_batch, below).
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
 * write_batch() makes the WRITE(10)/WRITE(16) commands without FUA from the fetch cursor on,
 * up to MAX_WRITES: it parses them holding the GIL, RELEASES it for one pwritev() of each
 * command's Data-Out (a buffered write may wait: dirty-page throttling, the journal, stable
 * pages), takes it back and completes those written whole. The caller holds what keeps the
 * volume as it was meanwhile (MirrorVolume.begin_fast_writes: a region lock over every block,
 * the split epoch entered) and the ring's lock. read_big_batch() does the same for READs over
 * read_batch's size (up to 1 MiB; read_batch stops at one with STOP_BIG_READ): a copy that
 * large is made without the GIL, so the process's other threads run meanwhile, under a SHARED
 * region lock over every block (MirrorVolume.begin_fast_reads) and the epoch entered. Both read
 * their `busy` conditions again once the GIL is back, so that a group split's hold of the
 * LUN's completions that began during the I/O holds theirs too.
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
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
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

/* what one call of write_batch/read_big_batch takes at most, besides its `max_commands`: the
 * iovecs of its commands (a pool on the stack) and their bytes (a call holds the caller's
 * region lock over the whole volume: other I/O waits for the lot) */
#define BATCH_IOVECS 1024
#define BATCH_BYTES (8u << 20)

/* why read_batch stopped (the fifth item it returns) */
#define STOP_HEAD 0     /* it reached cmd_head: every command there was answered */
#define STOP_OTHER 1    /* the next entry is not one it answers: the Python fetch takes it */
#define STOP_STALE 2    /* a `checks` condition no longer holds: the caller arms again */
#define STOP_BUSY 3     /* a `busy` condition holds (a region lock, held completions) */
#define STOP_MISS 4     /* the data is not all in memory, or the read failed: the Python path */
#define STOP_WRITE 5    /* read_batch: the next entry is a WRITE write_batch may make */
#define STOP_MISS_WRITE 6   /* write_batch: a write failed or was short: the Python path */
#define STOP_READ 7     /* write_batch: the next entry is a READ read_batch may answer */
#define STOP_BIG_READ 8 /* read_batch: the next entry is a READ over `max_bytes` that
                         * read_big_batch may answer; read_big_batch: its batch is full */

/* the most WRITEs write_batch makes in one call */
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
        lba = be32(cdb + 2);
        nblk = ((unsigned)cdb[7] << 8) | cdb[8];
        control = cdb[9];
    } else if ((cdb[0] == 0x88 || cdb[0] == 0x8A) && cdb_off + 16 <= ent_end) {   /* (16) */
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
    c->lba = lba;
    c->want = want;
    c->iov_cnt = iov_cnt;
    return is_write ? ENT_WRITE : ENT_READ;
}

/* What both entry points do first: check the ring's geometry and the fetch cursor (ValueError),
 * read the conditions (`checks` then `busy`) and the kernel's cmd_head. Returns STOP_HEAD when
 * the batch may start, STOP_STALE/STOP_BUSY when a condition does not hold, STOP_OTHER for a
 * cmd_head that is not a ring offset (ring.py's fetch logs it), or -1 with an exception set and
 * `ring` released. */
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
        PyBuffer_Release(ring);
        return -1;
    }
    int ok = conditions_hold(checks);
    if (ok == 0)
        return STOP_STALE;
    if (ok > 0)
        ok = conditions_hold(busy);
    if (ok < 0) {
        PyBuffer_Release(ring);
        return -1;
    }
    if (ok == 0)
        return STOP_BUSY;
    struct tcmu_mailbox *mb = (struct tcmu_mailbox *)ring->buf;
    *head = __atomic_load_n(&mb->cmd_head, __ATOMIC_ACQUIRE);
    if (*head >= cmdr_size || *head % TCMU_OP_ALIGN_SIZE)
        return STOP_OTHER;
    return STOP_HEAD;
}

PyDoc_STRVAR(read_batch_doc,
"read_batch(ring, cmdr_off, cmdr_size, data_off, map_size, fetch, fd, rwf, num_blocks,\n"
"           block_size, max_bytes, max_blocks, checks, busy, big_bytes=0)\n"
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
"(read_big_batch's, which reads without the GIL).\n"
"\n"
"Returns the new fetch cursor, the commands answered GOOD, their bytes, the PAD entries\n"
"skipped, and why it stopped: 0 cmd_head reached, 1 an entry it does not answer, 2 a\n"
"`checks` condition failed, 3 a `busy` one, 4 a read not served from memory (nothing\n"
"answered for that command), 5 a WRITE it may answer (write_batch), 8 a READ over\n"
"`max_bytes` for read_big_batch. TypeError/ValueError for malformed arguments; never an I/O\n"
"error (the Python path reads such a command again and reports it).");

static PyObject *
read_batch(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring;
    unsigned int cmdr_off, cmdr_size, fetch;
    unsigned long long data_off, map_size, num_blocks, max_bytes, max_blocks, big_bytes = 0;
    int fd, rwf;
    unsigned int block_size;
    PyObject *checks, *busy;

    if (!PyArg_ParseTuple(args, "w*IIKKIiiKIKKO!O!|K", &ring, &cmdr_off, &cmdr_size, &data_off,
                          &map_size, &fetch, &fd, &rwf, &num_blocks, &block_size, &max_bytes,
                          &max_blocks, &PyTuple_Type, &checks, &PyTuple_Type, &busy,
                          &big_bytes))
        return NULL;
    uint8_t *map = ring.buf;
    Py_ssize_t answered = 0, pads = 0;
    unsigned long long nbytes = 0;
    uint32_t head = 0;
    int why = begin_batch(&ring, cmdr_off, cmdr_size, data_off, map_size, fetch, block_size,
                          checks, busy, &head);
    if (why < 0)
        return NULL;
    uint64_t parse_max = big_bytes > max_bytes ? big_bytes : max_bytes;
    struct iovec pool[MAX_IOVECS];
    struct rw_cmd c;
    while (why == STOP_HEAD && fetch != head) {
        int kind = parse_entry(map, cmdr_off, cmdr_size, data_off, map_size, fetch, head,
                               num_blocks, block_size, parse_max, max_blocks, pool, MAX_IOVECS,
                               &c);
        if (kind == ENT_PAD) {
            pads++;
            fetch = (fetch + c.length) % cmdr_size;
            continue;
        }
        if (kind != ENT_READ) {
            /* (a WRITE over `max_bytes` is not write_batch's either - both take 64 KiB - so
             * the Python fetch takes it, and no whole-volume lock is taken for nothing) */
            why = kind == ENT_WRITE && c.want <= max_bytes ? STOP_WRITE : STOP_OTHER;
            break;
        }
        if (c.want > max_bytes) {
            why = STOP_BIG_READ;        /* read_big_batch's, without the GIL */
            break;
        }
        ssize_t got = preadv2(fd, c.iov, (int)c.iov_cnt, (off_t)(c.lba * block_size), rwf);
        if (got < 0 || (uint64_t)got != c.want) {
            why = STOP_MISS;            /* EAGAIN, short, an error: the Python path */
            break;
        }
        fetch = (fetch + c.length) % cmdr_size;
        complete_good(map, cmdr_off, cmdr_size, c.cmd_id);
        answered++;
        nbytes += c.want;
    }
    PyBuffer_Release(&ring);
    return Py_BuildValue("(InKni)", fetch, answered, nbytes, pads, why);
}

/* write_batch and read_big_batch: parse the consecutive commands of one kind holding the GIL,
 * release it for their I/O, take it back and complete those done whole. */
static PyObject *
unlocked_batch(Py_buffer *ring, uint32_t cmdr_off, uint32_t cmdr_size, uint64_t data_off,
               uint64_t map_size, uint32_t fetch, int fd, int rwf, uint64_t num_blocks,
               uint32_t block_size, uint64_t max_bytes, uint64_t max_blocks,
               uint32_t max_commands, PyObject *checks, PyObject *busy, int writes)
{
    uint8_t *map = ring->buf;
    if (max_commands > MAX_WRITES)
        max_commands = MAX_WRITES;
    uint32_t head = 0;
    int why = begin_batch(ring, cmdr_off, cmdr_size, data_off, map_size, fetch, block_size,
                          checks, busy, &head);
    if (why < 0)
        return NULL;
    int mine = writes ? ENT_WRITE : ENT_READ;
    int full = writes ? STOP_WRITE : STOP_BIG_READ;     /* the caller calls again */
    int other = writes ? STOP_READ : STOP_WRITE;        /* the other function's */
    /* the commands, each with the fetch cursor after it and the PADs skipped before it, and
     * their iovecs */
    struct rw_cmd cmds[MAX_WRITES];
    uint32_t after[MAX_WRITES];
    Py_ssize_t pads_before[MAX_WRITES];
    struct iovec pool[BATCH_IOVECS];
    uint32_t n = 0, cur = fetch, used = 0;
    uint64_t batch_bytes = 0;
    Py_ssize_t pads = 0;
    while (why == STOP_HEAD && cur != head) {
        if (n == max_commands) {
            why = full;
            break;
        }
        int kind = parse_entry(map, cmdr_off, cmdr_size, data_off, map_size, cur, head,
                               num_blocks, block_size, max_bytes, max_blocks, pool + used,
                               BATCH_IOVECS - used, &cmds[n]);
        if (kind == ENT_PAD) {
            pads++;
            cur = (cur + cmds[n].length) % cmdr_size;
            continue;
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
        after[n] = cur;
        pads_before[n] = pads;
        n++;
    }
    /* the I/O, without the GIL: every other thread runs meanwhile; the caller's epoch and
     * region lock keep the volume's images and I/O as they were */
    uint32_t done = 0;
    int err = 0, failed = 0, busy_after = 0;
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        for (; done < n; done++) {
            struct rw_cmd *c = &cmds[done];
            off_t pos = (off_t)(c->lba * block_size);
            ssize_t got = writes ? pwritev(fd, c->iov, (int)c->iov_cnt, pos)
                                 : preadv2(fd, c->iov, (int)c->iov_cnt, pos, rwf);
            if (got < 0 || (uint64_t)got != c->want) {
                err = got < 0 ? errno : 0;
                failed = 1;
                break;
            }
        }
        Py_END_ALLOW_THREADS
        /* `busy` again, now the GIL is back: what began meanwhile (a group split's hold of
         * the LUN's completions) holds for these too. None is completed; the Python path
         * takes them up again (its I/O is done once more, with the same data) and holds its
         * completions as it holds any other's. */
        int free_now = conditions_hold(busy);
        if (free_now < 0) {
            PyBuffer_Release(ring);
            return NULL;
        }
        if (free_now == 0) {
            done = 0;
            failed = 1;
            err = 0;
            busy_after = 1;
        }
    }
    unsigned long long nbytes = 0;
    for (uint32_t k = 0; k < done; k++) {
        complete_good(map, cmdr_off, cmdr_size, cmds[k].cmd_id);
        nbytes += cmds[k].want;
    }
    if (failed) {
        why = busy_after ? STOP_BUSY : writes ? STOP_MISS_WRITE : STOP_MISS;
        fetch = done ? after[done - 1] : fetch;
        pads = done ? pads_before[done - 1] : 0;
    } else if (n) {
        fetch = after[n - 1];
        pads = pads_before[n - 1];
    } else {
        fetch = cur;                    /* PADs only: skipped */
    }
    PyBuffer_Release(ring);
    return Py_BuildValue("(InKnii)", fetch, (Py_ssize_t)done, nbytes, pads, why, err);
}

PyDoc_STRVAR(write_batch_doc,
"write_batch(ring, cmdr_off, cmdr_size, data_off, map_size, fetch, fd, num_blocks,\n"
"            block_size, max_bytes, max_blocks, max_commands, checks, busy)\n"
"    -> (fetch, answered, nbytes, pads, why, err)\n"
"\n"
"Make the WRITE(10)/WRITE(16) commands from ring offset `fetch` on, in ring order, up to\n"
"`max_commands` of them (and 8 MiB, 1,024 iovecs): the field checks of read_batch, and no FUA\n"
"(SBC-4 5.40: durable before GOOD, the Python path's). It checks `checks` and `busy` and parses\n"
"the commands holding the GIL, then RELEASES it for one pwritev(`fd`, ...) of each command's\n"
"Data-Out (a buffered write may wait: for dirty-page throttling, the journal, a stable page),\n"
"takes it back and completes GOOD each command written whole. It stops at the first command\n"
"whose write failed or was short, which it leaves unanswered for the Python path to write\n"
"again and report. `busy` is read again after the writes: should one hold now, it completes\n"
"none (why 3) and leaves them all to the Python path. The caller must hold what keeps the volume's I/O state while the GIL is\n"
"released: its split epoch entered and a region lock over every block, and it keeps the\n"
"ring's lock.\n"
"\n"
"Returns the new fetch cursor, the commands answered GOOD, their bytes, the PAD entries\n"
"skipped, why it stopped (read_batch's codes; 1 the next entry is not a READ or WRITE either\n"
"may answer, 5 the batch is full (call again), 6 a write failed or was short, 7 the next\n"
"entry is a READ read_batch may answer) and that write's errno (0: none, or short).\n"
"TypeError/ValueError for malformed arguments.");

static PyObject *
write_batch(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring;
    unsigned int cmdr_off, cmdr_size, fetch, max_commands;
    unsigned long long data_off, map_size, num_blocks, max_bytes, max_blocks;
    int fd;
    unsigned int block_size;
    PyObject *checks, *busy;

    if (!PyArg_ParseTuple(args, "w*IIKKIiKIKKIO!O!", &ring, &cmdr_off, &cmdr_size, &data_off,
                          &map_size, &fetch, &fd, &num_blocks, &block_size, &max_bytes,
                          &max_blocks, &max_commands, &PyTuple_Type, &checks, &PyTuple_Type,
                          &busy))
        return NULL;
    return unlocked_batch(&ring, cmdr_off, cmdr_size, data_off, map_size, fetch, fd, 0,
                          num_blocks, block_size, max_bytes, max_blocks, max_commands, checks,
                          busy, 1);
}

PyDoc_STRVAR(read_big_batch_doc,
"read_big_batch(ring, cmdr_off, cmdr_size, data_off, map_size, fetch, fd, rwf, num_blocks,\n"
"               block_size, max_bytes, max_blocks, max_commands, checks, busy)\n"
"    -> (fetch, answered, nbytes, pads, why, err)\n"
"\n"
"write_batch for READs: answer the READ(10)/READ(16) commands from ring offset `fetch` on, in\n"
"ring order, up to `max_commands` of them (and 8 MiB, 1,024 iovecs), with read_batch's field\n"
"checks, parsing them holding the GIL and RELEASING it for one preadv2(`fd`, ..., `rwf`) of\n"
"each (a large copy: every other thread runs meanwhile). It completes GOOD each command read\n"
"whole and stops at the first that was not (RWF_NOWAIT: not all in memory), which it leaves\n"
"unanswered for the Python path; `busy` is read again after the reads, as write_batch does.\n"
"The caller must hold what keeps the volume's I/O state while\n"
"the GIL is released: its split epoch entered and a region lock (shared) over every block, and\n"
"it keeps the ring's lock.\n"
"\n"
"Returns what write_batch returns; why: 0 cmd_head reached, 1 an entry neither function\n"
"answers, 2/3 a `checks`/`busy` condition, 4 a read not served whole, 5 the next entry is a\n"
"WRITE, 8 the batch is full (call again); err the failed read's errno (0: none, or short).\n"
"TypeError/ValueError for malformed arguments.");

static PyObject *
read_big_batch(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer ring;
    unsigned int cmdr_off, cmdr_size, fetch, max_commands;
    unsigned long long data_off, map_size, num_blocks, max_bytes, max_blocks;
    int fd, rwf;
    unsigned int block_size;
    PyObject *checks, *busy;

    if (!PyArg_ParseTuple(args, "w*IIKKIiiKIKKIO!O!", &ring, &cmdr_off, &cmdr_size, &data_off,
                          &map_size, &fetch, &fd, &rwf, &num_blocks, &block_size, &max_bytes,
                          &max_blocks, &max_commands, &PyTuple_Type, &checks, &PyTuple_Type,
                          &busy))
        return NULL;
    return unlocked_batch(&ring, cmdr_off, cmdr_size, data_off, map_size, fetch, fd, rwf,
                          num_blocks, block_size, max_bytes, max_blocks, max_commands, checks,
                          busy, 0);
}

static PyMethodDef methods[] = {
    {"read_batch", read_batch, METH_VARARGS, read_batch_doc},
    {"write_batch", write_batch, METH_VARARGS, write_batch_doc},
    {"read_big_batch", read_big_batch, METH_VARARGS, read_big_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "lvmirror.tcmu._fastread",
    "The ring thread's compiled path: READs the page cache holds (read_batch, read_big_batch) "
    "and a one-image volume's WRITEs (write_batch).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__fastread(void)
{
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
            || PyModule_AddIntConstant(m, "MAX_WRITES", MAX_WRITES)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
