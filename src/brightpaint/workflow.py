"""What the Snakefile needs to know about a screen when it is parsed: plates, their files, roles.

The screen is read from its sheet and validated at once, so a duplicated plate id or a missing
manifest stops the run before any job. Every screen is read the same way, the demo's included (its
generator writes it first: `brightpaint simulate --config config/demo.yaml`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from .groups import screen_groups
from .io import read_screen_sheet
from .segment.settings import SegmentError


class ConfigError(ValueError):
    pass


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
        channels = config["channels"]
        for role in ("nuclei", "cell"):
            if channels[role] not in channels["fluorescence"]:
                raise ConfigError(f"channels.{role} = {channels[role]!r} must be one of "
                                  f"channels.fluorescence {channels['fluorescence']}")
        if channels["brightfield"] in channels["fluorescence"]:
            raise ConfigError(f"channels.brightfield {channels['brightfield']!r} is also listed "
                              "in channels.fluorescence")
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

    def stain_models(self) -> dict[str, list[str]]:
        """Model name -> its target channels: one model `all` for every target, or with
        stain.per_channel one model per target, named by the channel."""
        targets = self.stain_targets()
        if self.stain.get("per_channel"):
            return {channel: [channel] for channel in targets}
        return {"all": targets}

    def generalisation_groups(self, settings: dict, training_plates: list[str]) -> dict[str, dict]:
        """Groups of the generalisation matrix (config `generalisation`), name -> Group fields: every
        cell type among the training plates (with `cell_types`) x every phenotype group. Empty when
        it is off, or when the training plates give fewer than two groups and no phenotype groups
        were asked for (a matrix of one cell is no matrix)."""
        if not settings.get("enabled"):
            return {}
        types = (sorted({str(self.plate_row(p)["cell_type"]) for p in training_plates})
                 if settings.get("cell_types") else [])
        phenotypes = settings.get("phenotypes") or {}
        if len(types) < 2 and not phenotypes:
            return {}
        try:
            groups = screen_groups(types, phenotypes)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return {group.name: asdict(group) for group in groups}

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
