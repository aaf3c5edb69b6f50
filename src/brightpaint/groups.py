"""Groups of wells with real stains for the generalisation matrix (cell type x phenotype group).
Light on purpose: the Snakefile builds them, and checks which can be trained, when it is parsed."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

GROUP_SEPARATOR = "__"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Group:
    name: str
    cell_type: str  # "" = every cell type
    phenotype: str  # "" = every well
    query: str  # plate-map query choosing the group's wells ("" = all)


def screen_groups(cell_types: Sequence[str], phenotypes: Mapping[str, str]) -> list[Group]:
    """Every cell type (or one group of all cell types when `cell_types` is empty) x every
    phenotype group ({name: plate-map query}; one group of all wells when empty)."""
    for name in [*cell_types, *phenotypes]:
        if not _NAME.match(str(name)) or GROUP_SEPARATOR in str(name):
            raise ValueError(f"generalisation: group name {name!r} must be letters, digits, '_', '-', '.' "
                             f"(no {GROUP_SEPARATOR!r})")
    types = list(dict.fromkeys(cell_types)) or [""]
    pheno = dict(phenotypes) or {"": ""}
    groups = [Group(GROUP_SEPARATOR.join(p for p in (t, ph) if p) or "all", t, ph, q)
              for t in types for ph, q in pheno.items()]
    if len(groups) < 2:
        raise ValueError("generalisation: needs at least two groups (several cell types among the "
                         "training plates, or phenotype groups)")
    return groups


def platemap_wells(platemap: pd.DataFrame, query: str) -> set[str]:
    """Wells of a plate map whose row satisfies `query` (a pandas query on its columns); every well
    when the query is empty. A query pandas cannot apply raises ValueError naming the columns."""
    if not query:
        return set(platemap["well"])
    try:
        return set(platemap.query(query)["well"])
    except Exception as err:  # pandas raises many kinds for a bad expression
        raise ValueError(f"cannot apply {query!r} to the plate map (columns {list(platemap.columns)}): "
                         f"{err}") from err


def group_wells(group: Group, plates: Mapping[str, tuple[str, pd.DataFrame]]) -> dict[str, list[str]]:
    """Per plate ({plate: (cell type, plate map)}), the wells of `group` by the plate maps."""
    wells = {}
    for plate, (cell_type, platemap) in plates.items():
        if group.cell_type and cell_type != group.cell_type:
            wells[plate] = []
            continue
        try:
            wells[plate] = sorted(platemap_wells(platemap, group.query))
        except ValueError as err:
            raise ValueError(f"group {group.name}, plate {plate}: {err}") from err
    return wells


def untrainable_reason(group: Group, wells: Mapping[str, Sequence[str]]) -> str:
    """Why no model of `group` can be trained on these wells ({plate: wells}), or "" if one can:
    training and validation wells are drawn plate by plate (stain.data.split_wells), so some plate
    must hold two of the group's wells, one to train on and one held out."""
    if any(len(found) >= 2 for found in wells.values()):
        return ""
    found = {plate: list(w) for plate, w in wells.items() if w}
    what = f"cell type {group.cell_type or 'any'}, wells {group.query or 'all'!r}"
    return (f"group {group.name} ({what}) has {'wells ' + str(found) if found else 'no wells'} on the "
            f"training plates: a model needs two of its wells on one plate, one to train on and one "
            f"held out")
