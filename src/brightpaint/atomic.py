"""Write-then-rename helpers: a reader sees a complete output or none, never a half-written one."""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _partial(path: Path) -> Path:
    # The suffix is kept so that writers which add or check extensions (np.save, PIL) behave.
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` (file or directory) to write; rename it to `path` on
    success, delete it on any exception. The sibling lives in the same folder, so the rename is
    atomic on POSIX file systems."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial(path)
    # A writer killed with SIGKILL (a cancelled cluster job) never reached its cleanup: its partial
    # sibling is removed here, when the job is rerun.
    for leftover in path.parent.glob(f".{glob.escape(path.stem)}.partial-*{glob.escape(path.suffix)}"):
        _remove(leftover)
    try:
        yield partial
        if path.exists():
            _remove(path)
        os.replace(partial, path)
    except BaseException:
        _remove(partial)
        raise


def link_tree(source: Path, destination: Path) -> None:
    """Recreate `source` at `destination` with hard links (no data copied); copies where the file
    system refuses links."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, destination, copy_function=link_or_copy)
