"""The lesson-page generator on a tiny fake spec, without a browser (part of `nox -s tests`).

The fake spec has two lesson files (their notebooks named by their ``lessonNN`` markers, in an order
their file names do not have) and one file beyond the lessons, with a claim that holds, one that fails,
one that is skipped, a parametrised claim, a claim that builds a figure and drops it, and a file of
hostile text (HTML, backtick fences, a caption breaker) in every place a spec's text reaches a page; a
fake questions file asks one question. `python -m docs.build` must run it, record it and build a site
whose pages say exactly that. Then the real questions file is checked against the README and the spec.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from docs import pages, questions

ROOT = Path(__file__).resolve().parents[1]

FAKE_LESSON = '''
"""Lesson 01 (01_fake): a story with ``code``, a * b and <tags>.

The second paragraph of the story.
"""

import pytest
from matplotlib.figure import Figure

pytestmark = pytest.mark.lesson01


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

# Text a spec may carry, from its docstrings, its messages, its source or its parameters: every piece
# tries to break out of where the page puts it (a paragraph, a code box, a figure's caption).
FAKE_HOSTILE = r'''
"""Lesson 02 (02_hostile): text that must stay text.

A story line.
For example:
    <script>window.pwned = 0</script>
"""

import pytest
from matplotlib.figure import Figure

pytestmark = pytest.mark.lesson02


def test_an_indented_line_under_prose_stays_text():
    """For example:
        <script>window.pwned = 1</script>
    and <b>after</b> it."""


def test_a_failure_message_with_a_fence_stays_in_its_box():
    """It fails with a line of backticks in its message."""
    raise RuntimeError("before\n```\n<script>window.pwned = 2</script>\nafter the message's fence")


def test_a_skip_reason_with_a_fence_stays_in_its_box():
    pytest.skip("reason\n```\n<script>window.pwned = 3</script>\nafter the reason's fence")


def test_source_with_a_fence_stays_in_its_box():
    text = """
````
<script>window.pwned = 4</script>
after the source's fence
"""
    assert text


@pytest.mark.parametrize("label", ["a](javascript:alert(1)) <script>window.pwned = 5</script>"])
def test_an_id_that_closes_a_caption(label):
    fig = Figure(figsize=(1, 1))
    fig.add_subplot().plot([0, 1])


def test_an_attribute_list_in_a_docstring_stays_text():
    """A line may end like an attribute list.
{: onclick="window.pwned = 6" }
    and code may be followed by one: `x`{: onmouseover="window.pwned = 7" }."""


@pytest.mark.parametrize("label", ['*a*{: onclick="window.pwned = 8" }'])
def test_an_id_with_markdown_stays_text_in_its_table(label):
    pass
'''

FAKE_PYTEST_INI = """[pytest]
markers =
    lesson01: notebook 01_fake
    lesson02: notebook 02_hostile
"""

FAKE_QUESTIONS = """
[[question]]
question = "Does it hold, and is `x < y` <b>true</b>?"
tests = ["test_01_fake.py::test_a_claim_that_holds_for_float32", "test_01_fake.py::test_not_there"]
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fake")
    spec = tmp / "spec"
    spec.mkdir()
    (spec / "pytest.ini").write_text(FAKE_PYTEST_INI)  # the fake spec is its own rootdir
    (spec / "test_01_fake.py").write_text(FAKE_LESSON)
    (spec / "test_zz_beyond.py").write_text(FAKE_BEYOND)
    (spec / "test_00_hostile.py").write_text(FAKE_HOSTILE)
    (tmp / "questions.toml").write_text(FAKE_QUESTIONS)
    bench = tmp / "bench"
    bench.mkdir()
    (bench / "bench-report.md").write_text("# Bench\n\n![ladder](ladder.png)\n")
    from matplotlib.figure import Figure

    Figure(figsize=(1, 1)).savefig(bench / "ladder.png")
    args = ["--spec", spec, "--questions", tmp / "questions.toml", "--bench", bench, "--site", tmp / "site"]
    args += ["--work", tmp / "work", "--", "-q", "-p", "no:randomly"]
    done = subprocess.run(
        [sys.executable, "-m", "docs.build", *map(str, args)],
        cwd=ROOT,
        # the fake spec needs no installed pytest plugin (hypothesis, benchmark...): loading none saves half
        env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp / "work" / "record.json").read_text())
    return tmp / "site", record, done.stdout


def test_the_site_has_an_index_a_page_per_spec_file_and_the_questions(built):
    """The site opens at index.html; the lessons come first in the index, in the order of the notebooks
    their markers name (test_00_hostile is lesson 02: after test_01_fake), each with its notebook, its
    claim counts and a link to its page; the file beyond the lessons comes after them."""
    site, _, _ = built
    index = (site / "index.html").read_text()
    for page in ("test_01_fake.html", "test_zz_beyond.html", "questions.html", "bench/bench-report.html"):
        assert (site / page).is_file(), page
    index = index[index.index("<article") :]  # the page itself, not the navigation around it
    assert (
        index.index("test_01_fake.html")
        < index.index("test_00_hostile.html")
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
    (lesson,) = [f for f in record["files"] if f["stem"] == "test_01_fake"]
    assert [c["name"] for c in lesson["claims"] if any(case["figures"] for case in c["cases"])] == [
        "test_a_figure_is_drawn_and_dropped"
    ]


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
    """Each test a question names links to its claim; one that is not in the run is said to be missing.
    The question's `code` is code and its HTML is text."""
    site, _, _ = built
    page = (site / "questions.html").read_text()
    assert 'href="test_01_fake.html#test_a_claim_that_holds_for_float32"' in page
    assert "test_not_there" in page and "not in this run" in page
    assert "<code>x &lt; y</code> &lt;b&gt;true&lt;/b&gt;?" in page


@pytest.mark.parametrize(
    ("doc", "md"),
    [
        ("uses ``x @ w`` here", "uses `x @ w` here"),
        ("a `name` too", "a `name` too"),
        ("2 * x * y_i and [0, 1]", r"2 \* x \* y\_i and \[0, 1\]"),
        ("a <b> & c", "a &lt;b&gt; &amp; c"),
        ("``a`b``", "``a`b``"),
        ("a lone ` stays", r"a lone \` stays"),
        ("# not a heading\n---", "\\# not a heading\n\\---"),
        ("For example:\n    x = 1\n    <b>\nafter", "For example:\n\n```text\nx = 1\n<b>\n```\n\nafter"),
        ("Code:\n    a ```` b", "Code:\n\n`````text\na ```` b\n`````"),
    ],
)
def test_docstrings_become_markdown_with_both_backtick_styles_as_code_and_the_rest_as_text(doc, md):
    """Docstrings write inline code as ``code`` or `code`: both are code, with no converter. Everything
    else is text, and an indented block is code in a fence longer than any backtick run inside it."""
    assert pages.docstring_md(doc) == md


def test_a_name_reads_as_the_sentence_it_is():
    assert pages.sentence("test_log_softmax_in_float32_is_finite") == "Log softmax in float32 is finite"


def _defined_tests() -> set[str]:
    """The node ids of the spec's test functions and test methods, by reading the files (nothing runs)."""
    ids = set()
    for path in (ROOT / "spec_tests").glob("test_*.py"):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                ids.add(f"{rel}::{node.name}")
            elif isinstance(node, ast.ClassDef):
                ids |= {f"{rel}::{node.name}::{m.name}" for m in node.body if isinstance(m, ast.FunctionDef)}
    return ids


def test_every_test_a_learners_question_names_exists():
    """docs/questions.toml names its answers as node ids: each must be a test in spec_tests, so that no
    link on the questions page is dead and ``pytest <node id>`` runs the answer."""
    qs = questions.load()
    assert qs, "docs/questions.toml asks no question"
    defined = _defined_tests()
    for q in qs:
        assert q.tests, f"question {q.text!r} names no test"
        missing = [t for t in q.tests if t not in defined]
        assert not missing, f"question {q.text!r} names tests that are not in spec_tests: {missing}"


def test_the_readmes_questions_table_is_the_one_docs_questions_toml_gives():
    """The README's table of questions is generated from docs/questions.toml, so the two cannot drift
    apart: a row added to the README alone (or a question edited there) fails here. Fix it by moving the
    question into docs/questions.toml and running `python -m docs.questions`."""
    readme = (ROOT / "README.md").read_text()
    expected = questions.readme_with_table(readme, questions.load())
    assert readme == expected, (
        "README.md's questions table differs from docs/questions.toml: put each question in "
        "docs/questions.toml, then run `python -m docs.questions`. The table it expects:\n"
        + questions.readme_table(questions.load())
    )


def test_a_question_entry_without_node_ids_is_refused_by_its_number(tmp_path):
    """A test name without its file (``test_x`` instead of ``spec_tests/test_03_....py::test_x``) would
    link nowhere: the file is refused, naming the entry."""
    bad = tmp_path / "questions.toml"
    bad.write_text(
        '[[question]]\nquestion = "Why?"\ntests = ["spec_tests/a.py::test_a"]\n\n'
        '[[question]]\nquestion = "How?"\ntests = ["test_b"]\n'
    )
    with pytest.raises(ValueError, match="question 2 must have"):
        questions.load(bad)


def test_a_parameter_is_shown_without_the_addresses_that_change_every_run():
    from docs.recorder import _short_repr

    assert _short_repr(len) == "len"
    assert re.fullmatch(r"Question\(text='q', tests=\[\]\)", _short_repr(questions.Question("q", [])))
    assert "0x" not in _short_repr([lambda: 1, object()]) and len(_short_repr("a" * 500)) == 80


def _outside_code(page: str, needle: str) -> list[int]:
    """Where ``needle`` occurs in ``page`` outside every <code> element (an open fence would leave it out)."""
    found = []
    for m in re.finditer(re.escape(needle), page):
        before = page[: m.start()]
        if before.rfind("<code") <= before.rfind("</code>"):
            found.append(m.start())
    return found


def test_a_specs_own_text_never_becomes_live_html_or_breaks_out_of_its_box(built):
    """A docstring line indented under a prose line, a failure message or skip reason holding a line of
    backticks, a source holding a longer one, a parametrize id holding ``](``: each stays text where the
    page put it. No <script> from the spec is live, every code box holds its whole text, and the figure's
    caption keeps the whole id while its image still loads."""
    site, record, _ = built
    page = (site / "test_00_hostile.html").read_text()
    assert "<script>window.pwned" not in page and 'href="javascript' not in page
    for n in range(5):
        assert f"&lt;script&gt;window.pwned = {n}&lt;/script&gt;" in page, n
    for tail in ("after the message's fence", "after the reason's fence", "after the source's fence"):
        assert _outside_code(page, tail) == [], tail
    assert re.findall(r'<h2 id="([^"]+)"', page) == [
        "test_an_indented_line_under_prose_stays_text",
        "test_a_failure_message_with_a_fence_stays_in_its_box",
        "test_a_skip_reason_with_a_fence_stays_in_its_box",
        "test_source_with_a_fence_stays_in_its_box",
        "test_an_id_that_closes_a_caption",
        "test_an_attribute_list_in_a_docstring_stays_text",
        "test_an_id_with_markdown_stays_text_in_its_table",
    ]
    assert page.count("<details") == 7  # one result box per claim: none swallowed by an open fence
    # attr_list reads a trailing {: ...} as attributes: none of the spec's may land on an element, and
    # the id's *a* stays text in its table cell (no <em>)
    assert not re.search(r"<[^>]*\son\w+=[^>]*pwned", page) and "<em" not in page
    assert "{: onclick=&quot;window.pwned = 8&quot; }" in page.replace("&#123;", "{").replace("&#125;", "}")
    claims = {c["name"]: c for f in record["files"] for c in f["claims"]}
    (figure,) = claims["test_an_id_that_closes_a_caption"]["cases"][0]["figures"]
    (img,) = re.findall(rf'<img[^>]*src="figures/{re.escape(figure)}"[^>]*>', page)
    assert "javascript:alert(1))" in img and "&lt;script&gt;" in img
