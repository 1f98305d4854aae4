"""Writing a new file front to back, bypassing the page cache (O_DIRECT) where the filesystem allows it.

A buffered write copies every byte into the page cache and leaves the flush to the kernel later; exporting a
checkpoint that way spent as much CPU on that copy as on reading the whole checkpoint. A direct write goes from
an aligned staging buffer to the device, which leaves the CPU to the reader running alongside. Filesystems that
refuse O_DIRECT (at open or at the first write) get ordinary buffered writes through the same code.
"""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np

ALIGNMENT = 4096  # Offsets, lengths and buffer addresses of direct I/O are multiples of this.
STAGING_BYTES = 16 * 2**20


def _aligned_buffer(size: int) -> np.ndarray:
    raw = np.empty(size + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + size]


class SequentialFile:
    """A new file (it must not exist) written by `append` in order; `close` writes the tail and sets the size."""

    def __init__(self, path: str, direct: bool = True):
        self.path = path
        self._file = open(path, "xb", buffering=0)
        self.direct = direct and _set_direct(self._file.fileno(), True)
        self._staging = _aligned_buffer(STAGING_BYTES)
        self._filled = 0  # Bytes in the staging buffer.
        self._flushed = 0  # Bytes already in the file (a multiple of ALIGNMENT until close).

    def append(self, data: np.ndarray) -> None:
        """Append the bytes of a contiguous array."""
        data = data.reshape(-1).view(np.uint8)
        while data.size:
            take = min(data.size, STAGING_BYTES - self._filled)
            self._staging[self._filled:self._filled + take] = data[:take]
            self._filled += take
            data = data[take:]
            if self._filled == STAGING_BYTES:
                self._flush(STAGING_BYTES)

    def close(self) -> None:
        """Write what is staged (padded to the alignment, then truncated back) and close the file."""
        size = self._flushed + self._filled
        padded = -(-self._filled // ALIGNMENT) * ALIGNMENT
        self._staging[self._filled:padded] = 0
        self._flush(padded)
        os.ftruncate(self._file.fileno(), size)
        self._file.close()

    def _flush(self, length: int) -> None:
        view, done = memoryview(self._staging[:length]), 0
        while done < length:
            try:
                done += os.pwrite(self._file.fileno(), view[done:], self._flushed + done)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL):
                    raise
                self.direct = _set_direct(self._file.fileno(), False)  # Accepted at open, refused on write.
        self._flushed += length
        self._filled = 0


def _set_direct(fd: int, enabled: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; returns whether it is now on."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if enabled else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return enabled
