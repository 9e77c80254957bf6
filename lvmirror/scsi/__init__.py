"""The sans-I/O SCSI core: CDB + buffers in, status + sense + data length out (see lu.py)."""

from lvmirror.scsi import constants
from lvmirror.scsi.constants import BUSY, CHECK_CONDITION, GOOD, TASK_ABORTED
from lvmirror.scsi.lu import Backend, LogicalUnit, Response
from lvmirror.scsi.sense import build_sense, parse_sense

__all__ = ["BUSY", "Backend", "CHECK_CONDITION", "GOOD", "LogicalUnit", "Response",
           "TASK_ABORTED", "build_sense", "constants", "parse_sense"]
