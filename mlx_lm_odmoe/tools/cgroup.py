"""Run a command inside a Linux memory cgroup (v1), to model a smaller machine.

The limit counts the cgroup's page cache too, so a process reading a model
bigger than the limit really runs with less memory than the model.
Root only; :func:`unavailable_reason` says why it can't be used.
"""

import os
import subprocess
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path("/sys/fs/cgroup/memory")


def unavailable_reason() -> Optional[str]:
    if not ROOT.is_dir() or not (ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {ROOT} (Linux only)"
    if os.geteuid() != 0:
        return "memory cgroups need root: run this benchmark with sudo"
    return None


class MemoryCgroup:
    def __init__(self, limit_bytes: int, name: str = None):
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        self.path = ROOT / (name or f"odmoe-{os.getpid()}-{time.monotonic_ns()}")
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
        # No swap: over the limit means reclaim or the OOM killer.
        swap = self.path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            try:
                swap.write_text(str(int(limit_bytes)))
            except OSError:
                pass

    def _read(self, name) -> int:
        return int((self.path / name).read_text().split()[0])

    @property
    def peak_bytes(self) -> int:
        return self._read("memory.max_usage_in_bytes")

    @property
    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def drop_page_cache(self):
        """Reclaim this cgroup's page cache (cold reads for the next run)."""
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass

    def popen(self, cmd: List[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` already inside the cgroup (it joins before exec)."""
        procs = self.path / "cgroup.procs"
        return subprocess.Popen(
            ["/bin/sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd], **kwargs
        )

    def close(self):
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_all_page_caches():
    """Cold cache for the whole machine (root)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")
