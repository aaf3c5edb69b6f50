"""glibc's allocator tunables (brightpaint.allocator): merged with the user's own, set for the jobs a
process starts, and taken by this machine's glibc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from brightpaint.allocator import ALLOCATOR_TUNABLES, allocator_tunables, use_allocator_tunables

LOADER = Path("/lib64/ld-linux-x86-64.so.2")


def parsed(value: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in value.split(":"))


def test_the_users_own_tunables_are_kept_and_win():
    assert parsed(allocator_tunables()) == ALLOCATOR_TUNABLES
    merged = parsed(allocator_tunables("glibc.malloc.mmap_threshold=4096:glibc.malloc.arena_max=2"))
    assert merged == {**ALLOCATOR_TUNABLES, "glibc.malloc.mmap_threshold": "4096",
                      "glibc.malloc.arena_max": "2"}
    assert allocator_tunables(allocator_tunables()) == allocator_tunables()  # set twice: once


def test_processes_started_afterwards_get_the_tunables_and_glibc_takes_them(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    value = use_allocator_tunables()
    assert os.environ["GLIBC_TUNABLES"] == value and parsed(value) == ALLOCATOR_TUNABLES
    listed = (subprocess.run([str(LOADER), "--list-tunables"], capture_output=True, text=True)
              if LOADER.exists() else None)
    if listed is None or listed.returncode != 0:
        pytest.skip("no glibc loader that lists its tunables (glibc >= 2.33 on x86-64)")
    values = {line.split(":")[0]: int(line.split(":")[1].split()[0], 16)
              for line in listed.stdout.splitlines() if line.startswith("glibc.malloc.")}
    for name, setting in ALLOCATOR_TUNABLES.items():
        assert values.get(name) == int(setting), name
