"""Provenance, in one place: the workflow checkout's git commit, the sha256 of a file, and the
installed versions of an environment's packages (this interpreter's or another environment's
site-packages, e.g. CellProfiler's)."""

from __future__ import annotations

import ast
import hashlib
import re
import subprocess
from collections.abc import Iterable
from functools import cache, lru_cache
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


def cellprofiler_site_packages(cellprofiler: str | Path) -> Path | None:
    """The site-packages folder of the environment holding the `cellprofiler` executable."""
    found = sorted(Path(cellprofiler).resolve().parent.parent.glob("lib/python3*/site-packages"))
    return found[0] if found else None


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# What a workflow job's results depend on besides its inputs and settings: the code it runs and the
# libraries it runs on. Recorded as the job's params (see workflow.code_params), compared by content,
# so a fresh clone or a copy of the workflow (new file times, same code) reruns nothing.
SCIENCE_PACKAGES = tuple(name for name in MAIN_PACKAGES if name not in ("brightpaint", "snakemake"))
PACKAGE_ROOT = Path(__file__).resolve().parent


def code_digest(script: str | Path, package_root: str | Path = PACKAGE_ROOT) -> str:
    """The sha256 of the code a workflow script runs: the script and every part of the package at
    `package_root` it imports, directly or through other parts. A part is a top-level module or a whole
    subpackage (its data files too: CellProfiler plugins, report templates). Python files count as
    their syntax trees, so comments and formatting do not; docstrings do."""
    root = Path(package_root).resolve()
    fingerprint, todo = _python_file(Path(script).resolve(), root.name, ())
    digest = hashlib.sha256(fingerprint.encode())
    parts: dict[str, str] = {}
    todo = set(todo) | {"__init__"}
    while todo:
        part = todo.pop()
        if part not in parts:
            parts[part], imports = _part(root, part)
            todo |= imports
    for part in sorted(parts):
        if parts[part]:
            digest.update(f"\0{part}\0{parts[part]}".encode())
    return digest.hexdigest()


def _python_file(path: Path, package: str, module: tuple[str, ...]) -> tuple[str, frozenset[str]]:
    """A Python file's syntax tree (as text) and the top-level parts of `package` it imports,
    absolute or relative; `module` is its dotted path inside the package (() outside it; an
    __init__ keeps its name, so that `from . import x` resolves against its own package)."""
    stat = path.stat()
    return _parsed(path, stat.st_mtime_ns, stat.st_size, package, module)


@cache  # keyed by the file's time and size too: a file edited meanwhile is read again
def _parsed(path: Path, _mtime: int, _size: int, package: str, module: tuple[str, ...]
            ) -> tuple[str, frozenset[str]]:
    tree = ast.parse(path.read_text())
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(module[:len(module) - node.level])
                names = [[package, *base, *(node.module.split(".") if node.module else [alias.name])]
                         for alias in node.names]
            else:
                head = (node.module or "").split(".")
                names = [head + [alias.name] for alias in node.names] if head == [package] else [head]
        else:
            continue
        parts.update(name[1] for name in names if len(name) >= 2 and name[0] == package)
    return ast.dump(tree), frozenset(parts)


def _part_files(root: Path, part: str) -> tuple[Path, ...]:
    if (root / f"{part}.py").is_file():
        return (root / f"{part}.py",)
    if (root / part).is_dir():
        return tuple(sorted(p for p in (root / part).rglob("*")
                            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"))
    return ()


def _part(root: Path, part: str) -> tuple[str, frozenset[str]]:
    """A part's digest ("" when the package has no such part) and the parts it imports."""
    files = _part_files(root, part)
    if not files:
        return "", frozenset()
    digest = hashlib.sha256()
    imports: set[str] = set()
    for path in files:
        digest.update(f"\0{path.relative_to(root).as_posix()}\0".encode())
        if path.suffix == ".py":
            fingerprint, found = _python_file(path, root.name, path.relative_to(root).with_suffix("").parts)
            digest.update(fingerprint.encode())
            imports |= found
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest(), frozenset(imports)


@lru_cache(maxsize=1)
def software_versions() -> str:
    """The versions of the science libraries this environment runs, as one line."""
    return " ".join(f"{name}={version}" for name, version in environment_versions().items()
                    if name in SCIENCE_PACKAGES)
