"""Fuzzing the input contract (issue 22): a small valid screen, mutated a thousand times (rows,
fields, delimiters, encodings, ids, channel names, image files and headers, config values), must
give a clear `UserError` naming a file or the config, or pass; never another exception, never a
read of a file outside the screen folder, and never a write outside the case's `results/` (a passing
case writes what rule validate_plate writes, at the paths the workflow gives them).

A seeded generator instead of Hypothesis: the same 1,000 cases on every run (a failure reruns as
it was), no shrinking time, no new dependency. A case that once failed goes to REGRESSIONS (its
mutations by name), so it is rerun by name whatever the generator later draws.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import REPO

from brightpaint.atomic import atomic_path
from brightpaint.errors import UserError
from brightpaint.ingest import plan_layout
from brightpaint.io import read_screen_sheet
from brightpaint.layout import PlateFolder
from brightpaint.validate import ImageLimits, validate_plate
from brightpaint.workflow import check_config, check_plate_folders, merged_config, read_config_file

CASES = 1000
SEED = 22
CHANNELS = {"brightfield": "BF", "nuclei": "DNA", "cell": "CYTO", "fluorescence": ["DNA", "CYTO"]}
WELLS, PLANES, SIZE = ("B02", "C03"), 2, 8
LIMITS = ImageLimits(max_image_pixels=4096, max_planes=16)
HOSTILE = ["", " ", ".", "..", "...", "-rf", "../../outside/secret.tif", "../outside/secret.tif",
           "/etc/passwd", "12345678901234567890", "-1", "1e400", "inf", "nan", "1.5", "0", "20000",
           "\x00", "é", "A01", "Z99", "x" * 300, '"', "P1", "BF", "DNA", "trt", "negcon", "a,b",
           "a\tb", "images", "images/", "${HOME}", "$(touch pwned)", "; rm -rf /", "\u202e"]

# Mutation lists of past failures, rerun first (kept as regression cases).
REGRESSIONS: list[list[str]] = []

# --- the screen -------------------------------------------------------------------------------


def write_screen(folder: Path) -> None:
    """One train plate: 2 wells x 1 site, brightfield 2 planes, 2 stains, 8 x 8 uint16 images; and a
    valid TIFF outside the screen folder that no case may read."""
    images = folder / "P1" / "images"
    images.mkdir(parents=True)
    rows = ["plate,well,site,channel,z,path"]
    rng = np.random.default_rng(0)
    for well in WELLS:
        for channel, planes in (("BF", PLANES), ("DNA", 1), ("CYTO", 1)):
            for z in range(planes):
                name = f"{well}_{channel}_z{z}.tif"
                tifffile.imwrite(images / name, rng.integers(0, 4000, (SIZE, SIZE), dtype=np.uint16))
                rows.append(f"P1,{well},1,{channel},{z},images/{name}")
    (folder / "P1" / "manifest.csv").write_text("\n".join(rows) + "\n")
    (folder / "P1" / "platemap.csv").write_text(
        "well,perturbation,dose,control_type,moa,target\n"
        f"{WELLS[0]},DMSO,0,negcon,,\n{WELLS[1]},etoposide,1,trt,topoisomerase inhibitor,TOP2A\n")
    (folder / "plates.tsv").write_text("plate\tmanifest\tplatemap\tbatch\tcell_type\trole\n"
                                       "P1\tP1/manifest.csv\tP1/platemap.csv\tB1\tflat\ttrain\n")
    outside = folder.parent / "outside"
    outside.mkdir()
    tifffile.imwrite(outside / "secret.tif", np.ones((SIZE, SIZE), np.uint16))


TABLES = ("plates.tsv", "P1/manifest.csv", "P1/platemap.csv")


# --- mutations: each takes (rng, screen folder, config) and changes one thing ------------------


def _pick(rng, n: int) -> int:
    """An index below n (0 when n < 1: earlier mutations may have emptied a file)."""
    return int(rng.integers(max(n, 1)))


def _table(rng, screen: Path) -> Path:
    return screen / TABLES[rng.integers(len(TABLES))]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="surrogateescape").split("\n")


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")


def replace_field(rng, screen, config):
    path = _table(rng, screen)
    sep = "\t" if path.suffix == ".tsv" else ","
    lines = _lines(path)
    i = _pick(rng, len(lines) - 1)  # the header too
    fields = lines[i].split(sep)
    fields[_pick(rng, len(fields))] = HOSTILE[rng.integers(len(HOSTILE))]
    lines[i] = sep.join(fields)
    _write_lines(path, lines)


def trailing_delimiter(rng, screen, config):
    path = _table(rng, screen)
    sep = "\t" if path.suffix == ".tsv" else ","
    lines = _lines(path)
    _write_lines(path, [lines[0], *(line + sep if line else line for line in lines[1:])])


def insert_character(rng, screen, config):
    path = _table(rng, screen)
    text = path.read_bytes()
    at = int(rng.integers(len(text) + 1))
    char = [b",", b"\t", b"\n", b'"', b"\x00", b"\r", b" ", b"\xff", b"9"][rng.integers(9)]
    path.write_bytes(text[:at] + char + text[at:])


def delete_characters(rng, screen, config):
    path = _table(rng, screen)
    text = path.read_bytes()
    at = int(rng.integers(len(text) + 1))
    path.write_bytes(text[:at] + text[at + int(rng.integers(1, 20)):])


def shuffle_lines(rng, screen, config):
    path = _table(rng, screen)
    lines = _lines(path)
    kind = rng.integers(4)
    i = _pick(rng, len(lines))
    if kind == 0:
        lines.insert(i, lines[_pick(rng, len(lines))])  # a duplicated row (or header)
    elif kind == 1:
        del lines[i]
    elif kind == 2:
        lines.insert(i, "")  # a blank line
    else:
        lines = lines[:1]  # header only
    _write_lines(path, lines)


def encoding(rng, screen, config):
    path = _table(rng, screen)
    text = path.read_text(encoding="utf-8", errors="surrogateescape").replace("DMSO", "DMSÖ")
    codec = ["utf-16", "latin-1", "utf-8-sig", "cp1252"][rng.integers(4)]
    path.write_bytes(text.encode(codec, errors="replace"))


def random_bytes(rng, screen, config):
    path = _table(rng, screen)
    path.write_bytes(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes())


def _image(rng, screen: Path) -> Path:
    images = sorted((screen / "P1" / "images").iterdir())
    return images[rng.integers(len(images))]


def damage_image(rng, screen, config):
    path = _image(rng, screen)
    kind = rng.integers(9)
    if kind == 0:
        path.write_bytes(path.read_bytes()[: int(rng.integers(0, 200))])  # truncated / empty
    elif kind == 1:
        path.write_bytes(b"not a tiff" * int(rng.integers(1, 50)))
    elif kind == 2:
        path.unlink()
    elif kind == 3:  # a link out of the screen folder
        path.unlink()
        path.symlink_to(screen.parent / "outside" / "secret.tif")
    elif kind == 4:  # a header that claims a huge image
        with tifffile.TiffFile(path, mode="r+b") as tif:
            tif.pages.first.tags["ImageWidth"].overwrite(int(rng.choice([100_000, 2**31 - 1, 0])))
    elif kind == 5:
        tifffile.imwrite(path, np.zeros((2, SIZE, SIZE), np.uint16))  # a 3-D stack
    elif kind == 6:
        tifffile.imwrite(path, np.zeros((SIZE, SIZE, 3), np.uint8), photometric="rgb")
    elif kind == 7:
        tifffile.imwrite(path, np.zeros((SIZE, SIZE), [np.float64, np.int8, bool][rng.integers(3)]))
    else:
        tifffile.imwrite(path, np.zeros((SIZE + 1, SIZE), np.uint16))  # another shape


def path_out_of_the_folder(rng, screen, config):
    path = screen / "P1" / "manifest.csv"
    lines = _lines(path)
    i = 1 + _pick(rng, len(lines) - 2)
    if i >= len(lines):
        return
    target = ["../../outside/secret.tif", str(screen.parent / "outside" / "secret.tif"),
              "images/../../../outside/secret.tif"][rng.integers(3)]
    lines[i] = ",".join(lines[i].split(",")[:5] + [target])
    _write_lines(path, lines)


def config_value(rng, screen, config):
    key = ["brightfield", "nuclei", "cell", "fluorescence", "channels", "ingest"][rng.integers(6)]
    value = HOSTILE[rng.integers(len(HOSTILE))]
    if not isinstance(config["channels"], dict):  # an earlier mutation replaced it
        return
    if key == "fluorescence":
        config["channels"]["fluorescence"] = [*config["channels"]["fluorescence"], value]
    elif key == "channels":
        config["channels"] = [value, None, 3][rng.integers(3)]
    elif key == "ingest":
        config["ingest"] = {**config["ingest"], "max_planes": [value, -1, 0, 2**70][rng.integers(4)]}
    else:
        config["channels"][key] = value


MUTATIONS: dict[str, Callable] = {f.__name__: f for f in (
    replace_field, trailing_delimiter, insert_character, delete_characters, shuffle_lines, encoding,
    random_bytes, damage_image, path_out_of_the_folder, config_value)}


# --- the check --------------------------------------------------------------------------------

READS_OUTSIDE: list[str] = []
WRITES_OUTSIDE: list[str] = []
# while a case runs: the folder no read may reach, and the folder every write must stay in
WATCHED: list[Path] = []
WRITE_EVENTS = {"os.rename": 1, "os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "os.symlink": 1,
                "os.link": 1, "os.truncate": 0, "shutil.rmtree": 0}  # event -> index of the path written
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _written(path) -> None:
    real = os.path.realpath(os.fsdecode(path))
    # Python's own byte-code cache is no output of the workflow's
    if os.path.commonpath([real, str(WATCHED[1])]) != str(WATCHED[1]) and "__pycache__" not in real:
        WRITES_OUTSIDE.append(real)


def _audit(event: str, args: tuple) -> None:
    if not WATCHED:
        return
    if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        # every open() and os.open() of the process raises it: (path, mode or None, flags)
        real = os.path.realpath(os.fsdecode(args[0]))
        if real.startswith(str(WATCHED[0])):
            READS_OUTSIDE.append(real)
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (
                mode is None and isinstance(flags, int) and flags & WRITE_FLAGS):
            _written(args[0])
    elif event in WRITE_EVENTS and isinstance(args[WRITE_EVENTS[event]], str | bytes | os.PathLike):
        _written(args[WRITE_EVENTS[event]])


def run_case(screen: Path, config: dict) -> None:
    """What the workflow does with a screen before any pixel: the config, the sheet, each plate;
    for each plate that passes, what rule validate_plate writes, where the workflow puts it (in
    `results/` beside the screen folder)."""
    if config is not None:
        check_config(config)
    sheet = read_screen_sheet(screen / "plates.tsv")
    channels = (config or {}).get("channels") or CHANNELS
    results = str(screen.parent / "results")
    check_plate_folders(results, list(sheet["plate"]), channels, [0])
    for row in sheet.itertuples():
        images, flags = validate_plate(row.manifest, row.platemap, row.plate, row.role, CHANNELS,
                                       str(screen), "flag", limits=LIMITS)
        folder = PlateFolder.of(results, row.plate)
        Path(folder.layout).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder.validation_flags) as tmp:
            flags.to_csv(tmp, index=False)
        with atomic_path(folder.layout) as tmp:
            tmp.write_text(plan_layout(images, row.plate, CHANNELS).to_json())
        with atomic_path(folder.images) as tmp:
            images.to_parquet(tmp, index=False)


def one_case(base: Path, work: Path, config: dict, rng, names: list[str]) -> str | None:
    """Mutate a fresh copy of the screen by `names`; "passed" or "refused" when it passes or is
    refused well, else what went wrong."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(base, work, symlinks=True)
    case_config = None
    for name in names:
        if name == "config_value":
            case_config = case_config or merged_config(config, {"channels": dict(config["channels"])})
        MUTATIONS[name](rng, work, case_config)
    READS_OUTSIDE.clear()
    WRITES_OUTSIDE.clear()
    shutil.rmtree(work.parent / "results", ignore_errors=True)
    WATCHED[:] = [work.parent / "outside", (work.parent / "results").resolve()]
    try:
        run_case(work, case_config)
        outcome = "passed"
    except UserError as err:
        message = str(err)
        if str(work) not in message and "config" not in message:
            return f"refusal names no file: {message[:300]}"
        outcome = "refused"
    except Exception:
        return traceback.format_exc()
    finally:
        WATCHED.clear()
    if READS_OUTSIDE:
        return f"read outside the screen folder: {READS_OUTSIDE[:3]}"
    if WRITES_OUTSIDE:
        return f"wrote outside results/: {WRITES_OUTSIDE[:3]}"
    if outcome == "passed" and not list((work.parent / "results" / "plates").glob("*/ingest/images.parquet")):
        return "passed without writing the validated tables"
    return outcome


@pytest.fixture(scope="module")
def fuzz_folder(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("fuzz")
    base = folder / "base" / "screen"
    base.parent.mkdir()
    write_screen(base)
    # the outside file sits beside every work copy, as it sits beside the base screen
    (folder / "work").mkdir()
    shutil.copytree(base.parent / "outside", folder / "work" / "outside")
    config = merged_config(read_config_file(REPO / "config" / "config.yaml"),
                           {"screen": "plates.tsv", "channels": CHANNELS})
    return base, config


def test_the_unmutated_screen_is_valid(fuzz_folder, tmp_path):
    base, config = fuzz_folder
    run_case(base, config)


def test_fuzzed_screens_give_a_clear_error_and_touch_nothing_outside(fuzz_folder):
    base, config = fuzz_folder
    work = base.parent.parent / "work" / "screen"
    if _audit not in getattr(sys, "_brightpaint_audit", []):
        sys.addaudithook(_audit)  # audit hooks cannot be removed: it only acts while WATCHED is set
        sys._brightpaint_audit = [_audit]
    rng = np.random.default_rng(SEED)
    names = list(MUTATIONS)
    cases = [*REGRESSIONS, *([names[i] for i in rng.integers(len(names), size=rng.integers(1, 4))]
                             for _ in range(CASES))]
    failures, outcomes, start = [], {"passed": 0, "refused": 0}, time.perf_counter()
    for number, mutations in enumerate(cases):
        outcome = one_case(base, work, config, np.random.default_rng([SEED, number]), mutations)
        if outcome in outcomes:
            outcomes[outcome] += 1
        else:
            failures.append(f"case {number} {mutations}: {outcome}")
    seconds = time.perf_counter() - start
    print(f"{len(cases)} fuzz cases in {seconds:.1f} s: {outcomes}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures[:10])
    # a fuzzer whose every case is refused (or passes) exercises one path only
    assert min(outcomes.values()) >= CASES // 20, outcomes


def test_the_audit_sees_a_read_through_a_link_and_every_write_outside(fuzz_folder, tmp_path):
    """The check above would miss nothing: a read of the outside file through a link is seen, and
    so is each kind of write outside results/."""
    if _audit not in getattr(sys, "_brightpaint_audit", []):
        sys.addaudithook(_audit)
        sys._brightpaint_audit = [_audit]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.tif").write_bytes(b"x")
    (tmp_path / "link.tif").symlink_to(outside / "secret.tif")
    READS_OUTSIDE.clear()
    WRITES_OUTSIDE.clear()
    results = tmp_path / "results"
    (results / "plates").mkdir(parents=True)
    WATCHED[:] = [outside, results.resolve()]
    try:
        (tmp_path / "link.tif").read_bytes()
        # and the writes: inside results/ nothing is recorded, beside it every kind of write is
        with atomic_path(results / "plates" / "table.csv") as tmp:
            tmp.write_text("a\n1\n")
        (tmp_path / "beside.txt").write_text("x")
        os.close(os.open(tmp_path / "beside2.txt", os.O_WRONLY | os.O_CREAT))
        os.replace(results / "plates" / "table.csv", tmp_path / "moved.csv")
        (tmp_path / "made").mkdir()
    finally:
        WATCHED.clear()
    assert READS_OUTSIDE == [str((outside / "secret.tif").resolve())]
    assert WRITES_OUTSIDE == [str((tmp_path / name).resolve())
                              for name in ("beside.txt", "beside2.txt", "moved.csv", "made")]
