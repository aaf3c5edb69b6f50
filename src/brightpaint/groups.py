"""Groups of wells with real stains for the generalisation matrix (cell type x phenotype group).
Light on purpose: the Snakefile builds them when it is parsed."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
