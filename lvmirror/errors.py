"""Exceptions shared by every layer of lvmirror."""


class LvmirrorError(Exception):
    """Base of every lvmirror error."""


class ImageIOError(LvmirrorError):
    """An I/O error on one storage image.

    The mirror volume catches it, marks the image failed and carries on with the others.
    """

    def __init__(self, image, errno, message):
        super().__init__(message)
        self.image = image
        self.errno = errno


class VolumeIOError(LvmirrorError):
    """No in-sync image could serve the request (SCSI: MEDIUM ERROR)."""

    def __init__(self, message, *, is_read):
        super().__init__(message)
        self.is_read = is_read


class ConfigError(LvmirrorError):
    """A bad cfgstring, volume definition or missing image; the message is for an administrator."""


class StateError(LvmirrorError):
    """An operation the volume's current state does not allow."""
