#!/usr/bin/env python3
"""Checks that police the repository rather than behaviour, run by .ci/run before the tests
(standard library only, so it runs before anything is installed):

  * no library file over 400 lines (STYLE.md: a longer file is probably two ideas);
  * the README's "What is where" prints today's line count of each room (within 2%);
  * each room against this round's line budget (printed; over budget is named, not failed:
    the closing note of the round says which capability costs the lines);
  * the product never sends readers to the development notes beside the repository, which a
    user who clones minimoe does not have (their names are written in pieces here).
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minimoe"
MAX_LINES = 400
BUDGET = {"core": 4900, "sim": 1900, "recipes": 1250, "cli": 450, "library": 8500}
OUTSIDE_NOTES = [name + ".md" for name in ("METHOD", "PEERS", "COSTSIM", "THROUGHPUT")] + ["../" + "shared"]
PRODUCT = ("minimoe/**/*.py", "tests/*.py", "sims/**/*.toml", "scaling/**/*", "notebooks/*.ipynb",
           "notebooks/*.md", "docs/*.md", "README.md")


def room_of(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    if parts[0] == "bench":
        return None  # benchmarks sit beside the library
    return "core" if len(parts) == 1 else parts[0]


def main() -> int:
    problems = []
    sizes = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    problems += [f"{p.relative_to(ROOT)}: {n} lines, over {MAX_LINES}"
                 for p, n in sorted(sizes.items()) if n > MAX_LINES]
    counted = {room: 0 for room in BUDGET}
    for p, n in sizes.items():
        room = room_of(p)
        if room is not None:
            counted[room] = counted.get(room, 0) + n
            counted["library"] += n
    line = next((x for x in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
                 if "library-lines" in x), "")
    printed = [int(part.split()[0].replace(",", "")) for part in line.split("**")[1::2]]
    order = ("library", "core", "sim", "recipes", "cli")
    if len(printed) != len(order):
        problems.append(f"README.md: the library-lines line must print {len(order)} counts "
                        f"({', '.join(order)}); found {printed}")
    else:
        for room, said in zip(order, printed):
            if abs(said - counted[room]) > 0.02 * counted[room]:
                problems.append(f"README.md says the {room} is {said:,} lines; it is {counted[room]:,}")
    for room in order:
        over = counted[room] - BUDGET[room]
        print(f"lint: {room:8s} {counted[room]:6,d} lines (budget {BUDGET[room]:,}"
              + (f", OVER by {over:,})" if over > 0 else ")"))
    for pattern in PRODUCT:
        for path in ROOT.glob(pattern):
            if path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
                problems += [f"{path.relative_to(ROOT)}: names {m}" for m in OUTSIDE_NOTES if m in text]
    for problem in problems:
        print(f"lint: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
