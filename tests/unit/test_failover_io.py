"""lab/failover's initiator (lab/lib/failover_io.py): its blocks, its check, and its view of
libiscsi's ``struct scsi_task`` checked against the C compiler's. The struct was first declared
with ctypes' own bit-fields, which put ``datain`` 8 bytes too far: reading a block back crashed
the writer at the end of the first two-gateway lab run."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "lab", "lib"))
import failover_io  # noqa: E402

HEADER = "/usr/include/iscsi/scsi-lowlevel.h"


def test_blocks_describe_themselves_and_torn_ones_are_seen():
    data = failover_io.block(17, 123456)
    assert len(data) == failover_io.BLOCK
    assert failover_io.parse(data) == (17, 123456)
    assert failover_io.parse(bytes(failover_io.BLOCK)) is None
    torn = data[:2048] + failover_io.block(17, 123457)[2048:]
    with pytest.raises(ValueError):
        failover_io.parse(torn)
    with pytest.raises(ValueError):
        failover_io.parse(b"X" * failover_io.BLOCK)


class _FakeSession:
    """What the check reads: a dict slot -> bytes (missing slots read as zeroes)."""

    portal = "127.0.0.1:1"

    def __init__(self, blocks):
        self.blocks = blocks

    def read(self, lba, nbytes):
        return self.blocks.get(lba // (failover_io.BLOCK // failover_io.LBS), bytes(nbytes))

    def close(self):
        pass


def test_check_counts_an_older_block_as_lost(tmp_path):
    w = failover_io.Writer(["127.0.0.1:1"], "iqn.x", str(tmp_path), slots=4, seed=1)
    w.acked = {0: 5, 1: 7, 2: 9}
    w.per_portal = {"127.0.0.1:1": 3}
    w.session = _FakeSession({0: failover_io.block(0, 5), 1: failover_io.block(1, 6)})
    s = w.check()
    assert s["slots_checked"] == 3 and s["lost"] == 2
    assert [d["slot"] for d in s["lost_detail"]] == [1, 2]
    assert s["torn"] == 0 and s["unacked_slots_written"] == 0


@pytest.mark.skipif(not (os.path.exists(HEADER) and shutil.which("cc")),
                    reason="libiscsi-dev or a C compiler is missing (tools/bootstrap installs them)")
def test_scsi_task_layout_matches_libiscsi(tmp_path):
    src = tmp_path / "off.c"
    src.write_text("""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %zu\\n", offsetof(struct scsi_task, status),
           offsetof(struct scsi_task, sense), offsetof(struct scsi_task, datain),
           offsetof(struct scsi_sense, key), offsetof(struct scsi_sense, ascq),
           sizeof(struct scsi_sense), offsetof(struct scsi_data, data));
    return 0;
}
""")
    exe = tmp_path / "off"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    c = [int(x) for x in subprocess.run([str(exe)], capture_output=True, text=True,
                                        check=True).stdout.split()]
    T, S, D = failover_io._Task, failover_io._Sense, failover_io._Data
    import ctypes
    assert c == [T.status.offset, T.sense.offset, T.datain.offset, S.key.offset,
                 S.ascq.offset, ctypes.sizeof(S), D.data.offset]
