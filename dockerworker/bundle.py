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
module (docs/benchmarks.md, "The start path"). The bundle also names where
the start path's extension modules are, and which modules it looked for and
did not find (the standard library's optional ones: `nt`, `_winapi`, …), so
that neither costs a search of every `sys.path` directory either.

Architecture Invariant: a module is served from the bundle only if its
source still has the modification time and size its `.pyc` was compiled
from, the rule Python itself applies to a `.pyc` (`stat` of the source);
otherwise it is compiled from that source. An extension module is loaded
from where the bundle says only while that file is there. A module an
`import` of the start path did not find when the image was built is not
looked for again while the finder is installed: those are the standard
library's imports of other platforms' modules (`nt`, `_winapi`), which a
Linux image does not gain. The finder only serves modules
the bundle names, and only while the runtime starts: `app` uninstalls it
before user code is imported, so user code imports exactly as Python always
does (its own modules shadow what they shadow). It is installed for the
container's command only (`__main__`), not for `run-once`, try mode or the
tools.
"""

# This module and `__main__` are imported before the finder is installed,
# from sys.path as every module is without it: they import only what the
# interpreter has loaded before them (no `typing`, no `from __future__`).
import marshal
import os
import sys
from importlib.machinery import ExtensionFileLoader, ModuleSpec

TYPE_CHECKING = False  # typing's, without importing typing (mypy takes it as True)
if TYPE_CHECKING:
    from importlib.abc import Loader
    from typing import Any, Sequence

    _LoaderBase = Loader
else:
    _LoaderBase = object

BUNDLE_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "start.bundle")
# What the runtime imports before it consumes (user code aside); the
# benchmarks time it as a floor of their own.
START_PATH = "import dockerworker.__main__, dockerworker.app, dockerworker.messaging"
# Bundled: that, and the codec a broker's host name is resolved with at connect.
_BUNDLED = START_PATH + ", encodings.idna"

# Modules the start path imports and does not use: served lazily
# (importlib.util.LazyLoader), their code runs on first use, if ever.
LAZY = frozenset({
    "bz2", "lzma",  # zipfile's and shutil's other compression methods (archives are deflated)
    "shutil",       # zipfile's own extraction (codeload extracts by itself)
    "copy",         # dataclasses' asdict/replace (orjson imports dataclasses)
})  # fmt: skip
# Only modules no thread of the runtime uses: in 3.11 a lazy module's first
# use takes no lock, and a second thread using it meanwhile finds it half
# run (3.12 added the lock). So not `calendar` (pamqp's timestamps, on the
# reactor's thread), `ipaddress` (urllib.parse's IPv6 hosts, in every
# thread that parses a URL) or `textwrap` (traceback's exception groups),
# though the start path imports them unused too. And only a module the
# start path imports once stays unrun: a second `import` statement looks at
# the module's `__spec__`, which runs it (`tokenize`, which linecache and
# inspect both import, cannot be lazy).

# One entry: the .pyc's bytes, the source's path, the package's directory ("" for a module).
Entry = tuple[bytes, str, str]


class Bundle:
    """What `build` found the start path to import, by module name."""

    __slots__ = ("modules", "extensions", "absent")

    def __init__(self, modules: "dict[str, Entry]", extensions: "dict[str, str]", absent: "frozenset[str]") -> None:
        self.modules = modules
        # Extension modules: the path of each one's shared library.
        self.extensions = extensions
        # Modules it looked for and found nowhere.
        self.absent = absent

# The modules served from the bundle, and those compiled from their source
# because it changed since the bundle was made (read by
# `tools.startbench.bytecode_check` and the tests).
served: list[str] = []
compiled: list[str] = []


class _BundleLoader(_LoaderBase):
    """Loads a module from its bundled `.pyc`, or from its source if that changed."""

    def __init__(self, fullname: str, entry: "Entry") -> None:
        self.name = fullname
        self.pyc, self.path, self.package_dir = entry

    def create_module(self, spec: ModuleSpec) -> None:
        return None  # the default module

    def exec_module(self, module: "Any") -> None:
        exec(self.get_code(self.name), module.__dict__)

    def is_package(self, fullname: str) -> bool:
        return bool(self.package_dir)

    def get_filename(self, fullname: str | None = None) -> str:
        return self.path

    def get_source(self, fullname: str) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def get_code(self, fullname: str) -> "Any":
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

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    def find_spec(self, fullname: str, path: "Sequence[str] | None" = None, target: "Any" = None) -> ModuleSpec | None:
        entry = self.bundle.modules.get(fullname)
        if entry is None:
            return self._other_spec(fullname)
        loader = _BundleLoader(fullname, entry)
        served_by: "Loader" = loader
        if fullname in LAZY:
            # (Imported where it is needed: `python -m` has imported it already.)
            from importlib.util import LazyLoader

            served_by = LazyLoader(loader)
        spec = ModuleSpec(fullname, served_by, origin=loader.path, is_package=bool(loader.package_dir))
        if loader.package_dir:
            spec.submodule_search_locations = [loader.package_dir]
        spec.has_location = True
        return spec

    def _other_spec(self, fullname: str) -> ModuleSpec | None:
        """An extension module's spec, or ModuleNotFoundError for one the start path
        never found; None (the path finder's turn) for anything else."""
        if fullname in self.bundle.absent:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        library = self.bundle.extensions.get(fullname)
        if library is None or not os.path.isfile(library):
            return None
        spec = ModuleSpec(fullname, ExtensionFileLoader(fullname, library), origin=library)
        spec.has_location = True
        return spec


class _Absent:
    """Last on `sys.meta_path` while `build` runs: notes each module an
    `import` looked for and no finder found. A probe (`importlib.util.find_spec`,
    which answers None for a missing module) is not noted: the finder would
    raise for it instead."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def find_spec(self, fullname: str, path: "Sequence[str] | None" = None, target: "Any" = None) -> None:
        # The import system's frames: this, its `_find_spec`, and the
        # caller of that, which is `_find_and_load_unlocked` for an import.
        if sys._getframe(2).f_code.co_name == "_find_and_load_unlocked":
            self.names.add(fullname)


_installed: BundleFinder | None = None


def install(bundle_file: str = BUNDLE_FILE) -> bool:
    """Put the bundle's finder first on `sys.meta_path`; False (and nothing done) without a bundle."""
    global _installed
    try:
        with open(bundle_file, "rb") as f:
            tag, modules, extensions, absent = marshal.load(f)
    except (OSError, ValueError, EOFError, TypeError):
        return False
    if tag != sys.implementation.cache_tag:
        return False  # made by another interpreter: its .pyc are not ours
    _installed = BundleFinder(Bundle(modules, extensions, absent))
    sys.meta_path.insert(0, _installed)
    return True


def uninstall() -> None:
    """From now on modules are found as Python always finds them (and the bundle is let go, but
    for the bytes of the lazy modules not run yet)."""
    global _installed
    if _installed is not None:
        # A new list, not a change to the one another thread's import may be walking.
        sys.meta_path = [finder for finder in sys.meta_path if finder is not _installed]
    _installed = None


def build(statement: str = _BUNDLED, out: str = BUNDLE_FILE) -> int:
    """Run `statement` (imports) and bundle every module it loaded from a
    timestamp-based `.pyc` beside its source, as this interpreter found it,
    where its extension modules are, and what it looked for in vain;
    returns how many modules are bundled."""
    absent = _Absent()
    sys.meta_path.append(absent)
    try:
        exec(statement, {})
    finally:
        sys.meta_path.remove(absent)
    bundle: dict[str, Entry] = {}
    extensions: dict[str, str] = {}
    for name, module in sorted(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if spec is not None and isinstance(spec.loader, ExtensionFileLoader):
            if spec.origin and not spec.submodule_search_locations:
                extensions[name] = spec.origin
            continue
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
        marshal.dump((sys.implementation.cache_tag, bundle, extensions, frozenset(absent.names - set(sys.modules))), f)
    return len(bundle)


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        sys.exit("usage: python -m dockerworker.bundle build")
    count = build()
    print(f"bundled {count} modules of the start path in {BUNDLE_FILE}")
