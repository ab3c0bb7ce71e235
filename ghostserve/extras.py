"""Optional extras: which commands need which, and one clear error when one is missing.

``pip install ghostserve`` (no extras) is the daemon, its clients, the codec,
``status``, ``drop`` and ``chaos``: none of them imports torch. The reference
engine (``demo``, ``bench serving``) needs the ``engine`` extra and
``bench vllm_resume`` the ``vllm`` one, ``front`` the ``front`` one (aiohttp)
and ``vllm`` both; they call :func:`require` before
importing anything heavy, so a missing extra is a one-line message (exit status 2
from the CLI), not a traceback.
"""

from __future__ import annotations

import importlib.util

from ghostserve.errors import MissingExtra

#: extra -> the top-level modules it provides (as pyproject.toml's optional-dependencies)
EXTRAS: dict[str, tuple[str, ...]] = {
    "engine": ("torch",),
    "vllm": ("vllm", "torch"),
    "gpu": ("cupy",),
    "bench": ("matplotlib",),
    "front": ("aiohttp",),
    "mooncake": ("mooncake",),
}


def importable(module: str) -> bool:
    """Can ``module`` be imported? Looks it up without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a finder refused it, or a broken parent package
        return False


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` can be imported."""
    for module in EXTRAS[extra]:
        if not importable(module):
            raise MissingExtra(extra, what, module)


def extra_of(exc: ModuleNotFoundError) -> str | None:
    """The extra that would have provided the module ``exc`` could not find, if any."""
    root = (exc.name or "").partition(".")[0]
    for extra, modules in EXTRAS.items():
        if root in modules:
            return extra
    return None
