"""The lesson-page generator on a tiny fake spec, without a browser (part of `nox -s tests`).

The fake spec has one lesson file and one file beyond the lessons, with a claim that holds, one that
fails, one that is skipped, a parametrised claim, and a claim that builds a figure and drops it; a
fake README names the lesson's notebook and asks one question. `python -m docs.build` must run it,
record it and build a site whose pages say exactly that.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from docs import pages

ROOT = Path(__file__).resolve().parents[1]

FAKE_LESSON = '''
"""Lesson 01 (01_fake): a story with ``code``, a * b and <tags>.

The second paragraph of the story.
"""

import pytest
from matplotlib.figure import Figure


def test_a_claim_that_holds_for_float32():
    """It holds because ``1 + 1 == 2``."""
    assert 1 + 1 == 2


@pytest.mark.parametrize("x, y", [(1, 2), (3, 4)], ids=["small", "large"])
def test_cases_are_grouped_under_one_claim(x, y):
    """Two cases, one claim."""
    assert x < y


@pytest.mark.parametrize("version", ["naive", "final"])
def test_string_ids_are_not_repeated(version):
    """The id is the parameter: one column, named after it."""


def test_a_claim_that_fails():
    """This one does not hold."""
    assert 1 == 2, "one is not two"


def test_a_skipped_claim():
    """Nothing to check here."""
    pytest.skip("no data here")


def test_a_figure_is_drawn_and_dropped():
    """The recorder finds a figure the test built, even one it let go."""
    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    del fig
'''

FAKE_BEYOND = '''
"""Checks beyond the lessons."""

import pytest


def test_something_beyond():
    """Beyond."""


class TestAGroup:
    def test_methods_are_claims_too(self):
        """A method of a test class is a claim like any other."""


@pytest.mark.xfail(reason="known to fail", strict=True)
def test_an_expected_failure():
    assert False
'''

FAKE_README = """
# fake

| notebook | spec file | module(s) |
| --- | --- | --- |
| 01_fake | `spec/test_01_fake.py` | none |

| question | test |
| --- | --- |
| Does it hold? | `test_01`: `test_a_claim_that_holds_for_float32`, `test_not_there` |
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake")
    spec = tmp / "spec"
    spec.mkdir()
    (spec / "pytest.ini").write_text("[pytest]\n")  # the fake spec is its own rootdir
    (spec / "test_01_fake.py").write_text(FAKE_LESSON)
    (spec / "test_zz_beyond.py").write_text(FAKE_BEYOND)
    (tmp / "README.md").write_text(FAKE_README)
    bench = tmp / "bench"
    bench.mkdir()
    (bench / "bench-report.md").write_text("# Bench\n\n![ladder](ladder.png)\n")
    from matplotlib.figure import Figure

    Figure(figsize=(1, 1)).savefig(bench / "ladder.png")
    args = ["--spec", spec, "--readme", tmp / "README.md", "--bench", bench, "--site", tmp / "site"]
    args += ["--work", tmp / "work", "--", "-q", "-p", "no:randomly"]
    done = subprocess.run(
        [sys.executable, "-m", "docs.build", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp / "work" / "record.json").read_text())
    return tmp / "site", record, done.stdout


def test_the_site_has_an_index_a_page_per_spec_file_and_the_questions(built):
    """The site opens at index.html; the lesson comes first in the index, with its notebook, its
    claim counts and a link to its page; the file beyond the lessons comes after it."""
    site, _, _ = built
    index = (site / "index.html").read_text()
    for page in ("test_01_fake.html", "test_zz_beyond.html", "questions.html", "bench/bench-report.html"):
        assert (site / page).is_file(), page
    assert (
        index.index("test_01_fake.html")
        < index.index("Beyond the lessons")
        < index.index("test_zz_beyond.html")
    )
    (row,) = [r for r in re.findall(r"<tr>.*?</tr>", index, re.S) if "test_01_fake.html" in r]
    claims, held = re.findall(r"<td>(\d+)</td>", row)
    assert (claims, held) == ("6", "4")  # the skip and the failure did not hold
    assert "01_fake" in row
    assert 'src="bench/ladder.png"' in index


def test_a_lesson_page_tells_the_story_then_each_claim_with_its_result(built):
    """Module docstring first (``code`` as code, <tags> as text), then the claims in file order,
    each named as its sentence, with its docstring, result and folded source."""
    site, _, _ = built
    page = (site / "test_01_fake.html").read_text()
    assert "<code>code</code>" in page and "&lt;tags&gt;" in page and "The second paragraph" in page
    titles = re.findall(r'<h2 id="([^"]+)"', page)
    assert titles == [
        "test_a_claim_that_holds_for_float32",
        "test_cases_are_grouped_under_one_claim",
        "test_string_ids_are_not_repeated",
        "test_a_claim_that_fails",
        "test_a_skipped_claim",
        "test_a_figure_is_drawn_and_dropped",
    ]
    assert "A claim that holds for float32" in page  # as written: not "float 32"
    assert "Held in this run (2 of 2 cases held)" in page
    assert re.search(r"<th>version</th>\s*<th>result</th>", page) and "&#x27;naive&#x27;" not in page
    assert "one is not two" in page and "Failed in this run" in page
    assert "no data here" in page and "Skipped in this run" in page
    assert re.search(
        r"<details.*?<span class=\"nf\">test_a_claim_that_fails</span>", page, re.S
    )  # source, folded


def test_parametrised_cases_are_one_claim_with_their_parameters(built):
    _, record, _ = built
    claims = {c["name"]: c for f in record["files"] for c in f["claims"]}
    cases = claims["test_cases_are_grouped_under_one_claim"]["cases"]
    assert [(c["id"], c["params"], c["outcome"]) for c in cases] == [
        ("small", {"x": "1", "y": "2"}, "passed"),
        ("large", {"x": "3", "y": "4"}, "passed"),
    ]


def test_a_figure_the_test_built_is_saved_and_shown(built):
    """The figure was dropped inside the test, yet it is recorded, saved as a PNG and shown inline."""
    site, record, _ = built
    claims = {c["name"]: c for f in record["files"] for c in f["claims"]}
    (figure,) = claims["test_a_figure_is_drawn_and_dropped"]["cases"][0]["figures"]
    assert (site / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f'src="figures/{figure}"' in (site / "test_01_fake.html").read_text()
    assert all(
        not c["cases"][0]["figures"] for n, c in claims.items() if n != "test_a_figure_is_drawn_and_dropped"
    )


def test_class_methods_and_expected_failures_are_claims(built):
    site, _, _ = built
    page = (site / "test_zz_beyond.html").read_text()
    assert re.findall(r'<h2 id="([^"]+)"', page) == [
        "test_something_beyond",
        "TestAGroup-test_methods_are_claims_too",
        "test_an_expected_failure",
    ]
    assert "Held in this run (failed, as expected)" in page and "known to fail" in page


def test_questions_link_to_the_claims_that_answer_them(built):
    site, _, _ = built
    questions = (site / "questions.html").read_text()
    assert 'href="test_01_fake.html#test_a_claim_that_holds_for_float32"' in questions
    assert "test_not_there" in questions and "not in this run" in questions


@pytest.mark.parametrize(
    ("rst", "md"),
    [
        ("uses ``x @ w`` here", "uses `x @ w` here"),
        ("a `name` too", "a `name` too"),
        ("2 * x * y_i and [0, 1]", r"2 \* x \* y\_i and \[0, 1\]"),
        ("a <b> & c", "a &lt;b&gt; &amp; c"),
        ("``a`b``", "``a`b``"),
        ("Example::\n\n    x = 1", "Example:\n\n    x = 1"),
    ],
)
def test_docstrings_become_markdown(rst, md):
    assert pages.rst_to_md(rst) == md


def test_a_name_reads_as_the_sentence_it_is():
    assert pages.sentence("test_log_softmax_in_float32_is_finite") == "Log softmax in float32 is finite"


def test_the_readmes_questions_name_tests_that_exist():
    """Every test the README's question table names is a test in spec_tests, so no link on the
    questions page is dead, and every spec file in the reading guide exists."""
    readme = (ROOT / "README.md").read_text()
    defined = {}
    for path in (ROOT / "spec_tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        defined[path.stem] = names
    qs = pages.questions(readme)
    assert qs, "the README has a table of learners' questions"
    for q in qs:
        assert q.tests, f"question {q.text!r} names no test"
        for prefix, name in q.tests:
            assert any(s.startswith(prefix) and name in ns for s, ns in defined.items()), (
                f"question {q.text!r}: {name} is not a test in spec_tests/{prefix}*.py"
            )
    guide = pages.reading_guide(readme)
    assert set(guide) <= set(defined), f"reading guide names missing files: {set(guide) - set(defined)}"


def test_a_parameter_is_shown_without_the_addresses_that_change_every_run():
    from docs.recorder import _short_repr

    assert _short_repr(len) == "len"
    assert re.fullmatch(r"Question\(text='q', tests=\[\]\)", _short_repr(pages.Question("q")))
    assert "0x" not in _short_repr([lambda: 1, object()]) and len(_short_repr("a" * 500)) == 80
