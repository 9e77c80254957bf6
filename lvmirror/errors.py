"""Exceptions shared by every layer of lvmirror."""

import errno as _errno


class LvmirrorError(Exception):
    """Base of every lvmirror error."""


class ImageIOError(LvmirrorError):
    """An I/O error on one storage image.

    The mirror volume catches it, marks the image failed and carries on with the others.
    """

    def __init__(self, image, errno, message, *, op=None, offset=None, length=None,
                 slow=False):
        super().__init__(message)
        self.image = image
        self.errno = errno
        self.op = op                # "read", "write", "flush", "discard" (None: unknown)
        self.offset = offset        # bytes from the start of the image
        self.length = length        # bytes
        # lvmirror gave up waiting for the I/O (failed as slow, ETIMEDOUT of its own): its
        # outcome is unknown yet - left behind in flight, or never begun - not an error the
        # device returned
        self.slow = slow
        # a FUA write's sync failed or may have (RWF_DSYNC, or the fdatasync after it): like
        # a failed flush, which writes it lost is unknown (``StorageImage._writev``)
        self.synced = False

    @property
    def out_of_space(self) -> bool:
        """The file system under the image is full (ENOSPC, EDQUOT): not a broken disk."""
        return self.errno in (_errno.ENOSPC, _errno.EDQUOT)

    @property
    def lost_writeback(self) -> bool:
        """The error came from a sync (a flush, or a FUA write's sync: ``synced``), which
        reports a writeback error of earlier writes: what they wrote may be gone, whatever the
        errno - ENOSPC from a sync is data the file system could not store, not a write
        refused for room (trial of 2026-12-06, HIGH: a SYNCHRONIZE CACHE's ENOSPC was taken
        for a full file system, and the next one answered GOOD)."""
        return self.synced or self.op == "flush"


class VolumeIOError(LvmirrorError):
    """No in-sync image could serve the request (SCSI: MEDIUM ERROR), or, with
    ``out_of_space``, no image had room for a write (SCSI, thin provisioning: DATA PROTECT /
    SPACE ALLOCATION FAILED WRITE PROTECT, SBC-3 4.7.3.6)."""

    def __init__(self, message, *, is_read, out_of_space=False):
        super().__init__(message)
        self.is_read = is_read
        self.out_of_space = out_of_space


class ConfigError(LvmirrorError):
    """A bad cfgstring, volume definition or missing image; the message is for an administrator."""


class StateError(LvmirrorError):
    """An operation the volume's current state does not allow."""


class HeldForBackup(StateError):
    """A writable export of a split image refused while a backup holds the image
    (``VolumeRegistry.hold_copy``): it passes by itself, and a LUN refused so opens the image
    once the backup ends (``LunServer._follow_alua``)."""


class WouldBlock(LvmirrorError):
    """A read or write asked not to block (``nowait``) could not complete from memory at once:
    the data is not in the page cache (``preadv`` with RWF_NOWAIT answered EAGAIN or read
    short), a region lock is held by a conflicting I/O, a restore must copy the region first,
    the write-intent log must be saved first, or an image errored. Nothing was changed: the
    caller runs the same command again where it may block."""
