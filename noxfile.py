"""minilib's sessions: `nox -s tests` (the default) and `nox -s bench` are all a newcomer needs;
`nox -s docs` renders the spec as pages to read in a browser.

Every environment pins torch through constraints.txt (see there why) and is reused between runs;
arguments after `--` go straight to pytest, e.g. `nox -s tests -- -k logsumexp`.
"""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False

CONSTRAINTS = ("-c", "constraints.txt")


def install(session: nox.Session, extras: str) -> None:
    session.install(*CONSTRAINTS, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the spec tests, the docs generator's fast check and one untimed pass of the benchmarks.

    The spec: one file per notebook, plus contracts, data, kernels, checkpoints and a two-process DDP
    job; the docs check builds a site from a tiny fake spec; the benchmarks run once on tiny sizes so
    the harness cannot rot."""
    install(session, "test,triton,docs")  # docs: docs/test_generator.py builds a tiny fake site
    session.run(
        "pytest",
        "--benchmark-disable",  # benchmark files run once on tiny sizes so the harness cannot rot
        *session.posargs,
        env={"TRITON_INTERPRET": "1"},  # Triton kernels run on the CPU through its interpreter
    )


@nox.session
def bench(session: nox.Session) -> None:
    """Time the matmuls, the losses (fused and linear), BatchNorm, convolutions, a training step, checkpoint
    saves and DDP; write bench-results/ (JSON, report, charts).

    `nox -s bench -- --quick` runs the reduced set (well under 3 minutes on 2 cores). Other arguments go to
    pytest: `nox -s bench -- --quick --benchmark-save=before`, later `... --benchmark-compare=0001`.
    Without nox (e.g. on a CUDA machine): `python -m benchmarks.run [--quick]`.
    """
    install(session, "bench,triton")
    session.run("python", "-m", "benchmarks.run", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style and imports with ruff."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "--diff", ".")


@nox.session
def spec(session: nox.Session) -> None:
    """Print the spec tests as an outline a learner can read: each claim, then why it holds, by lesson."""
    install(session, "spec,triton")
    session.run(
        "pytest",
        "spec_tests",
        "--spec",
        # the claim (the test's name), then why it holds (its whole docstring), indented below it
        "-o",
        "spec_test_format={result} {name}\n    {docstring_summary}",
        "--benchmark-disable",
        *session.posargs,
        env={"TRITON_INTERPRET": "1"},
    )


@nox.session
def docs(session: nox.Session) -> None:
    """Run the spec once and build the lessons as a static site in site/ (open site/index.html).

    One page per spec file: its story, each claim with its result in this run, its figures and its
    source; an index with the counts and the benchmark report when bench-results/ holds one; the
    learners' questions (docs/questions.toml) linked to their claims. Then headless Chromium (Debian's
    `chromium`; skipped with the reason where it is missing) opens every page and saves screenshots in
    site/_screenshots/. Arguments after `--` go to the spec's pytest run, e.g. `-- -k anneal`.
    """
    install(session, "test,triton,docs,docs-browser")
    env = {"TRITON_INTERPRET": "1"}
    session.run("python", "-m", "docs.build", "--", "--benchmark-disable", *session.posargs, env=env)
    session.run("python", "-m", "pytest", "docs/site_check.py", "-p", "no:cacheprovider", "-q", "-rs")
