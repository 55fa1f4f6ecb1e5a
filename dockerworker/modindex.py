"""The start path's modules found by name, without searching `sys.path`.

Owns: an index of the start path's modules, name → compiled file, written
when the image is built (`python -m dockerworker.modindex build`), and the
finder that serves the runtime's own start from it (`install`, `uninstall`).

Why: on the storage drivers containers run on (fuse-overlayfs here), every
`stat` and `open` is a round trip to a user-space daemon. Python's path
finder stats each `sys.path` directory for every import, then the module's
file and its source, then opens the `.pyc`: about four stats and an open per
module, over a hundred modules on the start path. From the index it is one
open per module (docs/benchmarks.md, "The start path").

Architecture Invariant: the finder only serves modules the index names
and only while the runtime starts: `app` uninstalls it before user code is
imported, so user code imports exactly as Python always does (its own
modules shadow what they shadow). A module the index names but whose file
is gone is compiled from its source, or left to the path finder.
"""

from __future__ import annotations

import marshal
import os
import sys
from importlib.machinery import ModuleSpec, SourcelessFileLoader
from typing import Any, Sequence

INDEX_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "modules.index")


# The modules served from the index's .pyc, and those compiled from source
# because their .pyc was gone (what `tools.startbench.bytecode_check` reads).
served: list[str] = []
compiled: list[str] = []


class _IndexedLoader(SourcelessFileLoader):
    """Loads the `.pyc` the index names; the module's `__file__` is still its source."""

    def __init__(self, fullname: str, path: str, source: str) -> None:
        super().__init__(fullname, path)
        self.source = source

    def get_filename(self, name: str | None = None) -> str:
        return self.source

    def get_code(self, fullname: str) -> Any:
        try:
            data = self.get_data(self.path)
        except OSError:  # the image changed since the index was made
            compiled.append(fullname)
            with open(self.source, "rb") as f:
                return compile(f.read(), self.source, "exec", dont_inherit=True)
        served.append(fullname)
        return marshal.loads(memoryview(data)[16:])


class IndexFinder:
    """A `sys.meta_path` finder over the index: {name: (pyc, source, package dir or "")}."""

    def __init__(self, index: dict[str, tuple[str, str, str]]) -> None:
        self.index = index

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: Any = None) -> ModuleSpec | None:
        entry = self.index.get(fullname)
        if entry is None:
            return None
        pyc, source, package_dir = entry
        loader = _IndexedLoader(fullname, pyc, source)
        spec = ModuleSpec(fullname, loader, origin=source, is_package=bool(package_dir))
        if package_dir:
            spec.submodule_search_locations = [package_dir]
        spec.cached = pyc
        spec.has_location = True
        return spec


_installed: IndexFinder | None = None


def install(index_file: str = INDEX_FILE) -> bool:
    """Put the index's finder first on `sys.meta_path`; False (and nothing done) without an index."""
    global _installed
    try:
        with open(index_file, "rb") as f:
            tag, index = marshal.load(f)
    except (OSError, ValueError, EOFError, TypeError):
        return False
    if tag != sys.implementation.cache_tag:
        return False  # made by another interpreter: its .pyc are not ours
    _installed = IndexFinder(index)
    sys.meta_path.insert(0, _installed)
    return True


def uninstall() -> None:
    """From now on modules are found as Python always finds them."""
    global _installed
    if _installed is not None and _installed in sys.meta_path:
        sys.meta_path.remove(_installed)
    _installed = None


# What the runtime imports before it consumes (user code aside).
START_PATH = "import dockerworker.__main__, dockerworker.app, dockerworker.messaging, encodings.idna"


def build(statement: str = START_PATH, out: str = INDEX_FILE) -> int:
    """Run `statement` (imports) and index every module it loaded from a
    `.pyc` beside its source, as this interpreter found it; returns how many."""
    exec(statement, {})
    index: dict[str, tuple[str, str, str]] = {}
    for name, module in sorted(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if spec is None or not spec.has_location or not (spec.origin or "").endswith(".py"):
            continue
        if spec.cached is None or not os.path.exists(spec.cached):
            continue
        locations = spec.submodule_search_locations
        index[name] = (spec.cached, spec.origin, locations[0] if locations else "")
    with open(out, "wb") as f:
        marshal.dump((sys.implementation.cache_tag, index), f)
    return len(index)


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m dockerworker.modindex build")
    count = build()
    print(f"indexed {count} modules of the start path in {INDEX_FILE}")
