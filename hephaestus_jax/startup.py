"""Command start-up: keep host memory between train steps, and drop the known, harmless messages that
TensorFlow, CUDA and libtpu print to stderr.

`command_startup()` is called first by every command (`python -m hephaestus_jax.<cli>` and tools/, through
`command.start()`), before TensorFlow or JAX are imported; never on library import, so a notebook or a test that
imports the package keeps its allocator and its stderr as they are (a notebook may call `keep_host_memory()`
itself, before JAX starts).

Host memory: XLA:CPU allocates a step's temporaries as one block (several GB for a real model: 5 GB for
SmolLM2-135M at 4 x 512 tokens) with `malloc`. glibc serves a block that large with a fresh `mmap` and unmaps it
when the step ends, so the kernel zero-fills every page again on every step: 1.6 million page faults and 12%
of that train step on CPU (docs/performance.md). `keep_host_memory()` tells glibc to serve every allocation from
one arena without `mmap` and never to give freed memory back, so the block is reused; the process keeps its
peak memory, as an accelerator runtime does. HEPHAESTUS_KEEP_HOST_MEMORY=0 turns it off.

Stderr: these libraries write from C++ straight to file descriptor 2 (e.g. `E0000 ... failed call to cuInit` on a
machine without a GPU, libtpu's host-bound warnings on one without a TPU), which reads as an error to a new user.
Unless HEPHAESTUS_VERBOSE_STARTUP=1, fd 2 is replaced by a pipe into a small filter process that drops lines
containing one of `NOISE` and passes every other byte through to the real stderr. A separate process (not a
thread) drains the pipe even when this process dies abruptly, so an abort's last messages are never lost. Child
processes inherit the filtered stderr.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import platform
import subprocess
import sys

VERBOSE_ENV = "HEPHAESTUS_VERBOSE_STARTUP"
KEEP_MEMORY_ENV = "HEPHAESTUS_KEEP_HOST_MEMORY"
_FILTERED_ENV = "HEPHAESTUS_STDERR_FILTERED"  # Set once the filter is in place (children inherit it).

# Substrings of messages that say nothing actionable (libraries probing for hardware that is not there).
NOISE = (
    "failed call to cuInit",
    "Could not find cuda drivers on your machine",
    "Unable to register cuDNN factory", "Unable to register cuFFT factory", "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
    "oneDNN custom operations are on",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "Logging before InitGoogle() is written to STDERR",
    "could not determine TPU accelerator type",
    "could not determine TPU worker hostnames",
    "=== Source Location Trace: ===",
    "tfrc/runtime/libtpu_init_utils.cc",
)

# The filter: line by line from stdin to stdout; a partial line is passed on after 0.1 s without more data.
_FILTER = r"""
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the command; the filter ends at end of input.
noise = [n.encode() for n in sys.argv[1:]]
pending = b""
def emit(line):
    if not any(n in line for n in noise):
        os.write(1, line)
while True:
    ready, _, _ = select.select([0], [], [], 0.1 if pending else None)
    if not ready:
        emit(pending)
        pending = b""
        continue
    data = os.read(0, 65536)
    if not data:
        break
    *lines, pending = (pending + data).split(b"\n")
    for line in lines:
        emit(line + b"\n")
if pending:
    emit(pending)
"""


def command_startup() -> None:
    """What every command does first: `keep_host_memory()`, then `quiet_stderr()`."""
    keep_host_memory()
    quiet_stderr()


def keep_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring); True if it now does.

    Call before JAX starts its threads (a thread picks its malloc arena at its first allocation). A no-op
    returning False under another C library or with HEPHAESTUS_KEEP_HOST_MEMORY=0.
    """
    if os.environ.get(KEEP_MEMORY_ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # <malloc.h>
    # One arena (threads' own arenas mmap large blocks regardless), no mmap, and a trim threshold of -1, which
    # glibc reads as SIZE_MAX: freed memory is never returned to the system.
    return all(mallopt(option, value) == 1
               for option, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, -1)))


def quiet_stderr() -> None:
    """Filter this process's stderr (and its children's) through `NOISE`, unless asked not to or already done."""
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0") or os.environ.get(_FILTERED_ENV):
        return
    try:
        real_stderr = os.dup(2)
        read_end, write_end = os.pipe()
        process = subprocess.Popen([sys.executable, "-c", _FILTER, *NOISE], stdin=read_end, stdout=real_stderr,
                                   stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    except OSError:  # No fd 2 (a daemon) or no processes left: keep stderr as it is.
        return
    os.close(read_end)
    sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    os.environ[_FILTERED_ENV] = "1"

    def drain() -> None:
        """At exit: give the real stderr back and let the filter pass on what it holds."""
        sys.stderr.flush()
        os.dup2(real_stderr, 2)
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:  # A child process still holds the pipe; it drains on its own.
            pass

    atexit.register(drain)
