"""The learners' questions: read from docs/questions.toml, written into the README's table.

docs/questions.toml is the one place a question and the tests that answer it are written down: the
site's questions page links each test from it, and the README's table is generated from it (between
the two ``questions`` comment markers). `python -m docs.questions` rewrites that table;
docs/test_generator.py fails while the README and the file disagree, or while a test named in the file
does not exist in spec_tests/.

A question is ``question = "..."`` and ``tests = [node ids]``; a node id is pytest's own name of a test,
``spec_tests/test_03_minibatch_training.py::test_x`` (``file::Class::test`` for a method), so that
``pytest <node id>`` runs exactly that answer.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings the same parser under its old name
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "docs" / "questions.toml"
BEGIN = "<!-- questions: generated from docs/questions.toml by `python -m docs.questions`; edit that file -->"
END = "<!-- questions: end -->"


@dataclass
class Question:
    text: str
    tests: list[str]  # pytest node ids: "path/to/test_file.py::test_name"


def load(path: Path = QUESTIONS) -> list[Question]:
    """The questions of a questions.toml, in its order; ValueError naming the entry that is malformed."""
    entries = tomllib.loads(path.read_text()).get("question", [])
    found = []
    for i, entry in enumerate(entries):
        text, tests = entry.get("question"), entry.get("tests")
        if not isinstance(text, str) or not (isinstance(tests, list) and all("::" in t for t in tests)):
            raise ValueError(
                f"{path}: question {i + 1} must have a `question` string and `tests`, a list of node ids "
                f"(file.py::test), got {entry!r}"
            )
        found.append(Question(text, tests))
    return found


def short_file(node_id: str) -> str:
    """How the README's table names a test's file: ``test_03`` for a lesson's, the stem otherwise."""
    stem = Path(node_id.split("::", 1)[0]).stem
    lesson = re.match(r"test_\d\d[a-z]?(?=_)", stem)
    return lesson.group(0) if lesson else stem


def readme_table(questions: list[Question]) -> str:
    """The README's table: one row per question, its tests grouped by file (`test_03`: `a`, `b`)."""
    rows = ["| question | test |", "| --- | --- |"]
    for q in questions:
        groups: dict[str, list[str]] = {}
        for node_id in q.tests:
            groups.setdefault(short_file(node_id), []).append(node_id.split("::", 1)[1])
        cell = "; ".join(f"`{f}`: " + ", ".join(f"`{name}`" for name in names) for f, names in groups.items())
        rows.append(f"| {q.text} | {cell} |")
    return "\n".join([BEGIN, *rows, END])


def readme_with_table(readme: str, questions: list[Question]) -> str:
    """``readme`` with the text between the markers (markers included) replaced by a fresh table."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no questions table between the markers {BEGIN!r} and {END!r}")
    return readme[:start] + readme_table(questions) + readme[end + len(END) :]


def main() -> int:
    readme = ROOT / "README.md"
    readme.write_text(readme_with_table(readme.read_text(), load()))
    print(f"docs.questions: wrote the README's table of {len(load())} questions from {QUESTIONS.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
