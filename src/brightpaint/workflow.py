"""What the Snakefile needs to know about a screen when it is parsed: plates, their files, roles.

The screen is read from its sheet and validated at once, so a duplicated plate id or a missing
manifest stops the run before any job. Every screen is read the same way, the demo's included (its
generator writes it first: `brightpaint simulate --config config/demo.yaml`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

from .defaults import DEFAULT_CONFIG
from .errors import UserError
from .groups import group_wells, screen_groups, untrainable_reason
from .io import InputError, control_label_problem, name_problem, read_platemap, read_screen_sheet
from .layout import plate_folder_problem
from .provenance import (
    CELLPROFILER_PACKAGES,
    cellprofiler_site_packages,
    code_digest,
    environment_versions,
    sha256_file,
    software_versions,
)
from .segment.settings import SegmentError


class ConfigError(UserError):
    """A config setting cannot be used; the message names the key."""


# The workflow's own files, beside the package (an editable install: src/brightpaint -> repo root).
WORKFLOW_ROOT = DEFAULT_CONFIG.parents[1]
CONFIG_SCHEMA = WORKFLOW_ROOT / "workflow" / "schemas" / "config.schema.yaml"


def read_config_file(path: str | Path) -> dict:
    """A YAML config file as a mapping, or a ConfigError naming the file and what is wrong."""
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"config {path}: cannot be read ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config {path}: not valid YAML{where}: {problem}") from err
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigError(f"config {path}: a YAML mapping (key: value lines) expected, found a "
                          f"{type(config).__name__}")
    return config


def merged_config(defaults: Mapping, override: Mapping) -> dict:
    """`override` on top of `defaults`, mappings merged key by key (what Snakemake does with
    --configfile over the Snakefile's configfile)."""
    out = dict(defaults)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged_config(out[key], value)
        else:
            out[key] = value
    return out


def check_config(config: Mapping, schema: str | Path = CONFIG_SCHEMA, source: str = "the config"
                 ) -> None:
    """The config against the workflow's schema and the channel rules; a ConfigError listing every
    problem, each with its key (`ingest.on_missing: 'x' is not one of ...`). The Snakefile and
    `brightpaint validate` both call this."""
    schema_doc = yaml.safe_load(Path(schema).read_text())
    validator = jsonschema.Draft202012Validator(schema_doc)
    problems = []
    for error in sorted(validator.iter_errors(dict(config)), key=lambda e: list(map(str, e.path))):
        key = ".".join(str(part) for part in error.path) or "(top level)"
        problems.append(f"{key}: {error.message}")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {source}:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    try:
        check_channels(config["channels"])
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    labels = (config.get("platemap") or {}).get("control_types")
    if labels and (problem := control_label_problem(labels)):
        raise ConfigError(f"{source}: {problem}")


def check_channels(channels: object) -> None:
    """Config `channels:`: a mapping whose names are valid names (they name files), with nuclei and
    cell among the fluorescence channels, brightfield not among them, and no channel twice."""
    if not isinstance(channels, Mapping):
        raise ConfigError(f"channels: a mapping (brightfield, nuclei, cell, fluorescence) expected, "
                          f"found {type(channels).__name__} {channels!r:.80}")
    missing = [k for k in ("brightfield", "nuclei", "cell", "fluorescence") if k not in channels]
    if missing:
        raise ConfigError(f"channels: missing key(s) {missing}")
    fluorescence = channels["fluorescence"]
    if not isinstance(fluorescence, list):
        raise ConfigError(f"channels.fluorescence: a list of channel names expected, found "
                          f"{fluorescence!r:.80}")
    problems = [name_problem(channels[key], f"channels.{key}")
                for key in ("brightfield", "nuclei", "cell")]
    problems += [name_problem(name, "channels.fluorescence entry") for name in fluorescence]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))
    twice = sorted({name for name in fluorescence if fluorescence.count(name) > 1})
    if twice:
        raise ConfigError(f"channels.fluorescence lists {twice} more than once")
    for role in ("nuclei", "cell"):
        if channels[role] not in fluorescence:
            raise ConfigError(f"channels.{role} = {channels[role]!r} must be one of "
                              f"channels.fluorescence {fluorescence}")
    if channels["brightfield"] in fluorescence:
        raise ConfigError(f"channels.brightfield {channels['brightfield']!r} is also listed "
                          "in channels.fluorescence")


@dataclass
class Screen:
    sheet: str
    table: pd.DataFrame
    brightfield: str = "BF"
    fluorescence: list[str] = field(default_factory=list)
    selection: list[str] = field(default_factory=list)
    denoise_selection: list[str] = field(default_factory=list)
    denoise_enabled: bool = False
    stain: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict) -> Screen:
        channels = config.get("channels")
        check_channels(channels)
        sheet = config["screen"]
        if not Path(sheet).is_file():
            raise ConfigError(f"screen sheet {sheet!r} (config `screen`) not found in {Path.cwd()}")
        table = read_screen_sheet(sheet)
        if not os.path.isabs(sheet):
            # a sheet given relative to the working directory keeps its files relative too: a moved
            # or copied run folder then reads the same inputs and params, and reruns nothing
            for column in ("manifest", "platemap"):
                table[column] = [os.path.relpath(path) for path in table[column]]
        screen = cls(sheet=sheet, table=table,
                     brightfield=channels["brightfield"], fluorescence=list(channels["fluorescence"]),
                     selection=list(config.get("plates") or []),
                     denoise_selection=list((config.get("denoise") or {}).get("channels") or []),
                     denoise_enabled=bool((config.get("denoise") or {}).get("enabled", False)),
                     stain=dict(config.get("stain") or {}))
        unknown_channels = sorted(set(screen.denoise_selection) - set(screen.fluorescence))
        if unknown_channels:
            raise ConfigError(f"denoise.channels {unknown_channels} are not in channels.fluorescence "
                              f"{screen.fluorescence}")
        unknown_targets = sorted(set(screen.stain.get("targets") or []) - set(screen.fluorescence))
        if unknown_targets:
            raise ConfigError(f"stain.targets {unknown_targets} are not in channels.fluorescence "
                              f"{screen.fluorescence}")
        unknown = sorted(set(screen.selection) - set(screen.plate_ids()))
        if unknown:
            raise ConfigError(f"config `plates` names plate(s) {unknown} that the screen sheet "
                              f"{sheet} lacks; it has {screen.plate_ids()}")
        return screen

    def plate_ids(self) -> list[str]:
        return list(self.table["plate"])

    def selected_plates(self) -> list[str]:
        return [p for p in self.plate_ids() if not self.selection or p in self.selection]

    def plate_row(self, plate: str) -> dict:
        return self.table.set_index("plate").loc[plate].to_dict() | {"plate": plate}

    def plate_inputs(self, plate: str) -> list[str]:
        row = self.plate_row(plate)
        # Not the sheet itself: adding a plate to it must not rerun the others. A change to this
        # plate's row reaches its jobs through their params (rule validate_plate, profiles, report).
        return [row["manifest"], row["platemap"]]

    @property
    def sheet_folder(self) -> str:
        """The sheet's folder as configured (relative stays relative, so a moved or copied results
        folder does not look like a changed setting)."""
        return os.path.dirname(self.sheet) or "."

    def plate_channels(self, plate: str) -> list[str]:
        """Channels a plate carries by its role: brightfield always, fluorescence on train/both."""
        fluorescence = self.fluorescence if self.plate_row(plate)["role"] in ("train", "both") else []
        return [self.brightfield, *fluorescence]

    def denoise_channels(self, plate: str) -> list[str]:
        """Fluorescence channels of this plate that config `denoise.channels` selects (empty: all);
        none when `denoise.enabled` is false."""
        if not self.denoise_enabled:
            return []
        wanted = self.denoise_selection or self.fluorescence
        return [c for c in self.plate_channels(plate) if c in wanted and c != self.brightfield]

    def plates_with_channel(self, channel: str) -> list[str]:
        """Every plate of the sheet with this channel, selected or not (screen-level models)."""
        return [p for p in self.plate_ids() if channel in self.plate_channels(p)]

    def has_real_stains(self, plate: str) -> bool:
        return self.plate_row(plate)["role"] in ("train", "both")

    def stain_targets(self) -> list[str]:
        """Fluorescence channels that virtual staining predicts (config stain.targets; empty: all)."""
        return list(self.stain.get("targets") or self.fluorescence)

    def feature_channels(self, sources: Sequence[str]) -> list[str]:
        """The channels the feature pipeline measures: one pipeline serves every source, so with
        virtual stains among `sources` the channels virtual staining predicts, else every
        fluorescence channel."""
        return self.stain_targets() if "virtual" in sources else list(self.fluorescence)

    def stain_models(self) -> dict[str, list[str]]:
        """Model name -> its target channels: one model `all` for every target, or with
        stain.per_channel one model per target, named by the channel."""
        targets = self.stain_targets()
        if self.stain.get("per_channel"):
            return {channel: [channel] for channel in targets}
        return {"all": targets}

    def generalisation_groups(self, settings: dict, training_plates: list[str],
                              control_labels: dict | None = None
                              ) -> tuple[dict[str, dict], dict[str, str]]:
        """(groups, skipped) of the generalisation matrix (config `generalisation`): groups are name ->
        Group fields, every cell type among the training plates (with `cell_types`) x every
        phenotype group; skipped are name -> why it gets no model. A group whose wells (by the
        training plates' plate maps) no plate can split into training and validation wells is
        skipped; when fewer than two groups are left there is no matrix and all are skipped. No
        groups and nothing skipped when the matrix is off, or when the training plates give fewer
        than two groups and no phenotype groups were asked for (a matrix of one cell is no matrix).
        A phenotype query the plate maps cannot answer is a ConfigError naming their columns."""
        if not settings.get("enabled"):
            return {}, {}
        types = (sorted({str(self.plate_row(p)["cell_type"]) for p in training_plates})
                 if settings.get("cell_types") else [])
        phenotypes = settings.get("phenotypes") or {}
        if len(types) < 2 and not phenotypes:
            return {}, {}
        try:
            groups = screen_groups(types, phenotypes)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        try:
            plates = {p: (str(self.plate_row(p)["cell_type"]), read_platemap(self.plate_row(p)["platemap"],
                                                                          control_labels))
                      for p in training_plates}
        except InputError:
            # the plate's validation job stops the run and names every problem of its plate map
            return {g.name: asdict(g) for g in groups}, {}
        try:
            skipped = {g.name: reason for g in groups
                       if (reason := untrainable_reason(g, group_wells(g, plates)))}
        except ValueError as err:
            raise ConfigError(f"generalisation.phenotypes: {err}") from err
        kept = [g for g in groups if g.name not in skipped]
        if len(kept) < 2:
            names = [g.name for g in kept]
            skipped.update({name: f"group {name}: the only group left that can be trained: no matrix of "
                                  f"one group" for name in names})
            return {}, skipped
        return {g.name: asdict(g) for g in kept}, skipped

    def stain_training_plates(self) -> list[str]:
        """Plates that train virtual staining: role train or both, of the cell types in
        stain.train_cell_types (empty: all). Independent of config `plates`, so that rerunning one
        plate uses the same model as the whole screen."""
        cell_types = set(self.stain.get("train_cell_types") or [])
        plates = [p for p in self.plate_ids() if self.has_real_stains(p)
                  and (not cell_types or self.plate_row(p)["cell_type"] in cell_types)]
        if not plates and not self.stain.get("weights"):
            raise ConfigError("virtual staining: no plate of the screen has role train or both"
                              + (f" and a cell type in stain.train_cell_types {sorted(cell_types)}"
                                 if cell_types else "")
                              + "; add one, or give a model file in stain.weights")
        return plates


def segment_weights_path(weights: str, results: str, basedir: str | Path) -> str:
    """Where a configured Cellpose weight file is. A path under `results` is made by rule
    segment_train and is kept as it is; another relative path is looked up in the working directory,
    then in the workflow's folder (the shipped resources/cellpose/); a Cellpose model name (`cyto3`,
    `nuclei`, ...) only in Cellpose's own model folder: brightpaint never downloads weights, and a
    missing file stops the run here, before any job."""
    text = str(weights).strip()
    path = Path(text)
    results_dir = Path(results)
    if not path.is_absolute() and (path.parts[:len(results_dir.parts)] == results_dir.parts):
        return text
    if path.is_file():
        return text
    if not path.is_absolute() and (Path(basedir) / path).is_file():
        return str(Path(basedir) / path)
    # torch stands behind the weight files' checks: imported only for a weight given by name
    from .segment.weights import resolve_weights

    try:
        return str(resolve_weights(text))
    except SegmentError as err:
        raise ConfigError(f"segment: {err}") from err


def workflow_file(path: str, basedir: str | Path, what: str) -> str:
    """A file the config names (a CellProfiler pipeline, an executable): as given when absolute or
    present in the working directory, else in the workflow's folder (the shipped resources/, the
    environments `make` builds); missing everywhere stops the run before any job, naming the setting."""
    candidate = Path(str(path).strip())
    if candidate.is_file():
        return str(candidate)
    if not candidate.is_absolute() and (Path(basedir) / candidate).is_file():
        return str(Path(basedir) / candidate)
    raise ConfigError(f"{what} = {str(path)!r}: no such file in {Path.cwd()} or {basedir}")


# Rerunning by content. Snakemake records each job's params and compares them on the next plan (its
# `params` rerun trigger); the project's profiles turn off its `code` trigger, which compares a
# script's file time and so reran a finished screen after any fresh clone or copy of the workflow
# (docs/scale-out.md, "What reruns what").
def code_params(script: str | Path) -> dict[str, str]:
    """A workflow job's code and software as params: the digest of its script and of the package
    code that script imports (provenance.code_digest), and the science libraries' versions."""
    return {"code": code_digest(script), "software": software_versions()}


def located_files(files: Mapping[str, str | Path]) -> tuple[dict[str, str], dict[str, object]]:
    """A job's files that may lie outside the run folder (weights, pipelines, executables), as
    (inputs, params). Every file is a params entry holding a `Path`, which Snakemake does not record,
    so scripts read `params.<name>` wherever the file lies. A relative path (the run folder's, e.g. a
    model rule segment_train makes) is also an input: Snakemake orders the jobs and compares its time.
    An absolute path (the workflow's shipped resources/, a user's file) is no input: its folder and
    its time change with every clone of the workflow; its sha256 is a recorded param instead, so the
    file's content decides."""
    inputs: dict[str, str] = {}
    params: dict[str, object] = {}
    for name, path in files.items():
        params[name] = Path(path)
        if Path(path).is_absolute():
            params[f"{name}_sha256"] = _file_digest(str(path))
        else:
            inputs[name] = str(path)
    return inputs, params


def cellprofiler_params(cellprofiler: str | Path) -> dict[str, object]:
    """The CellProfiler executable as params: its path (a `Path`, not recorded: it moves with the
    workflow's folder) and the versions of its environment's packages (recorded)."""
    site_packages = cellprofiler_site_packages(cellprofiler)
    versions = environment_versions(site_packages, CELLPROFILER_PACKAGES) if site_packages else {}
    return {"cellprofiler": Path(cellprofiler),
            "cellprofiler_software": " ".join(f"{k}={v}" for k, v in versions.items())}


@cache  # a weight file serves several rules: read once per workflow parse
def _file_digest(path: str) -> str:
    return sha256_file(path)


def check_plate_folders(results: str, plates: Sequence[str], channels: Mapping,
                        shards: Sequence[int]) -> None:
    """Every plate's output paths, resolved, inside its own folder (layout.plate_folder_problem); a
    ConfigError naming each plate that would write elsewhere."""
    names = [channels["brightfield"], *channels["fluorescence"]]
    problems = [p for p in (plate_folder_problem(results, plate, names, shards) for plate in plates) if p]
    if problems:
        raise ConfigError("outputs outside their plate's folder:\n  " + "\n  ".join(problems))
