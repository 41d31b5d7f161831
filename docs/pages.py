"""The recorded run (see recorder.py) as Markdown pages and an MkDocs configuration.

Nothing here is written by hand per lesson: the pages come from the record of one spec run, whose
files carry their notebooks (from their ``lessonNN`` markers, described in pyproject.toml as
``lesson05b: notebook 05b_early_stopping``), and from docs/questions.toml (the learners' questions and
the tests that answer them). MkDocs with the Material theme turns the Markdown into the site.

A spec's text is the spec author's, not the site's: docstrings, failure messages, skip reasons, sources
and parameter ids are shown, never interpreted. Prose is escaped (HTML and Markdown's own characters),
`code` and ``code`` become inline code, and code goes into a fence longer than any run of backticks
inside it, so that nothing a test says can close its box or become live HTML.
"""

from __future__ import annotations

import html
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from docs.questions import Question

# Inline code as a docstring writes it: ``code`` (reStructuredText's habit) or `code` (Markdown's).
INLINE_CODE = re.compile(r"(``.+?``|`[^`]+`)")
# Cases beyond this many are listed in a folded table, so that the claim stays readable.
OPEN_CASES = 12


# -- text ------------------------------------------------------------------------------------------------
def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def inline_code(text: str) -> str:
    """``text`` as Markdown inline code, delimited by more backticks than any run inside it."""
    ticks = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def fenced(text: str, lang: str = "text") -> str:
    """``text`` as a fenced code block whose fence is longer than any run of backticks inside it."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def plain(text: str) -> str:
    """Prose shown as written: HTML and Markdown's emphasis, link and code characters are escaped, and so
    is what would make a line a heading (``# ...``, or a line of ``=`` or ``-`` under another). Braces
    too: with attr_list, ``{: onclick="..."}`` ending a line would give its paragraph that attribute."""
    text = html.escape(text, quote=False)
    text = re.sub(r"([\\`*_\[\]{}])", r"\\\1", text)
    return re.sub(r"^(\s*)(#|[=-]+\s*$)", r"\1\\\2", text, flags=re.M)


def inline_md(line: str) -> str:
    """One line of a spec's prose: `code` or ``code`` as inline code, the rest as text."""
    pieces = INLINE_CODE.split(line)  # the odd pieces are the code spans
    return "".join(
        inline_code(p[2:-2] if p.startswith("``") else p[1:-1]) if i % 2 else plain(p)
        for i, p in enumerate(pieces)
    )


def docstring_md(text: str) -> str:
    """A docstring (a spec's story, a claim's why) as Markdown: each prose line through `inline_md`; lines
    indented by four spaces or more (an example, a table of numbers) as a fenced code block."""
    lines, out, i = text.strip("\n").splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("    "):
            out.append(inline_md(lines[i]))
            i += 1
            continue
        j = i
        while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
            j += 1
        while not lines[j - 1].strip():  # blank lines after the block are the prose's again
            j -= 1
        out += ["", fenced(textwrap.dedent("\n".join(lines[i:j]))), ""]
        i = j
    return "\n".join(out).strip()


def sentence(name: str) -> str:
    """A test's name as the sentence it is: ``test_n_epochs_is_a_float`` -> 'N epochs is a float'."""
    words = name.removeprefix("test_").replace("_", " ").strip()
    return words[:1].upper() + words[1:]


def anchor(qualname: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", qualname).strip("-")


def _cell(text: str) -> str:
    """A table cell shown as code: escaped, and with no pipe that would split the row. Markdown still reads
    the text inside an HTML tag (``*a*{: onclick=...}`` would be an <em> with that attribute), so its
    characters go in as character references, which it leaves alone."""
    escaped = html.escape(text)
    return "<code>" + re.sub(r"[\\`*_{}\[\]|]", lambda m: f"&#{ord(m[0])};", escaped) + "</code>"


# -- the site ---------------------------------------------------------------------------------------------
@dataclass
class Page:
    file: dict[str, Any]
    notebooks: list[str]

    @property
    def stem(self) -> str:
        return self.file["stem"]

    @property
    def lesson(self) -> bool:
        return bool(self.notebooks)

    @property
    def title(self) -> str:
        first = self.file["doc"].strip().split("\n\n", 1)[0]
        return " ".join(first.split()) or self.stem

    @property
    def story(self) -> str:
        parts = self.file["doc"].strip().split("\n\n", 1)
        return parts[1] if len(parts) > 1 else ""

    @property
    def nav_label(self) -> str:
        """The notebook's name; a second file for one notebook adds its own ("03_x: loss properties")."""
        notebook = ", ".join(n for n in self.notebooks if not n.startswith("00_"))
        if not notebook:
            return self.stem
        own = self.stem.removeprefix("test_")
        return notebook if own.startswith(self.notebooks[-1][:2]) else f"{notebook}: {own.replace('_', ' ')}"


def claim_status(claim: dict[str, Any]) -> str:
    outcomes = [c["outcome"] for c in claim["cases"]]
    if any(o in ("failed", "error") for o in outcomes):
        return "failed"
    if all(o in ("skipped", "not run") for o in outcomes):
        return "skipped"
    return "held"


def counts(file: dict[str, Any]) -> dict[str, int]:
    statuses = [claim_status(c) for c in file["claims"]]
    return {
        "claims": len(statuses),
        **{s: statuses.count(s) for s in ("held", "failed", "skipped")},
    }


def order_pages(record: dict[str, Any]) -> list[Page]:
    """The lessons in notebook order, then the files beyond the lessons in name order.

    A file's notebooks are those of its ``lessonNN`` markers, as the recorder found them; a file
    without one (``test_data.py``, ``test_contracts.py``) is beyond the lessons."""
    pages = [Page(file, list(file.get("notebooks", []))) for file in record["files"]]
    lessons = sorted((p for p in pages if p.lesson), key=lambda p: (min(p.notebooks), p.stem))
    beyond = sorted((p for p in pages if not p.lesson), key=lambda p: p.stem)
    return lessons + beyond


STATUS_ADMONITION = {"held": "success", "failed": "failure", "skipped": "warning"}
OUTCOME_WORD = {
    "passed": "held",
    "failed": "failed",
    "error": "error",
    "skipped": "skipped",
    "xfailed": "failed, as expected",
    "xpassed": "held (expected to fail)",
    "not run": "not run",
}


def _indent(text: str, by: str = "    ") -> str:
    return "\n".join(by + line if line.strip() else "" for line in text.splitlines())


def _repeats_id(value: str, case_id: str) -> bool:
    """Whether a parameter's repr only repeats the case's id (pytest makes ids from strings)."""
    text = value.strip("'\"")
    if text.endswith("..."):  # shortened by the recorder
        return len(text) > 3 and case_id.startswith(text[:-3])
    return text == case_id


def claim_markdown(claim: dict[str, Any], path: str) -> str:
    """One claim: its sentence, its docstring, its cases and figures, then one box with its result in
    this run whose folded body holds why it did not hold (open when it failed or was skipped) and
    its source."""
    cases = claim["cases"]
    status = claim_status(claim)
    md = [f"## {sentence(claim['name'])} {{ #{anchor(claim['qualname'])} }}", ""]
    if claim["doc"]:
        md += [docstring_md(claim["doc"]), ""]

    parametrised = any(c["id"] for c in cases)
    if parametrised:
        names = list(dict.fromkeys(k for c in cases for k in c["params"]))
        # a parameter that only repeats the case's id (ids made from strings) says nothing more
        repeated = [n for n in names if all(_repeats_id(c["params"].get(n, ""), c["id"]) for c in cases)]
        names = [n for n in names if n not in repeated]
        header = [", ".join(repeated) or "case", *names, "result"]
        table = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
        for c in cases:
            cells = [
                _cell(c["id"]),
                *(_cell(c["params"].get(n, "")) for n in names),
                OUTCOME_WORD[c["outcome"]],
            ]
            table.append("| " + " | ".join(cells) + " |")
        if len(cases) > OPEN_CASES:
            md += [f'??? info "Its {len(cases)} cases"', "", _indent("\n".join(table)), ""]
        else:
            md += ["\n".join(table), ""]

    figures = []
    for c in cases:
        for n, fig in enumerate(c["figures"], 1):
            caption = f"Figure {n}" + (f" of case {c['id']}" if c["id"] else "") + " built by this claim"
            figures.append(f"![{plain(caption)}](figures/{fig})")
    if figures:  # side by side where they fit (see extra.css)
        md += ['<div class="claim-figures" markdown>', "", *figures, "", "</div>", ""]

    if parametrised:
        held = sum(c["outcome"] in ("passed", "xfailed", "xpassed") for c in cases)
        title = f"{status.capitalize()} in this run ({held} of {len(cases)} cases held)"
    else:
        title = f"{status.capitalize()} in this run"
        if cases[0]["outcome"] in ("xfailed", "xpassed"):
            title += f" ({OUTCOME_WORD[cases[0]['outcome']]})"
    if claim["source"]:
        title += f". Source: {path}, line {claim['lineno']}"
    body = []
    messages = [(c["id"], c["message"]) for c in cases if c["message"] and c["outcome"] != "passed"]
    for case_id, message in messages[:5]:
        label = f"{case_id}: " if case_id else ""
        body += [fenced(f"{label}{message.strip()}"), ""]
    if len(messages) > 5:
        body += [f"and {len(messages) - 5} more.", ""]
    if claim["source"]:
        body.append(fenced(claim["source"].rstrip(), "python"))
    fold = "???+" if status != "held" else "???"  # what went wrong is shown, the source stays folded
    md += [f'{fold} {STATUS_ADMONITION[status]} "{title}"', "", _indent("\n".join(body)), ""]
    return "\n".join(md)


def page_markdown(page: Page) -> str:
    c = counts(page.file)
    where = f"notebook{'s' if len(page.notebooks) > 1 else ''} " + ", ".join(
        inline_code(n) for n in page.notebooks
    )
    notes = [f"{c['claims']} claims, **{c['held']} held** in this run"]
    notes += [f"{c[s]} {s}" for s in ("failed", "skipped") if c[s]]
    md = [
        f"# {inline_md(page.title)}",
        "",
        f"{'; '.join(notes)}. From {inline_code(page.file['path'])}"
        + (f", the companion of {where}." if page.lesson else ", beyond the lessons."),
        "",
        docstring_md(page.story),
        "",
    ]
    md += [claim_markdown(claim, page.file["path"]) for claim in page.file["claims"]]
    return "\n".join(md) + "\n"


def _pages_table(pages: list[Page], lessons: bool) -> list[str]:
    head = (
        "| lesson | notebook | claims | held | not held |"
        if lessons
        else "| spec | claims | held | not held |"
    )
    rows = [head, "| " + " | ".join("---" for _ in range(head.count("|") - 1)) + " |"]
    for p in pages:
        c = counts(p.file)
        missing = ", ".join(f"{c[s]} {s}" for s in ("failed", "skipped") if c[s]) or "-"
        link = f"[{inline_md(p.title)}]({p.stem}.md)"
        cells = [link, plain(", ".join(p.notebooks))] if lessons else [link]
        cells += [str(c["claims"]), str(c["held"]), missing]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def questions_markdown(qs: list[Question], pages: list[Page]) -> str:
    """Each question of docs/questions.toml, with a link to each claim that answers it and its result."""
    where = {f"{p.file['path']}::{c['qualname']}": (p, c) for p in pages for c in p.file["claims"]}
    md = [
        "# The learners' questions",
        "",
        "Each question from the README, with the claims that answer it and whether they held in this run.",
        "",
    ]
    for q in qs:
        md += [f"## {inline_md(q.text)}", ""]
        for node_id in q.tests:
            if node_id not in where:
                md.append(f"- {inline_code(node_id)} (not in this run's spec)")
                continue
            p, claim = where[node_id]
            link = f"{p.stem}.md#{anchor(claim['qualname'])}"
            md.append(f"- [{sentence(claim['name'])}]({link}) ({plain(p.nav_label)}): {claim_status(claim)}")
        md.append("")
    return "\n".join(md)


def bench_pages(bench_dir: Path | None, md_dir: Path) -> list[str]:
    """Copy a benchmark run's report and charts into the site; returns its charts' names ([] if none)."""
    report = bench_dir / "bench-report.md" if bench_dir else None
    if report is None or not report.is_file():
        return []
    target = md_dir / "bench"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(report, target / "bench-report.md")
    charts = sorted(p.name for p in bench_dir.glob("*.png"))
    for name in charts:
        shutil.copy(bench_dir / name, target / name)
    return charts


def index_markdown(
    record: dict[str, Any], pages: list[Page], qs: list[Question], charts: list[str] | None
) -> str:
    v = record["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in v)
    md = [
        "# minilib: the lessons, as run",
        "",
        "Each page is one spec file of minilib, read as its lesson: the story first, then each claim the "
        "file makes, with its result in one run of the spec, the figures its test drew, and its source. "
        f"Generated by `nox -s docs` from the run of {record['started']} ({record['seconds']:.0f} s; "
        f"{versions}); nothing here is written by hand.",
        "",
        "## The lessons",
        "",
        *_pages_table([p for p in pages if p.lesson], lessons=True),
        "",
    ]
    beyond = [p for p in pages if not p.lesson]
    if beyond:
        md += ["## Beyond the lessons", "", *_pages_table(beyond, lessons=False), ""]
    if qs:
        md += [
            "## The learners' questions",
            "",
            f"[{len(qs)} questions](questions.md) a learner asks, each linked to the claims that answer it.",
            "",
        ]
    md += ["## Benchmarks", ""]
    if charts is None:
        md += [
            "No `bench-results/` run yet: `nox -s bench` writes one, and the next `nox -s docs` shows it.",
            "",
        ]
    else:
        md += ["[The benchmark report](bench/bench-report.md) of the last `nox -s bench` run.", ""]
        md += [f"![{name}](bench/{name})" for name in charts] + [""]
    return "\n".join(md) + "\n"


def write_sources(
    record: dict[str, Any], qs: list[Question], md_dir: Path, site_dir: Path, bench_dir: Path | None
) -> tuple[Path, list[Page]]:
    """Write the Markdown pages into ``md_dir`` and ``mkdocs.yml`` beside it; returns the config's path."""
    md_dir.mkdir(parents=True, exist_ok=True)
    pages = order_pages(record)
    has_report = bench_dir is not None and (bench_dir / "bench-report.md").is_file()
    charts = bench_pages(bench_dir, md_dir) if has_report else None
    (md_dir / "index.md").write_text(index_markdown(record, pages, qs, charts))
    for p in pages:
        (md_dir / f"{p.stem}.md").write_text(page_markdown(p))
    if qs:
        (md_dir / "questions.md").write_text(questions_markdown(qs, pages))
    shutil.copy(Path(__file__).with_name("extra.css"), md_dir / "extra.css")

    nav: list[Any] = [{"Home": "index.md"}]
    nav.append({"The lessons": [{p.nav_label: f"{p.stem}.md"} for p in pages if p.lesson]})
    if any(not p.lesson for p in pages):
        nav.append({"Beyond the lessons": [{p.nav_label: f"{p.stem}.md"} for p in pages if not p.lesson]})
    if qs:
        nav.append({"Questions": "questions.md"})
    if charts is not None:
        nav.append({"Benchmarks": "bench/bench-report.md"})
    config = {
        "site_name": "minilib: the lessons, as run",
        "docs_dir": str(md_dir.resolve()),
        "site_dir": str(site_dir.resolve()),
        "use_directory_urls": False,  # pages open straight from the disk (file://), no server
        "theme": {
            "name": "material",
            "font": False,  # no Google Fonts: the site must load offline
            "features": ["navigation.sections", "toc.follow", "content.code.copy"],
        },
        # No search: from file:// Material's search needs a worker shim fetched from unpkg.com, and the
        # site must load offline without a console error. The browser's find-in-page does the job.
        "plugins": [],
        "markdown_extensions": [
            "admonition",
            "attr_list",
            "md_in_html",
            "tables",
            "pymdownx.details",
            "pymdownx.superfences",
            {"pymdownx.highlight": {"use_pygments": True}},
            {"toc": {"permalink": True}},
        ],
        "extra_css": ["extra.css"],
        "nav": nav,
    }
    config_path = md_dir.parent / "mkdocs.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path, pages
