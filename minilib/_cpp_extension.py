"""Building minilib's C++ kernels on first use, shared by every CPU kernel module (beyond the lessons).

Each kernel module (``_cpu_cross_entropy``, ``_cpu_batch_norm``) keeps its own ``state`` dict and lock
and calls ``load_once``: the first call compiles ``minilib/csrc/<kernel>.cpp`` with
``torch.utils.cpp_extension.load`` (ninja + the system C++ compiler, -O3 -march=native -fopenmp); later
processes reuse the build in torch's extension cache (``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``). If the build fails (no compiler, no ninja, an unknown flag), it warns
once and returns None, and the caller uses its torch fallback. ``MINILIB_NO_EXTENSION=1`` skips every
build and always uses the fallbacks.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["EXTENSION_FLAGS", "CSRC", "cpu_tag", "build", "load_once", "status"]

#: Where the kernels' sources live (shipped as package data).
CSRC = Path(__file__).parent / "csrc"

#: Compiler flags, tried in order until one set builds. -march=native is safe because the build
#: happens on the machine that runs it. -mtune=generic: gcc tunes some AMD CPUs for 128-bit vectors,
#: which halves the exp loop's width for no gain. -fno-trapping-math lets gcc if-convert the exp's
#: clamp (it changes no result, only what gcc may assume about floating-point exceptions); we avoid
#: -ffast-math, which would break inf/nan handling.
EXTENSION_FLAGS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-mtune=generic", "-fno-trapping-math", "-fopenmp"),
    ("-O3", "-fno-trapping-math", "-fopenmp"),
)


def cpu_tag() -> str:
    """A short fingerprint of this CPU's instruction sets: a -march=native build cached in a shared home
    folder must not be loaded on a machine whose CPU lacks those instructions (it would die of SIGILL)."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def build(name: str, source: Path):
    """(module, None) once ``source`` compiles as extension ``name`` with one of EXTENSION_FLAGS, else
    (None, why not)."""
    # Imported here: cpp_extension pulls in setuptools, which `import minilib.kernels` should not pay for.
    try:
        from torch.utils import cpp_extension
    except Exception as e:  # pragma: no cover - torch without its build tools
        return None, f"torch.utils.cpp_extension unavailable: {e}"
    errors = []
    for i, flags in enumerate(EXTENSION_FLAGS):
        try:
            module = cpp_extension.load(
                # A cache folder per flag set (a fallback build never evicts the first) and per CPU.
                name=f"{name}_{i}_{cpu_tag()}",
                sources=[str(source)],
                extra_cflags=list(flags),
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
            return module, None
        except Exception as e:  # noqa: BLE001 - any build failure (no compiler, no ninja, bad flag) means fallback
            errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    return None, "; ".join(errors)


def load_once(
    state: dict, lock: threading.Lock, build_fn: Callable[[], tuple], user: str, stacklevel: int = 4
):
    """The module ``build_fn()`` gives, built on the first call and remembered in ``state`` (keys
    ``module``, ``tried``, ``error``); None, with one RuntimeWarning naming ``user``, if it cannot be built.
    ``stacklevel`` points the warning at the caller of the kernel module's own loader."""
    if state["tried"]:
        return state["module"]
    with lock:
        if state["tried"]:
            return state["module"]
        if os.environ.get("MINILIB_NO_EXTENSION") == "1":
            state["error"] = "disabled by MINILIB_NO_EXTENSION=1"
        else:
            state["module"], state["error"] = build_fn()
            if state["module"] is None:
                warnings.warn(
                    f"{user}: could not build the C++ kernel ({state['error']}); using the slower torch "
                    "fallback. Install a C++ compiler and ninja (pip install ninja) to get the fast path.",
                    RuntimeWarning,
                    stacklevel=stacklevel,
                )
        state["tried"] = True
    return state["module"]


def status(state: dict) -> str:
    """'cpp' if the kernel is loaded, else why not (after the first call to its loader)."""
    if state["module"] is not None:
        return "cpp"
    return f"torch fallback ({state['error']})" if state["tried"] else "not loaded yet"
