"""Build step of the image: the standard library, pika and the runtime in one zip.

Owns: nothing the runtime uses; the Dockerfile runs it once:

    python -m dockerworker.bundle /opt/dockerworker/runtime.zip

and puts the zip first on PYTHONPATH. Why: the start path imports about 250
modules, and through the path finder each costs a stat of its source, an
open and a read of its `.pyc`, and a listing of every package directory: on
an overlay filesystem (fuse-overlayfs here) each of those is a round trip
to a user-space daemon. From a zip (CPython's zipimport) the directory is
read once, and a module is one read at an offset.

What goes in: the modules the start path imports (found by importing it
here), each whole package of theirs (a package loaded from the zip looks
for its submodules only there), as bytecode compiled with the
`unchecked-hash` invalidation mode (nothing is compared at import: the image
is read-only and never changes). Only bytecode: zipimport parses the zip's
directory in Python at every start, so every entry costs; the code objects
name their source files where they are on disk, where tracebacks and
`inspect` find them. Everything else (the rest of the standard library,
extension modules such as `_ssl`, `_asyncio` and orjson, which cannot be
imported from a zip, and the packages only user code imports: requests,
dateutil…) is found on the path after the zip, as before.
"""

from __future__ import annotations

import importlib.util
import py_compile
import sys
import sysconfig
import zipfile
from pathlib import Path

# The packages from site-packages the start path imports (pure Python).
_PACKAGES = ("pika",)
# What the container's command imports before it consumes (the rest of
# `dockerworker.app`'s path is imported lazily: asyncio, pika, messaging).
_START_PATH = (
    "dockerworker.__main__", "dockerworker.app", "dockerworker.messaging", "dockerworker.codefetch",
    "dockerworker.codeload", "asyncio", "pika", "pika.adapters.asyncio_connection",
    "pika.adapters.utils.connection_workflow", "encodings.idna", "json.decoder",
)  # fmt: skip


def main(argv: list[str]) -> int:
    target = Path(argv[0])
    stdlib = Path(sysconfig.get_path("stdlib"))
    # Where modules may come from, and which of each (None: any).
    roots: dict[Path, tuple[str, ...] | None] = {
        stdlib: None,
        Path(sysconfig.get_path("purelib")): _PACKAGES,
        Path(__file__).resolve().parent.parent: ("dockerworker",),
    }
    for name in _START_PATH:
        importlib.import_module(name)
    files: dict[str, Path] = {}
    for name, module in sorted(sys.modules.items()):
        origin = getattr(getattr(module, "__spec__", None), "origin", None)
        if not origin or not origin.endswith(".py"):
            continue  # built in, frozen or an extension module
        root = max((r for r in roots if Path(origin).is_relative_to(r)), key=lambda r: len(r.parts), default=None)
        if root is None:
            continue
        top = Path(origin).relative_to(root).parts[0]
        allowed = roots[root]
        if top in ("site-packages", "dist-packages") or (allowed is not None and top not in allowed):
            continue
        if top.endswith(".py"):
            files[top] = Path(origin)
        else:
            for source in sorted((root / top).rglob("*.py")):
                if "tests" not in source.parts and "test" not in source.parts:
                    files[source.relative_to(root).as_posix()] = source
    with zipfile.ZipFile(target, "w") as archive:
        for member, source in sorted(files.items()):
            code = _compiled(source)
            if code is not None:  # one that does not compile is never imported either
                archive.writestr(_info(member + "c"), code)
    print(f"{target}: {len(files)} modules, {target.stat().st_size // 1024} KiB")
    return 0


def _compiled(source: Path) -> bytes | None:
    """The `.pyc` bytes of `source`, hash-based and never checked, naming `source`."""
    cfile = Path("/tmp") / "dockerworker-bundle.pyc"
    try:
        py_compile.compile(
            str(source),
            cfile=str(cfile),
            doraise=True,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
    except py_compile.PyCompileError:
        return None
    data = cfile.read_bytes()
    cfile.unlink()
    assert data[:4] == importlib.util.MAGIC_NUMBER
    return data


def _info(name: str) -> zipfile.ZipInfo:
    # Stored, not compressed: no inflating at import. A fixed date: the zip
    # is the same for the same sources.
    return zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
