"""Thin provisioning as the SCSI commands see it: GET LBA STATUS and PRE-FETCH (SBC-3).

A volume is thin (the Logical Block Provisioning VPD page says so, LBPRZ: deallocated blocks
read as zeroes): an image file holds only what was written, UNMAP punches holes, and a resync
deallocates all-zero regions instead of writing them. GET LBA STATUS tells an initiator which
extents are mapped and which deallocated, read from the allocation of one image that serves
reads (every in-sync image holds the same data; a hole on one reads as the zeroes the others
hold); backup tools use it to skip what was never written. PRE-FETCH asks the kernel to read
a range into the page cache of the images reads come from.
"""

from __future__ import annotations

__all__ = ["lba_status", "MAX_DESCRIPTOR_BLOCKS"]

MAX_DESCRIPTOR_BLOCKS = 0xFFFFFFFF      # NUMBER OF LOGICAL BLOCKS is 4 bytes (SBC-3 5.x)


def lba_status(storage, lba: int, num_blocks: int, block_size: int,
               max_descriptors: int) -> list[tuple[int, int, bool]]:
    """Up to ``max_descriptors`` ``(lba, blocks, deallocated)`` extents of ``storage`` (a
    StorageImage) from ``lba`` on, in order, the first starting at ``lba``, adjacent extents of
    the same state merged, none longer than MAX_DESCRIPTOR_BLOCKS. ``num_blocks``: the LUN's
    size in blocks of ``block_size`` bytes. ImageIOError as ``StorageImage.allocation``."""
    if max_descriptors <= 0 or lba >= num_blocks:
        return []
    start, end = lba * block_size, num_blocks * block_size
    out: list[list] = []
    for off, length, mapped in storage.allocation(start, end - start, max_descriptors + 1):
        first = off // block_size
        # a partly written block is mapped: round mapped extents outwards
        last = -(-(off + length) // block_size) if mapped else (off + length) // block_size
        first = max(first, out[-1][0] + out[-1][1] if out else lba)
        if last <= first:
            continue
        if out and out[-1][2] == (not mapped):
            out[-1][1] = last - out[-1][0]
        else:
            out.append([first, last - first, not mapped])
    descriptors = []
    for first, count, dealloc in out:
        while count > 0 and len(descriptors) < max_descriptors:
            n = min(count, MAX_DESCRIPTOR_BLOCKS)
            descriptors.append((first, n, dealloc))
            first, count = first + n, count - n
    return descriptors
