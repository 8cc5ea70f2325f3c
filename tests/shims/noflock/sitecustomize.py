"""A simulated file system without flock, for tests only: put this directory on PYTHONPATH and every
fcntl.flock call fails as on Lustre mounted `noflock` (ENOSYS), or with DISTSFT_TEST_FLOCK_ERRNO=ENOLCK
as on NFS mounted `nolock`. (This machine's file systems all support flock, so the refusal cannot be
produced for real here.)"""
import errno
import fcntl
import os

_code = getattr(errno, os.environ.get("DISTSFT_TEST_FLOCK_ERRNO", "ENOSYS"))


def _flock(fd, operation):  # noqa: ANN001 - fcntl.flock's signature
    raise OSError(_code, os.strerror(_code))


fcntl.flock = _flock
