"""`python -m docs.build [--site site] [-- PYTEST ARGS]`: run the spec once, build the lesson pages.

1. pytest runs the spec (``spec_tests/``) once, in this process, with the recorder plugin
   (docs/recorder.py): each test's claim, docstring, source, outcome and the figures it built.
2. pages.py writes one Markdown page per spec file (its notebook from its ``lessonNN`` marker), an
   index, the learners' questions (from docs/questions.toml) and the benchmark report from
   ``bench-results/`` when a run exists.
3. MkDocs (Material theme) builds the static site; open ``site/index.html``.
   ``--rebuild`` redoes 2 and 3 from the last run's record (``build/spec-site/``) without the spec.

A claim that fails does not stop the build: the page says so (that is what the run showed). The
exit status is pytest's when it could not run the spec at all (usage error, nothing collected).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import pytest

from docs import questions
from docs.pages import write_sources
from docs.recorder import SpecRecorder

ROOT = Path(__file__).resolve().parents[1]


def build_site(config_path: Path) -> None:
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    logging.getLogger("mkdocs").setLevel(logging.WARNING)
    config = load_config(str(config_path))
    config.plugins.on_startup(command="build", dirty=False)
    try:
        build(config)
    finally:
        config.plugins.on_shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--spec", default=str(ROOT / "spec_tests"), help="the spec tests' folder")
    parser.add_argument("--questions", default=str(questions.QUESTIONS), help="the learners' questions")
    parser.add_argument("--bench", default=str(ROOT / "bench-results"), help="a `nox -s bench` run, if any")
    parser.add_argument("--site", default=str(ROOT / "site"), help="where the site goes")
    parser.add_argument("--work", default=str(ROOT / "build" / "spec-site"), help="intermediate files")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="rebuild the pages from the last run's record, without the spec",
    )
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]

    work, site = Path(args.work), Path(args.site)
    md_dir = work / "md"
    t_spec, status = 0.0, pytest.ExitCode.OK
    if args.rebuild:  # the pages again from the last run's record and figures, without the spec
        record = json.loads((work / "record.json").read_text())
    else:
        if work.exists():
            shutil.rmtree(work)
        recorder = SpecRecorder(md_dir / "figures")
        t0 = time.perf_counter()
        status = pytest.main([args.spec, "-p", "no:cacheprovider", *pytest_args], plugins=[recorder])
        t_spec = time.perf_counter() - t0
        if status not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
            print(f"docs: the spec run did not complete ({status!r}); no site built", file=sys.stderr)
            return int(status) or 1
        recorder.write(work / "record.json")
        record = recorder.record()

    t1 = time.perf_counter()
    qs = questions.load(Path(args.questions)) if Path(args.questions).is_file() else []
    config_path, pages = write_sources(record, qs, md_dir, site, Path(args.bench))
    build_site(config_path)
    t_site = time.perf_counter() - t1

    n_figures = len(list((md_dir / "figures").glob("*.png")))
    print(
        f"docs: {len(pages)} pages, {n_figures} figures -> {site / 'index.html'} "
        f"(spec run {t_spec:.0f} s, pages and site {t_site:.1f} s)"
    )
    if status == pytest.ExitCode.TESTS_FAILED:
        print("docs: some claims failed in this run; their pages say which and why")
    return 0


if __name__ == "__main__":
    sys.exit(main())
