"""Memory: the process's peak resident set size, and a sampler for the peak of a block."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import threading


def peak_rss_gib():
    """Peak resident set size of this process in GiB (``ru_maxrss`` is in kB on Linux):
    the kernel's high-water mark since the process started."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release_memory():
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``),
    so the next measurement starts from what is really held."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _status():
    """This process's ``VmRSS``, ``RssAnon`` and ``RssFile`` in bytes (``/proc/self/status``;
    empty where there is none)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in PeakMemory.FIELDS:
                    out[key] = int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return out


class PeakMemory:
    """Peak resident memory over a ``with`` block, sampled every ``interval`` seconds in a
    thread: ``peak`` and ``start`` hold ``VmRSS`` (all resident memory) and its anonymous
    and file-backed parts ``RssAnon`` / ``RssFile`` in bytes. Unlike
    :func:`peak_rss_gib` it measures one block, not the process since it started.
    With ``trim`` the block starts after :func:`release_memory`.
    """

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, interval=0.005, trim=True):
        self.interval = interval
        self.trim = trim

    def _sample(self):
        for key, value in _status().items():
            self.peak[key] = max(self.peak.get(key, 0), value)

    def _run(self):
        while not self._halt.wait(self.interval):
            self._sample()

    def __enter__(self):
        if self.trim:
            release_memory()
        self.start = _status()
        self.peak = dict(self.start)
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._halt.set()
        self._thread.join()
        self._sample()
        return False

    @property
    def delta_mb(self):
        """Peak ``VmRSS`` above the start of the block, in MiB."""
        return (self.peak.get("VmRSS", 0) - self.start.get("VmRSS", 0)) / 2**20

    def peak_gib(self, field="VmRSS"):
        """Peak of ``field`` (one of :attr:`FIELDS`) in GiB."""
        return self.peak.get(field, 0) / 2**30
