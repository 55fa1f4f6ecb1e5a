"""The start path's compiled modules in one file, found by name.

Owns: a bundle of the start path's modules (name → the bytes of its `.pyc`,
its source's path, its package directory), written when the image is built
(`python -m dockerworker.bundle build`), and the finder that serves the
runtime's own start from it (`install`, `uninstall`).

Why: on the storage drivers containers run on (fuse-overlayfs here), every
`stat` and `open` is a round trip to a user-space daemon. Python's path
finder stats each `sys.path` directory for every import, then the module's
file and its source, then opens the `.pyc`: about five round trips per
module, over a hundred modules on the start path, and the opens are the
dearest. From the bundle it is one open for all of them, and one `stat` per
module (docs/benchmarks.md, "The start path").

Architecture Invariant: a module is served from the bundle only if its
source still has the modification time and size its `.pyc` was compiled
from, the rule Python itself applies to a `.pyc` (`stat` of the source);
otherwise it is compiled from that source. The finder only serves modules
the bundle names, and only while the runtime starts: `app` uninstalls it
before user code is imported, so user code imports exactly as Python always
does (its own modules shadow what they shadow). It is installed for the
container's command only (`__main__`), not for `run-once`, try mode or the
tools.
"""

from __future__ import annotations

import marshal
import os
import sys
from importlib.machinery import ModuleSpec
from typing import TYPE_CHECKING, Any, Sequence, cast

if TYPE_CHECKING:
    from importlib.abc import Loader  # not at run time: importlib.abc imports more than this module needs

BUNDLE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "start.bundle")
# What the runtime imports before it consumes (user code aside); the
# benchmarks time it as a floor of their own.
START_PATH = "import dockerworker.__main__, dockerworker.app, dockerworker.messaging"
# Bundled: that, and the codec a broker's host name is resolved with at connect.
_BUNDLED = START_PATH + ", encodings.idna"

# One entry: the .pyc's bytes, the source's path, the package's directory ("" for a module).
Entry = tuple[bytes, str, str]

# The modules served from the bundle, and those compiled from their source
# because it changed since the bundle was made (read by
# `tools.startbench.bytecode_check` and the tests).
served: list[str] = []
compiled: list[str] = []


class _BundleLoader:
    """Loads a module from its bundled `.pyc`, or from its source if that changed."""

    def __init__(self, fullname: str, entry: Entry) -> None:
        self.name = fullname
        self.pyc, self.path, self.package_dir = entry

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: Any) -> None:
        exec(self.get_code(self.name), module.__dict__)

    def is_package(self, fullname: str) -> bool:
        return bool(self.package_dir)

    def get_filename(self, fullname: str | None = None) -> str:
        return self.path

    def get_source(self, fullname: str) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def get_code(self, fullname: str) -> Any:
        # The bytes are let go once read: the module keeps its loader for
        # as long as the process lives. (A second call compiles the source.)
        pyc, self.pyc = self.pyc, b""
        if _current(pyc, self.path):
            served.append(fullname)
            return marshal.loads(memoryview(pyc)[16:])
        compiled.append(fullname)
        with open(self.path, "rb") as f:
            return compile(f.read(), self.path, "exec", dont_inherit=True)


def _current(pyc: bytes, source: str) -> bool:
    """Whether a timestamp-based `.pyc` was compiled from `source` as it is now."""
    if len(pyc) < 16:
        return False
    try:
        st = os.stat(source)
    except OSError:
        return False
    flags = int.from_bytes(pyc[4:8], "little")
    mtime = int.from_bytes(pyc[8:12], "little")
    size = int.from_bytes(pyc[12:16], "little")
    return flags == 0 and mtime == int(st.st_mtime) & 0xFFFFFFFF and size == st.st_size & 0xFFFFFFFF


class BundleFinder:
    """A `sys.meta_path` finder over the bundle."""

    def __init__(self, bundle: dict[str, Entry]) -> None:
        self.bundle = bundle

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: Any = None) -> ModuleSpec | None:
        entry = self.bundle.get(fullname)
        if entry is None:
            return None
        loader = _BundleLoader(fullname, entry)
        spec = ModuleSpec(fullname, cast("Loader", loader), origin=loader.path, is_package=bool(loader.package_dir))
        if loader.package_dir:
            spec.submodule_search_locations = [loader.package_dir]
        spec.has_location = True
        return spec


_installed: BundleFinder | None = None


def install(bundle_file: str = BUNDLE_FILE) -> bool:
    """Put the bundle's finder first on `sys.meta_path`; False (and nothing done) without a bundle."""
    global _installed
    try:
        with open(bundle_file, "rb") as f:
            tag, bundle = marshal.load(f)
    except (OSError, ValueError, EOFError, TypeError):
        return False
    if tag != sys.implementation.cache_tag:
        return False  # made by another interpreter: its .pyc are not ours
    _installed = BundleFinder(bundle)
    sys.meta_path.insert(0, _installed)
    return True


def uninstall() -> None:
    """From now on modules are found as Python always finds them (and the bundle's memory is freed)."""
    global _installed
    if _installed is not None:
        # A new list, not a change to the one another thread's import may be walking.
        sys.meta_path = [finder for finder in sys.meta_path if finder is not _installed]
    _installed = None


def build(statement: str = _BUNDLED, out: str = BUNDLE_FILE) -> int:
    """Run `statement` (imports) and bundle every module it loaded from a
    timestamp-based `.pyc` beside its source, as this interpreter found it;
    returns how many."""
    exec(statement, {})
    bundle: dict[str, Entry] = {}
    for name, module in sorted(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if spec is None or not spec.has_location or not (spec.origin or "").endswith(".py"):
            continue
        try:
            with open(spec.cached or "", "rb") as f:
                pyc = f.read()
        except OSError:
            continue
        if not _current(pyc, spec.origin):
            continue  # hash-based, or stale: left to the path finder
        locations = spec.submodule_search_locations
        bundle[name] = (pyc, spec.origin, locations[0] if locations else "")
    with open(out, "wb") as f:
        marshal.dump((sys.implementation.cache_tag, bundle), f)
    return len(bundle)


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m dockerworker.bundle build")
    count = build()
    print(f"bundled {count} modules of the start path in {BUNDLE_FILE}")
