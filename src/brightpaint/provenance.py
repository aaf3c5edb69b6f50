"""Provenance, in one place: the workflow checkout's git commit, the sha256 of a file, and the
installed versions of an environment's packages (this interpreter's or another environment's
site-packages, e.g. CellProfiler's)."""

from __future__ import annotations

import hashlib
import re
import subprocess
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

MAIN_PACKAGES = ("brightpaint", "snakemake", "numpy", "scipy", "pandas", "torch", "cellpose", "zarr",
                 "ome-zarr", "tifffile", "scikit-image", "pycytominer", "copairs", "basicpy")
CELLPROFILER_PACKAGES = ("cellprofiler-nightly", "cellprofiler-core-nightly",
                         "cellprofiler-library-nightly", "numpy", "scipy", "centriole", "mahotas")


def git_commit(folder: str | Path | None = None, *, unknown: str = "") -> str:
    """The commit of the git checkout that holds `folder` (default: this package's folder), with
    "+dirty" when tracked files changed; `unknown` outside git (or without git)."""
    folder = Path(__file__).resolve().parent if folder is None else Path(folder)
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return unknown
    if head.returncode or dirty.returncode:
        return unknown
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def environment_versions(site_packages: str | Path | None = None,
                         names: Iterable[str] = MAIN_PACKAGES) -> dict[str, str]:
    """Installed versions of `names`: this interpreter's (site_packages None) or those of another
    environment's site-packages folder, read from its *.dist-info metadata (nothing is imported)."""
    wanted = {_normal(n): n for n in names}
    found = {}
    if site_packages is None:
        for name in wanted.values():
            try:
                found[name] = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
        return found
    for info in Path(site_packages).glob("*.dist-info"):
        meta = info / "METADATA"
        if not meta.is_file():
            continue
        fields = dict(line.split(": ", 1) for line in meta.read_text(errors="replace").splitlines()[:20]
                      if ": " in line)
        key = _normal(fields.get("Name", ""))
        if key in wanted:
            found[wanted[key]] = fields.get("Version", "?")
    return dict(sorted(found.items()))


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
