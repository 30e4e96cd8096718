#!/usr/bin/env python3
"""Checks the library's include graph against its layer order (DESIGN.md): a file in src/<layer>/ may
include headers of its own layer and of the layers below it, never one above it or a peer's. Each
src/<layer>/ directory is a layer; src/internal.h is the umbrella, for the pipeline layer only.
Exits 1 and lists every violation; prints the graph's edges between layers with --graph."""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# Bottom to top. Layers of the same rank are peers: neither may include the other.
RANK = {"base": 0, "tensor": 1, "io": 2, "vision": 3, "text": 3, "connectors": 4, "models": 5, "lm": 6,
        "pipeline": 7}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def layer_of(path):
    """The layer of a file under src/ (internal.h: the umbrella, ranked as the pipeline)."""
    rel = path.relative_to(SRC)
    return "pipeline" if rel.parts == ("internal.h",) else rel.parts[0]


def resolve(inc, where):
    """The file an #include "inc" in `where` names: beside it, else under src/ (the include path)."""
    for cand in (where.parent / inc, SRC / inc):
        if cand.is_file():
            return cand.resolve()
    return None


def main():
    bad, edges = [], set()
    files = sorted(p for p in SRC.rglob("*") if p.suffix in (".c", ".h"))
    for f in files:
        me = layer_of(f)
        if me not in RANK:
            bad.append(f"{f.relative_to(SRC)}: directory '{me}' is not a layer ({', '.join(RANK)})")
            continue
        for inc in INCLUDE.findall(f.read_text()):
            if inc == "mmbridge.h":
                continue
            target = resolve(inc, f)
            if target is None:
                bad.append(f"{f.relative_to(SRC)}: includes \"{inc}\", which is not in src/")
                continue
            other = layer_of(target)
            if other != me:
                edges.add((me, other))
            if other not in RANK:
                continue
            if RANK[other] > RANK[me] or (RANK[other] == RANK[me] and other != me):
                bad.append(f"{f.relative_to(SRC)} ({me}) includes {target.relative_to(SRC)} ({other}): "
                           f"a layer {'above' if RANK[other] > RANK[me] else 'beside'} its own")
    if "--graph" in sys.argv:
        for a, b in sorted(edges, key=lambda e: (RANK.get(e[0], 99), e[1])):
            print(f"{a} -> {b}")
    for b in bad:
        print("layer violation:", b)
    print(f"checked {len(files)} files: {len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
