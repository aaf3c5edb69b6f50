"""The results folder of a plate, described once.

`PlateFolder(root)` names every file and store of a plate's results folder (`results/plates/<plate>`).
The workflow's rules build their inputs and outputs from it, the scripts and the report read the
paths their job was given, and nothing else spells a plate file's name: a file renamed here moves for
the rules, the scripts and the report together. Built on the root `results/plates/{plate}` (and
shard `{shard}`, channel `{channel}`) its paths are the rules' wildcard patterns; on a concrete plate,
that plate's paths. `ProfileFolder` is the part a plate folder shares with the screen's folder
(`results/screen`): profiles and matching tables.

What the stages read of a plate comes in two bundles, each built by the registry for a rule's named
inputs and rebuilt by its script from `snakemake.input`, so that a script opens exactly what its job
lists (the DAG is right by construction, not by keeping two lists in step):

* `PlateSources`: what plate access (`brightpaint.plate.open_plate_source`) reads: the store, layout,
  focus table, illumination functions by channel and, optionally, the denoised store;
* `PlateResults`: what a plate's audit report (`brightpaint.report.plate_report`) reads.

Scripts that read several plates get each plate's `PlateSources` as params (the registry's paths)
and check them against their job's inputs (`require_inputs`): a path opened but not listed is an
error naming it, not a silently stale result.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

PROFILE_LEVELS = ("wells", "normalised", "selected", "consensus")
MATCH_TABLES = ("summary", "neighbours", "agreement")
ILLUM_FOLDER = "illum"
ILLUM_FUNCTION = ".npy"
ILLUM_FIGURE = ".png"
ILLUM_META = ".json"  # illumination.load_illumination reads it beside the function


class LayoutError(ValueError):
    """A path does not fit the plate folder's layout, or a script would open a file its job does not
    list as an input."""


def _join(root: str, relative: str) -> str:
    # plain string joining (not pathlib): the paths stay exactly what the rules have always written,
    # wildcards and all; an empty root gives the path relative to the folder
    return f"{root}/{relative}" if root else relative


@dataclass(frozen=True)
class ProfileFolder:
    """A folder of profiles and matching tables: a plate's results folder, or the screen's."""

    root: str

    def __post_init__(self):
        # a Path (tests, benchmarks) or a string: the same folder, compared and joined as a string
        object.__setattr__(self, "root", str(self.root))

    @classmethod
    def screen(cls, results: str) -> ProfileFolder:
        """The screen's folder of `results`: profiles and matching of every plate together."""
        return cls(f"{results}/screen")

    def path(self, relative: str) -> str:
        return _join(self.root, relative)

    def profile(self, level: str) -> str:
        """Profiles of one pycytominer level (`PROFILE_LEVELS`)."""
        return self.path(f"profiles/{level}.parquet")

    @property
    def profiles(self) -> dict[str, str]:
        return {level: self.profile(level) for level in PROFILE_LEVELS}

    def match(self, table: str) -> str:
        """A matching table (`MATCH_TABLES`)."""
        return self.path(f"match/{table}.parquet")

    @property
    def matches(self) -> dict[str, str]:
        return {table: self.match(table) for table in MATCH_TABLES}


@dataclass(frozen=True)
class PlateFolder(ProfileFolder):
    """Every file and store of a plate's results folder (see the module's docstring). Shard files
    take the shard (a number, or "{shard}" for the pattern), channel files the channel."""

    @classmethod
    def of(cls, results: str, plate: str) -> PlateFolder:
        """The folder of `plate` (or of the wildcard "{plate}") under the results folder."""
        return cls(f"{results}/plates/{plate}")

    # ingest: validation, per-shard stores and QC, the assembled OME-Zarr HCS store
    @property
    def store(self) -> str:
        return self.path("images.zarr")

    @property
    def images(self) -> str:
        """The images validation accepted (one row per file: well, site, channel, z)."""
        return self.path("ingest/images.parquet")

    @property
    def layout(self) -> str:
        return self.path("ingest/layout.json")

    @property
    def validation_flags(self) -> str:
        return self.path("ingest/validation_flags.csv")

    @property
    def qc_images(self) -> str:
        return self.path("ingest/qc_images.parquet")

    @property
    def qc_sites(self) -> str:
        return self.path("ingest/qc_sites.csv")

    def ingest_shard(self, shard: int | str) -> str:
        return self.path(f"ingest/shards/{shard}.zarr")

    def ingest_shard_qc(self, shard: int | str) -> str:
        return self.path(f"ingest/shards/{shard}_qc.parquet")

    # illumination: one function (and its figure) per channel
    def illum(self, channel: str) -> str:
        return self.path(f"{ILLUM_FOLDER}/{channel}{ILLUM_FUNCTION}")

    def illum_figure(self, channel: str) -> str:
        return self.path(f"{ILLUM_FOLDER}/{channel}{ILLUM_FIGURE}")

    def illum_meta(self, channel: str) -> str:
        """How the function was made: method, images used and excluded, fallback to the identity."""
        return self.path(f"{ILLUM_FOLDER}/{channel}{ILLUM_META}")

    @staticmethod
    def illum_channel(path: str | Path) -> str:
        """The channel of an illumination function or figure (the inverse of `illum` and
        `illum_figure`): scripts map the files their job lists to channels by it."""
        path = Path(path)
        suffix = next((s for s in (ILLUM_FUNCTION, ILLUM_FIGURE, ILLUM_META) if path.name.endswith(s)), None)
        if path.parent.name != ILLUM_FOLDER or suffix is None or path.name == suffix:
            raise LayoutError(f"{path}: not an illumination file ({ILLUM_FOLDER}/<channel>{ILLUM_FUNCTION}, "
                              f"{ILLUM_FIGURE} or {ILLUM_META})")
        return path.name.removesuffix(suffix)

    # focus
    @property
    def focus(self) -> str:
        return self.path("focus.parquet")

    @property
    def focus_figure(self) -> str:
        return self.path("focus.png")

    def focus_shard(self, shard: int | str) -> str:
        return self.path(f"focus/shards/{shard}.parquet")

    # denoising: a plate's own Noise2Void models, per-shard stores, the assembled denoised store
    def n2v_model(self, channel: str) -> str:
        return self.path(f"denoise/{channel}.n2v.pt")

    def denoise_shard(self, shard: int | str) -> str:
        return self.path(f"denoise/shards/{shard}.zarr")

    @property
    def denoise_assessment(self) -> str:
        """Per stain: does Noise2Void help this plate (estimated gain, decision)?"""
        return self.path("denoise/assessment.json")

    @property
    def denoised(self) -> str:
        return self.path("denoised.zarr")

    # virtual staining
    @property
    def virtual(self) -> str:
        return self.path("virtual.zarr")

    def stain_shard(self, shard: int | str) -> str:
        return self.path(f"stain/shards/{shard}.zarr")

    def stain_shard_sites(self, shard: int | str) -> str:
        return self.path(f"stain/shards/{shard}.csv")

    @property
    def stain_sites(self) -> str:
        return self.path("stain/sites.csv")

    @property
    def stain_metrics(self) -> str:
        return self.path("stain/metrics.parquet")

    @property
    def stain_uncertainty(self) -> str:
        return self.path("stain/uncertainty.csv")

    @property
    def stain_examples(self) -> str:
        return self.path("stain/examples.png")

    # segmentation
    @property
    def labels(self) -> str:
        return self.path("labels.zarr")

    def segment_shard(self, shard: int | str) -> str:
        return self.path(f"segment/shards/{shard}.zarr")

    def segment_shard_sites(self, shard: int | str) -> str:
        return self.path(f"segment/shards/{shard}.csv")

    @property
    def segment_sites(self) -> str:
        return self.path("segment/sites.csv")

    @property
    def segment_diameters(self) -> str:
        return self.path("segment/diameters.json")

    @property
    def segment_metrics(self) -> str:
        return self.path("segment/metrics.parquet")

    @property
    def segment_overlay(self) -> str:
        return self.path("segment/overlay.png")

    # features
    def features_shard_cells(self, shard: int | str) -> str:
        return self.path(f"features/shards/{shard}.parquet")

    def features_shard_images(self, shard: int | str) -> str:
        return self.path(f"features/shards/{shard}.images.parquet")

    def features_shard_sites(self, shard: int | str) -> str:
        return self.path(f"features/shards/{shard}.csv")

    @property
    def features_cells(self) -> str:
        return self.path("features/cells.parquet")

    @property
    def features_images(self) -> str:
        return self.path("features/images.parquet")

    @property
    def features_sites(self) -> str:
        return self.path("features/sites.csv")

    # the audit report
    @property
    def report_html(self) -> str:
        return self.path("report.html")

    @property
    def report_json(self) -> str:
        return self.path("report.json")

    # bundles of what stages read
    def sources(self, channels: Iterable[str], *, denoised: bool = False) -> PlateSources:
        """What plate access reads of this plate: illumination functions of `channels` and, with
        `denoised`, the denoised store."""
        return PlateSources(store=self.store, layout=self.layout, focus=self.focus,
                            illumination={c: self.illum(c) for c in channels},
                            denoised=self.denoised if denoised else None)

    def sources_on_disk(self) -> PlateSources:
        """What plate access reads of a finished folder (tests, benchmarks, notebooks; never a
        workflow script, whose job lists its files): the illumination functions of the layout's
        channels that exist, and the denoised store when there is one."""
        channels = _layout_channels(self)
        return self.sources([c for c in channels if Path(self.illum(c)).is_file()],
                            denoised=Path(self.denoised).is_dir())

    def results(self, channels: Iterable[str], *, denoise_models: Iterable[str] = (),
                denoised_sources: PlateSources | None = None, real_stains: bool = True) -> PlateResults:
        """What the plate's report reads: the figures of `channels`' illumination functions, the
        plate's Noise2Void models, its sources with the denoised store (before / after crops), and
        the level-1 evaluation of virtual staining where the plate has real stains."""
        stain = dict(stain_metrics=self.stain_metrics, stain_uncertainty=self.stain_uncertainty,
                     stain_examples=self.stain_examples) if real_stains else {}
        return PlateResults(
            qc_sites=self.qc_sites, qc_images=self.qc_images, focus=self.focus,
            focus_figure=self.focus_figure, illum_figures={c: self.illum_figure(c) for c in channels},
            illum_meta={c: self.illum_meta(c) for c in channels},
            denoise_models=tuple(denoise_models),
            denoised_sources=denoised_sources, stain_sites=self.stain_sites, **stain,
            segment_sites=self.segment_sites, segment_metrics=self.segment_metrics,
            segment_overlay=self.segment_overlay, features_sites=self.features_sites,
            profiles_selected=self.profile("selected"), match_summary=self.match("summary"),
            match_neighbours=self.match("neighbours"), match_agreement=self.match("agreement"))

    def results_on_disk(self) -> PlateResults:
        """What the report would read of a finished folder: the files of `results` that exist
        (tests and benchmarks; the workflow's report reads what its job lists)."""
        channels = _layout_channels(self)
        denoised = self.sources_on_disk() if Path(self.denoised).is_dir() else None
        return self.results(channels, denoise_models=[self.n2v_model(c) for c in channels],
                            denoised_sources=denoised).existing()


def every_path(folder: PlateFolder, channels: Iterable[str], shards: Iterable[int]) -> list[str]:
    """Every path the registry names for a plate: its files and stores, per channel and per shard."""
    channels, shards = list(channels), list(shards)
    paths: list[str] = []
    for cls in (ProfileFolder, PlateFolder):
        for name, attr in vars(cls).items():
            if isinstance(attr, property):
                value = getattr(folder, name)
                paths += list(value.values()) if isinstance(value, dict) else [value]
            elif callable(attr) and not name.startswith("_"):
                parameters = list(inspect.signature(attr).parameters)
                if parameters[:1] == ["self"] and parameters[1:] in (["channel"], ["shard"]):
                    values = channels if parameters[1] == "channel" else shards
                    paths += [getattr(folder, name)(value) for value in values]
    return paths


def plate_folder_problem(results: str, plate: str, channels: Iterable[str], shards: Iterable[int]) -> str:
    """Why a plate's results would not stay in its own folder ("" when they do): the folder must be
    a folder of `<results>/plates` (no `..`), and every path the registry names for it, resolved
    (`..` and links followed), must lie inside it. Ids and channel names that keep to the name
    rule (io.name_problem) always pass; this is the check where the paths are made."""
    folder = PlateFolder.of(results, plate)
    plates = os.path.normpath(f"{results}/plates")
    if os.path.dirname(os.path.normpath(folder.root)) != plates:
        return f"plate {plate!r}: its results folder {folder.root} is not a folder of {plates}"
    root = os.path.realpath(folder.root)  # a plate folder may be a link (e.g. to another disk)
    outside = [path for path in every_path(folder, channels, shards)
               if os.path.commonpath([root, os.path.realpath(path)]) != root]
    if outside:
        return f"plate {plate!r}: {len(outside)} output path(s) leave its folder {root}, e.g. {outside[0]}"
    return ""


def _layout_channels(folder: PlateFolder) -> list[str]:
    """The channels of a finished folder's layout (none without one)."""
    # read here, not through brightpaint.ingest: the registry stays free of the stages it describes
    path = Path(folder.layout)
    return list(json.loads(path.read_text())["channels"]) if path.is_file() else []


def _optional(inputs, name: str) -> str | None:
    value = inputs.get(name)
    return str(value) if value else None


@dataclass(frozen=True)
class PlateSources:
    """What plate access reads of a plate: its store, layout, focus table, illumination functions
    (channel -> .npy) and, optionally, its denoised store."""

    store: str
    layout: str
    focus: str
    illumination: Mapping[str, str]
    denoised: str | None = None

    def paths(self) -> list[str]:
        """Every path, in the order the rules list them."""
        return [self.store, self.layout, self.focus, *self.illumination.values(),
                *([self.denoised] if self.denoised else [])]

    def named_inputs(self) -> dict[str, str | list[str]]:
        """A rule's named inputs (`store`, `layout`, `focus`, the `illum` list and, when there is
        one, `denoised`), which `from_input` reads back."""
        inputs = {"store": self.store, "layout": self.layout, "focus": self.focus,
                  "illum": list(self.illumination.values())}
        if self.denoised:
            inputs["denoised"] = self.denoised
        return inputs

    @classmethod
    def from_input(cls, inputs) -> PlateSources:
        """The sources a job lists as named inputs (`snakemake.input`, or a mapping), illumination
        functions mapped to channels by their names in the layout."""
        illumination = {PlateFolder.illum_channel(p): str(p) for p in inputs["illum"]}
        return cls(store=str(inputs["store"]), layout=str(inputs["layout"]), focus=str(inputs["focus"]),
                   illumination=illumination, denoised=_optional(inputs, "denoised"))

    def as_params(self) -> dict:
        """Plain values for a rule's params (a script rebuilds them with `from_params`)."""
        return {"store": self.store, "layout": self.layout, "focus": self.focus,
                "illumination": dict(self.illumination), "denoised": self.denoised}

    @classmethod
    def from_params(cls, params: Mapping) -> PlateSources:
        return cls(**{**params, "illumination": dict(params["illumination"])})

    def among(self, inputs: Iterable[str], job: str) -> PlateSources:
        """These sources, once every path is checked to be among a job's `inputs`."""
        require_inputs(self.paths(), inputs, job)
        return self


@dataclass(frozen=True)
class PlateResults:
    """The result files a plate's report reads; None (or empty) for those a plate does not have.
    Field names are the report rule's named inputs (`named_inputs`, `from_input`)."""

    qc_sites: str | None = None
    qc_images: str | None = None
    focus: str | None = None
    focus_figure: str | None = None
    illum_figures: Mapping[str, str] = field(default_factory=dict)
    illum_meta: Mapping[str, str] = field(default_factory=dict)
    denoise_models: Sequence[str] = ()
    denoised_sources: PlateSources | None = None
    stain_sites: str | None = None
    stain_metrics: str | None = None
    stain_uncertainty: str | None = None
    stain_examples: str | None = None
    segment_sites: str | None = None
    segment_metrics: str | None = None
    segment_overlay: str | None = None
    features_sites: str | None = None
    profiles_selected: str | None = None
    match_summary: str | None = None
    match_neighbours: str | None = None
    match_agreement: str | None = None

    def _files(self) -> dict[str, str]:
        collections = {"illum_figures", "illum_meta", "denoise_models", "denoised_sources"}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in collections and getattr(self, f.name)}

    def named_inputs(self) -> dict[str, str | list[str]]:
        """The report rule's named inputs: one per file, the `illum_figures` and `denoise_models`
        lists and, with a denoised store, the plate's sources (`PlateSources.named_inputs`; their
        `focus` is this `focus`)."""
        inputs: dict = {**self._files(), "illum_figures": list(self.illum_figures.values()),
                        "illum_meta": list(self.illum_meta.values()),
                        "denoise_models": list(self.denoise_models)}
        if self.denoised_sources is not None:
            sources = self.denoised_sources.named_inputs()
            if inputs.get("focus", sources["focus"]) != sources["focus"]:
                raise LayoutError(f"the report's focus table {inputs['focus']} is not its sources' "
                                  f"{sources['focus']}")
            inputs.update(sources)
        return inputs

    @classmethod
    def from_input(cls, inputs) -> PlateResults:
        """The results a report job lists as named inputs (`snakemake.input`, or a mapping)."""
        files = {f.name: _optional(inputs, f.name) for f in fields(cls)
                 if f.name not in ("illum_figures", "illum_meta", "denoise_models", "denoised_sources")}
        figures = {PlateFolder.illum_channel(p): str(p) for p in inputs.get("illum_figures") or []}
        meta = {PlateFolder.illum_channel(p): str(p) for p in inputs.get("illum_meta") or []}
        sources = PlateSources.from_input(inputs) if inputs.get("denoised") else None
        return cls(**files, illum_figures=figures, illum_meta=meta,
                   denoise_models=tuple(str(p) for p in inputs.get("denoise_models") or []),
                   denoised_sources=sources)

    def existing(self) -> PlateResults:
        """These results less the files that do not exist (for a finished folder)."""
        def exists(path: str | None) -> bool:
            return bool(path) and Path(path).exists()

        sources = self.denoised_sources
        return replace(
            self, **{name: path if exists(path) else None for name, path in self._files().items()},
            illum_figures={c: p for c, p in self.illum_figures.items() if exists(p)},
            illum_meta={c: p for c, p in self.illum_meta.items() if exists(p)},
            denoise_models=tuple(p for p in self.denoise_models if exists(p)),
            denoised_sources=sources if sources is not None and exists(sources.denoised) else None)


def require_inputs(paths: Iterable[str | Path], inputs: Iterable[str | Path], job: str) -> None:
    """Raise a LayoutError naming every path of `paths` that is not among `inputs` (a job's
    `snakemake.input`): a script that builds paths from the registry checks that its rule lists
    them, so a file it opens is never one the DAG does not know (read before it is made, or stale)."""
    listed = {os.path.normpath(str(p)) for p in inputs}
    missing = [str(p) for p in paths if os.path.normpath(str(p)) not in listed]
    if missing:
        raise LayoutError(f"{job}: would open {missing}, which its rule does not list as inputs; "
                          "list them in the rule's input function (workflow/rules/common.smk)")
