"""The mutation list of tests/deploy/README.md: each known breakage must fail its test.

Every row is applied to a fresh copy of the repository's deployment files and
tests, and the named test is run there in a subprocess; it must fail. The copies
run two at a time. A row whose "old" text is not found exactly once is itself a
failure (the list must follow the files it mutates).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_support import ROOT, SCALE, copy_repository

README = Path(__file__).with_name("README.md")
# What a copy needs to run tests/deploy: everything but the heavy or irrelevant parts.


@dataclass(frozen=True)
class Mutation:
    number: int
    breakage: str
    file: str
    old: str
    new: str
    test: str


def _cells(line: str) -> list[str]:
    cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
    return [cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell for cell in cells]


def mutations() -> list[Mutation]:
    text = README.read_text().split("## Mutation list", 1)[1]
    rows = [line for line in text.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    found = []
    for row in rows:
        number, breakage, file, old, new, test = _cells(row)
        found.append(Mutation(int(number), breakage, file, old.replace("\\n", "\n"), new.replace("\\n", "\n"), test))
    return found


MUTATIONS = mutations()


def test_the_mutation_list_is_complete_and_well_formed() -> None:
    assert len(MUTATIONS) >= 30
    assert [m.number for m in MUTATIONS] == list(range(1, len(MUTATIONS) + 1))
    for mutation in MUTATIONS:
        path = ROOT / mutation.file
        assert path.is_file(), f"#{mutation.number}: no file {mutation.file}"
        count = path.read_text().count(mutation.old)
        assert count == 1, f"#{mutation.number}: {mutation.old!r} occurs {count} times in {mutation.file}"
        module, _, name = mutation.test.partition("::")
        source = (Path(__file__).parent / module).read_text()
        assert f"def {name}(" in source, f"#{mutation.number}: no test {mutation.test}"


def _run(mutation: Mutation, base: Path) -> tuple[Mutation, int, str]:
    copy = base / f"m{mutation.number}"
    copy_repository(copy)
    path = copy / mutation.file
    path.write_text(path.read_text().replace(mutation.old, mutation.new))
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-x",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:faker",
            f"tests/deploy/{mutation.test}",
        ],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300 * SCALE,
    )
    shutil.rmtree(copy, ignore_errors=True)
    return mutation, result.returncode, result.stdout[-3000:]


# 70 copies of the repo, each running one test: the first 46 take ~40 s quiet and 2 min
# under load; the deploy rows 47-70 run Ansible or network namespaces (~9 min under load
# on 2 cores, measured with 8 agents busy).
@pytest.mark.timeout(1800)
def test_every_mutation_fails_the_test_that_claims_to_catch_it(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(lambda m: _run(m, tmp_path), MUTATIONS))
    survived = []
    for mutation, returncode, output in outcomes:
        # 1: a test failed (or errored in a fixture). 5 (nothing collected) or 0 is a miss.
        if returncode != 1:
            survived.append(f"#{mutation.number} {mutation.breakage}: exit {returncode}\n{output}")
    assert not survived, "mutations not caught:\n" + "\n".join(survived)


@pytest.mark.parametrize("number", [2, 7])
def test_an_unmutated_copy_passes_the_same_tests(number: int, tmp_path: Path) -> None:
    """The harness itself: a copy without the mutation passes, so the failures above are the mutations'."""
    mutation = next(m for m in MUTATIONS if m.number == number)
    unchanged = Mutation(mutation.number, "none", mutation.file, mutation.old, mutation.old, mutation.test)
    _, returncode, output = _run(unchanged, tmp_path)
    assert returncode == 0, output
