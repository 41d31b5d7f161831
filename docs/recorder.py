"""A pytest plugin that records one run of the spec as data for the lesson pages.

Per test it keeps what a reader needs and nothing pytest-specific: the file and its notebooks, the
function's name, docstring, source and line, the parametrised case's id and parameters, the outcome
(with the reason for a skip or the message of a failure) and the matplotlib Figures the test built,
saved as PNGs. A file's notebooks are those of its markers whose registered description reads
``notebook <name>`` (pyproject.toml: ``lesson05b: notebook 05b_early_stopping``).

How the figures are found without patching anything: right before a test's call phase every object
the garbage collector tracks is moved to its permanent generation (``gc.freeze()``, a constant-time
list splice), so that afterwards ``gc.get_objects()`` lists only objects made during the test. Any
``Figure`` among them was built by the test, whichever module built it (``minilib.figures``,
``Recorder.plot_*``, pyplot). The collector is paused for the call so that a figure the test built
and dropped is still there to be found; ``gc.unfreeze()`` then hands everything back.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

# Figures are saved at this resolution: 6x4 inches -> 576x384 pixels, sharp enough on a page.
FIGURE_DPI = 96


def _short_repr(value: Any, limit: int = 80) -> str:
    """A parameter as a reader would write it: names for functions and classes, repr otherwise."""
    name = getattr(value, "__qualname__", None) if callable(value) else None
    text = name if isinstance(name, str) else repr(value)
    # an address means nothing to a reader and changes every run: <function f at 0x..> -> f
    text = re.sub(r"<function ([\w.<>]+) at 0x[0-9a-f]+>", r"\1", text)
    text = re.sub(r" (object )?at 0x[0-9a-f]+>", ">", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def notebooks_of_markers(marker_lines: list[str]) -> dict[str, str]:
    """marker name -> notebook, for each registered marker described as ``notebook <name>``."""
    found = {}
    for line in marker_lines:
        name, _, description = line.partition(":")
        m = re.fullmatch(r"\s*notebook\s+(\S+)\s*", description)
        if m:
            found[name.strip()] = m.group(1)
    return found


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:80] or "case"


class SpecRecorder:
    """Collects the run in memory (``files``) and saves figures into ``figure_dir`` as it goes."""

    def __init__(self, figure_dir: Path) -> None:
        self.figure_dir = Path(figure_dir)
        self.figure_dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, dict[str, Any]] = {}  # path -> {"path", "doc", "claims": {key: claim}}
        self._cases: dict[str, dict[str, Any]] = {}  # nodeid -> case record
        self._rootdir: Path | None = None
        self._notebooks: dict[str, str] = {}  # marker name -> notebook
        self._started = time.time()

    # -- collection: what the spec claims, in file order ------------------------------------------------
    def pytest_configure(self, config: pytest.Config) -> None:
        self._rootdir = Path(config.rootpath)
        self._notebooks = notebooks_of_markers(config.getini("markers"))

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:
            if isinstance(item, pytest.Function):
                self._register(item)

    def _register(self, item: pytest.Function) -> None:
        path = Path(item.path)
        rel = str(path.relative_to(self._rootdir)) if self._rootdir in path.parents else path.name
        file = self.files.setdefault(
            rel,
            {
                "path": rel,
                "stem": path.stem,
                "doc": inspect.getdoc(item.module) or "",
                "notebooks": [],
                "claims": {},
            },
        )
        for marker in item.iter_markers():
            notebook = self._notebooks.get(marker.name)
            if notebook is not None and notebook not in file["notebooks"]:
                file["notebooks"].append(notebook)
        key = item.nodeid.split("[", 1)[0]  # all parametrised cases of one function are one claim
        claim = file["claims"].get(key)
        if claim is None:
            func = inspect.unwrap(item.function)
            try:
                lines, lineno = inspect.getsourcelines(func)
                source = "".join(lines)
            except (OSError, TypeError):
                source, lineno = "", item.location[1] + 1
            claim = {
                "name": item.originalname,
                "qualname": key.split("::", 1)[1] if "::" in key else item.originalname,
                "doc": inspect.getdoc(item.function) or "",
                "source": source,
                "lineno": lineno,
                "cases": [],
            }
            file["claims"][key] = claim
        callspec = getattr(item, "callspec", None)
        case = {
            "id": callspec.id if callspec is not None else "",
            "params": {k: _short_repr(v) for k, v in callspec.params.items()} if callspec is not None else {},
            "outcome": "not run",
            "message": "",
            "duration": 0.0,
            "figures": [],
        }
        claim["cases"].append(case)
        self._cases[item.nodeid] = case

    # -- the call: which figures did the test build? ---------------------------------------------------
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item: pytest.Item):
        case = self._cases.get(item.nodeid)
        if case is None:
            yield
            return
        was_enabled = gc.isenabled()
        gc.freeze()  # garbage frozen here is only kept until unfreeze, then collected as usual
        gc.disable()
        try:
            yield
        finally:
            try:
                self._save_figures(item, case)
            finally:
                gc.unfreeze()
                if was_enabled:
                    gc.enable()

    def _save_figures(self, item: pytest.Item, case: dict[str, Any]) -> None:
        from matplotlib.figure import Figure  # the spec imports matplotlib anyway; the plugin need not

        figures = [o for o in gc.get_objects() if isinstance(o, Figure)]
        seen: set[str] = set()
        for n, fig in enumerate(figures, 1):
            name = f"{_safe(item.nodeid.split('::', 1)[-1])}-{n}.png"
            target = self.figure_dir / name
            try:
                fig.savefig(target, dpi=FIGURE_DPI, bbox_inches="tight")
            except Exception as e:  # a figure the test left half-built must not break the run
                case.setdefault("figure_errors", []).append(f"{type(e).__name__}: {e}")
                continue
            digest = hashlib.sha256(target.read_bytes()).hexdigest()
            if digest in seen:  # the same picture twice (e.g. a figure and a copy): show it once
                target.unlink()
                continue
            seen.add(digest)
            case["figures"].append(name)

    # -- outcomes ---------------------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        case = self._cases.get(report.nodeid)
        if case is None:
            return
        case["duration"] += report.duration
        xfail = getattr(report, "wasxfail", None)
        if report.when == "call" and report.passed:
            case["outcome"] = "xpassed" if xfail is not None else "passed"
        elif report.skipped:
            if xfail is not None:
                case["outcome"], case["message"] = "xfailed", xfail
            else:
                case["outcome"] = "skipped"
                longrepr = report.longrepr
                case["message"] = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
                case["message"] = case["message"].removeprefix("Skipped: ")
        elif report.failed:
            case["outcome"] = "failed" if report.when == "call" else "error"
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else report.longreprtext
            case["message"] = message if len(message) <= 2000 else message[:2000] + " [...]"

    # -- the record -----------------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        import platform

        versions = {"python": platform.python_version()}
        for module in ("torch", "matplotlib"):  # those the spec imported: importing torch here costs seconds
            if module in sys.modules:
                versions[module] = getattr(sys.modules[module], "__version__", "?")
        files = []
        for file in self.files.values():
            claims = sorted(file["claims"].values(), key=lambda c: c["lineno"])
            files.append({**file, "claims": claims})
        return {
            "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self._started)),
            "seconds": round(time.time() - self._started, 1),
            "versions": versions,
            "files": files,
        }

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.record(), indent=1))
