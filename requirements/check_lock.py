"""Fails when pyproject.toml asks for a package the lock does not pin, or pins outside the asked range:
the sign that `make lock` was not rerun after pyproject.toml changed. torch is installed outside the lock.

usage: check_lock.py PYPROJECT LOCK [EXTRA ...]"""
from __future__ import annotations

import re
import sys
import tomllib

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a venv without packaging still has pip's copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore[no-redef]

OUTSIDE_LOCK = {"torch"}


def main(pyproject: str, lock: str, *extras: str) -> int:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = list(project.get("dependencies", []))
    for extra in extras:
        wanted += project.get("optional-dependencies", {}).get(extra, [])
    pins: dict[str, str] = {}
    with open(lock, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
            if m:
                pins[canonicalize_name(m.group(1))] = m.group(2)
    problems = []
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in OUTSIDE_LOCK or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        if name not in pins:
            problems.append(f"{req} is not in {lock}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req} but {lock} pins {name}=={pins[name]}")
    for p in problems:
        print(f"{pyproject} asks for {p}", file=sys.stderr)
    if problems:
        print("the lock is out of date with pyproject.toml: run `make lock`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
