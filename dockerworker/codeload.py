"""Turning a code archive into the user's `process` function.

Owns: the safe unpacking of a zip (size and member-count limits, no absolute
paths, no `..`, no links), the choice of what to call (the SensorBucket
layout's `usercode.process`, or the `module.function` of CODE_ENTRYPOINT),
and the import itself, whose failures become one `CodeInvalid` with a
readable reason (exit code 4) instead of a traceback loop.

The SensorBucket archive also holds `main.py`, written for Fission's Flask
environment; it is never imported: with the default entrypoint `main.main`
and a `usercode.py` present, `usercode.process` is called directly.
"""

from __future__ import annotations

import inspect
import io
import os
import stat
import sys
import traceback
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, NamedTuple

from . import logs
from .config import DEFAULT_ENTRYPOINT, Limits

SENSORBUCKET_MODULE = "usercode"
SENSORBUCKET_FUNCTION = "process"
_COPY_CHUNK = 64 * 1024


class CodeInvalid(Exception):
    """The archive or the code in it cannot be run (exit code 4)."""


class UserCode(NamedTuple):
    """The loaded user function and where it came from."""

    function: Callable[[Any], Any]
    module: str
    function_name: str
    root: Path

    @property
    def entrypoint(self) -> str:
        return f"{self.module}.{self.function_name}"


def unpack(archive: bytes, dest: Path, limits: Limits) -> Path:
    """Extract `archive` into the empty directory `dest`; return the code root."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            members = _checked_members(zf, limits)
            budget = limits.max_unpacked_bytes
            for info in members:
                budget = _extract_member(zf, info, dest, budget)
    except zipfile.BadZipFile as exc:
        raise CodeInvalid(f"code archive is not a valid zip: {exc}") from exc
    except (RuntimeError, NotImplementedError, zipfile.LargeZipFile) as exc:
        # Encrypted members and unsupported compression land here.
        raise CodeInvalid(f"code archive cannot be extracted: {exc}") from exc
    return _code_root(dest)


def load_archive(
    archive: bytes, code_dir: str, entrypoint: str, limits: Limits, subdir: str | None = None
) -> UserCode:
    """Unpack a downloaded archive into a fresh directory under `code_dir`
    (named `subdir`, when the path must be known in advance) and load it."""
    os.makedirs(code_dir, exist_ok=True)
    if subdir is None:
        dest = _fresh_dir(code_dir)
    else:
        dest = Path(code_dir) / subdir
        dest.mkdir(mode=0o700)
    return load_directory(unpack(archive, dest, limits), entrypoint)


def _fresh_dir(parent: str) -> Path:
    """A new directory `code-<random>` under `parent`, private to this user
    (what tempfile.mkdtemp makes, without importing tempfile, shutil, random
    and the compressors they bring into every container's start)."""
    while True:
        path = Path(parent) / f"code-{os.urandom(6).hex()}"
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:
            continue


def load_path(path: str, entrypoint: str, limits: Limits, work_dir: str) -> UserCode:
    """Load code for the local harness: a .py file, a directory, or a zip."""
    source = Path(path)
    if source.is_dir():
        return load_directory(source, entrypoint)
    if source.suffix == ".zip":
        return load_archive(source.read_bytes(), work_dir, entrypoint, limits)
    if source.suffix == ".py" and source.is_file():
        return _load_single_file(source, entrypoint, work_dir)
    raise CodeInvalid(f"{path} is not a .py file, a directory or a .zip")


def load_directory(root: Path, entrypoint: str) -> UserCode:
    """Import the entrypoint from an unpacked code directory."""
    module, function_name = resolve_entrypoint(root, entrypoint)
    imported = _import(root, module)
    function = getattr(imported, function_name, None)
    if function is None:
        raise CodeInvalid(f"{module} defines no '{function_name}' function")
    _check_callable(function, f"{module}.{function_name}")
    return UserCode(function=function, module=module, function_name=function_name, root=root)


def resolve_entrypoint(root: Path, entrypoint: str) -> tuple[str, str]:
    """Which module and function to call, given the files present."""
    if entrypoint == DEFAULT_ENTRYPOINT and (root / f"{SENSORBUCKET_MODULE}.py").is_file():
        return SENSORBUCKET_MODULE, SENSORBUCKET_FUNCTION
    module, _, function_name = entrypoint.rpartition(".")
    return module, function_name


def _checked_members(zf: zipfile.ZipFile, limits: Limits) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    if len(members) > limits.max_members:
        raise CodeInvalid(f"code archive has {len(members)} members, more than the limit of {limits.max_members}")
    declared = sum(info.file_size for info in members)
    if declared > limits.max_unpacked_bytes:
        raise CodeInvalid(f"code archive unpacks to {declared} bytes, more than the limit of {limits.max_unpacked_bytes}")
    for info in members:
        _check_member_name(info)
    return members


def _check_member_name(info: zipfile.ZipInfo) -> None:
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (parts and ":" in parts[0]):
        raise CodeInvalid(f"code archive member {info.filename!r} has an absolute path")
    if ".." in parts:
        raise CodeInvalid(f"code archive member {info.filename!r} escapes the code directory")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise CodeInvalid(f"code archive member {info.filename!r} is a symbolic link")


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, budget: int) -> int:
    target = dest.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
    # Belt and braces behind the name check: the final path must stay inside.
    if not target.resolve().is_relative_to(dest.resolve()):
        raise CodeInvalid(f"code archive member {info.filename!r} escapes the code directory")
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return budget
    target.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(target, "wb") as out:
        budget = _copy_within_budget(src, out, budget, info.filename)
    return budget


def _copy_within_budget(src: Any, out: Any, budget: int, name: str) -> int:
    # The sizes in a zip's headers can lie; count what is really written.
    while chunk := src.read(_COPY_CHUNK):
        budget -= len(chunk)
        if budget < 0:
            raise CodeInvalid(f"code archive member {name!r} unpacks past the size limit")
        out.write(chunk)
    return budget


def _code_root(dest: Path) -> Path:
    # An archive made by zipping a folder has everything one level down.
    entries = [entry for entry in dest.iterdir() if entry.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and not any(dest.glob("*.py")):
        return entries[0]
    return dest


def _load_single_file(source: Path, entrypoint: str, work_dir: str) -> UserCode:
    # Copied so the directory it sits in does not land on sys.path.
    import shutil

    root = _fresh_dir(work_dir)
    shutil.copy(source, root / source.name)
    function_name = SENSORBUCKET_FUNCTION if entrypoint == DEFAULT_ENTRYPOINT else entrypoint.rpartition(".")[2]
    return load_directory(root, f"{source.stem}.{function_name}")


def _import(root: Path, module: str) -> Any:
    if not _module_file(root, module):
        present = sorted(path.name for path in root.iterdir())
        raise CodeInvalid(f"module '{module}' not found in the code (files: {', '.join(present) or 'none'})")
    _activate(root)
    with logs.capture() as output:
        try:
            imported = __import__(module, fromlist=["_"])
        except SyntaxError as exc:
            raise CodeInvalid(f"syntax error in {_relative(exc.filename, root)} line {exc.lineno}: {exc.msg}") from exc
        except (Exception, SystemExit) as exc:
            raise CodeInvalid(f"importing '{module}' failed:\n{traceback.format_exc()}") from exc
        finally:
            _log_import_output(module, output.getvalue())
    return imported


def _module_file(root: Path, module: str) -> Path | None:
    relative = Path(*module.split("."))
    for candidate in (root / relative.with_suffix(".py"), root / relative / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _activate(root: Path) -> None:
    """Put `root` first on sys.path, replacing the code root loaded before it.

    Only matters when one process loads code twice (the test suite, the
    harness); modules imported from an earlier root are forgotten so the new
    code's modules of the same name are really imported.
    """
    sys.dont_write_bytecode = True  # the root filesystem is read-only in the container
    for old_root in _loaded_roots:
        if old_root in sys.path:
            sys.path.remove(old_root)
        for name, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(old_root + os.sep):
                del sys.modules[name]
    _loaded_roots[:] = [str(root)]
    sys.path.insert(0, str(root))


_loaded_roots: list[str] = []


def _check_callable(function: Any, name: str) -> None:
    if not callable(function):
        raise CodeInvalid(f"{name} is not a function")
    try:
        inspect.signature(function).bind(object())
    except TypeError:
        raise CodeInvalid(f"{name} must take exactly one argument, the message") from None
    except ValueError:
        pass  # builtins without a signature: let the first call tell


def _log_import_output(module: str, output: str) -> None:
    if output:
        logs.event("user_output", phase="import", module=module, output=logs.clip(output))


def _relative(filename: str | None, root: Path) -> str:
    if not filename:
        return "<unknown file>"
    try:
        return str(Path(filename).relative_to(root))
    except ValueError:
        return filename
