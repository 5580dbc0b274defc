"""Write a folder so that it appears complete or not at all."""

import contextlib
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(dst: Path, force: bool = False):
    """Yield a temporary sibling of ``dst``; rename it to ``dst`` on success,
    remove it on any error (Ctrl-C included)."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise FileExistsError(
            f"Cannot save to {dst}: it already exists. Delete it or pick another --mlx-path."
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        shutil.rmtree(dst)
    os.rename(tmp, dst)
