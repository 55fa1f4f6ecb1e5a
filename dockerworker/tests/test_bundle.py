"""The start path's module bundle: what it serves, when it does not, and that it steps aside for user code."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path

from dockerworker import bundle


def _package(root: Path) -> None:
    """A package `bunpkg` (with a submodule) and a module `bunmod`, compiled beside their sources."""
    (root / "bunpkg").mkdir()
    (root / "bunpkg" / "__init__.py").write_text("WHO = 'package'\n")
    (root / "bunpkg" / "sub.py").write_text("WHO = 'sub'\n")
    (root / "bunmod.py").write_text("WHO = 'module'\n")
    for source in (root / "bunpkg" / "__init__.py", root / "bunpkg" / "sub.py", root / "bunmod.py"):
        py_compile.compile(str(source), doraise=True)


def _run(root: Path, script: str) -> str:
    """`script` in a fresh interpreter with `root` and this checkout on its path."""
    checkout = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{checkout}"}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, cwd=root
    ).stdout


def _build(root: Path, statement: str) -> Path:
    """A bundle of what `statement` imports, made in a fresh interpreter; its path."""
    index = root / "start.bundle"
    _run(root, f"from dockerworker import bundle\nbundle.build({statement!r}, {str(index)!r})\n")
    return index


def test_bundled_modules_come_from_their_pyc_with_their_source_as_file(tmp_path: Path) -> None:
    _package(tmp_path)
    index = tmp_path / "start.bundle"
    out = _run(
        tmp_path,
        "from dockerworker import bundle\n"
        f"print(bundle.build('import bunpkg.sub, bunmod', {str(index)!r}))\n",
    )
    assert int(out) >= 3

    out = _run(
        tmp_path,
        "from dockerworker import bundle\n"
        f"assert bundle.install({str(index)!r})\n"
        "import bunpkg.sub, bunmod\n"
        "print(bunpkg.sub.WHO, bunmod.WHO, bunmod.__file__.endswith('bunmod.py'), sorted(bundle.served))\n",
    )
    assert out.split(" ", 3)[:3] == ["sub", "module", "True"]
    assert "'bunmod'" in out and "'bunpkg'" in out and "'bunpkg.sub'" in out


def test_a_module_whose_source_changed_since_is_compiled_from_its_source(tmp_path: Path) -> None:
    _package(tmp_path)
    index = _build(tmp_path, "import bunmod, bunpkg")
    source = tmp_path / "bunmod.py"
    source.write_text("WHO = 'changed since'\n")
    os.utime(source, (source.stat().st_atime, source.stat().st_mtime + 10))

    out = _run(
        tmp_path,
        "import sys; sys.dont_write_bytecode = True\n"
        "from dockerworker import bundle\n"
        f"bundle.install({str(index)!r})\n"
        "import bunmod, bunpkg\n"
        "print(bunmod.WHO, bundle.compiled, bundle.served)\n",
    )
    assert out.strip() == "changed since ['bunmod'] ['bunpkg']"


def test_after_uninstall_a_module_that_shadows_a_bundled_one_wins_as_on_the_path(tmp_path: Path) -> None:
    _package(tmp_path)
    index = _build(tmp_path, "import bunmod")
    user = tmp_path / "user"
    user.mkdir()
    (user / "bunmod.py").write_text("WHO = 'user'\n")

    out = _run(
        tmp_path,
        "import sys\n"
        "from dockerworker import bundle\n"
        f"bundle.install({str(index)!r})\n"
        "bundle.uninstall()\n"
        f"sys.path.insert(0, {str(user)!r})\n"
        "import bunmod\n"
        "print(bunmod.WHO)\n",
    )
    assert out.strip() == "user"


def test_a_bundle_made_by_another_interpreter_is_not_used(tmp_path: Path) -> None:
    import marshal

    index = tmp_path / "start.bundle"
    modules = {"json": (b"", "/nonexistent.py", "")}
    index.write_bytes(marshal.dumps(("cpython-27", modules, {}, frozenset())))
    out = _run(tmp_path, f"from dockerworker import bundle\nprint(bundle.install({str(index)!r}))\n")
    assert out.strip() == "False"


def test_a_module_the_start_path_did_not_find_is_not_looked_for_while_the_bundle_is_installed(tmp_path: Path) -> None:
    _package(tmp_path)
    index = _build(tmp_path, "import bunmod\ntry:\n    import bunabsent\nexcept ImportError:\n    pass")
    # It appears later: the start path does not see it, user code (after uninstall) does.
    (tmp_path / "bunabsent.py").write_text("WHO = 'there now'\n")

    out = _run(
        tmp_path,
        "from dockerworker import bundle\n"
        f"bundle.install({str(index)!r})\n"
        "try:\n"
        "    import bunabsent\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('not found:', exc.name)\n"
        "bundle.uninstall()\n"
        "import bunabsent\n"
        "print(bunabsent.WHO)\n",
    )
    assert out.splitlines() == ["not found: bunabsent", "there now"]


def test_an_extension_module_is_loaded_from_where_the_bundle_says_while_it_is_there(tmp_path: Path) -> None:
    index = _build(tmp_path, "import _decimal")
    # With no directory on the path that holds it, only the bundle can find it.
    out = _run(
        tmp_path,
        "import sys\n"
        "from dockerworker import bundle\n"
        f"bundle.install({str(index)!r})\n"
        "sys.path[:] = [p for p in sys.path if 'lib-dynload' not in p]\n"
        "import _decimal\n"
        "print(type(_decimal.__spec__.loader).__name__, _decimal.__file__ == _decimal.__spec__.origin)\n",
    )
    assert out.strip() == "ExtensionFileLoader True"


def test_an_extension_module_whose_library_is_gone_is_left_to_the_path(tmp_path: Path) -> None:
    import marshal

    index = tmp_path / "start.bundle"
    extensions = {"_decimal": str(tmp_path / "gone.so")}
    index.write_bytes(marshal.dumps((sys.implementation.cache_tag, {}, extensions, frozenset())))
    out = _run(
        tmp_path,
        "from dockerworker import bundle\n"
        f"bundle.install({str(index)!r})\n"
        "import _decimal\n"
        "print(_decimal.__file__ != " + repr(extensions["_decimal"]) + ")\n",
    )
    assert out.strip() == "True"


def test_a_lazy_module_runs_on_first_use(tmp_path: Path) -> None:
    index = _build(tmp_path, "import copy")
    out = _run(
        tmp_path,
        "from dockerworker import bundle\n"
        f"bundle.install({str(index)!r})\n"
        "import copy\n"
        "print('copy' in bundle.served, copy.copy([1]), 'copy' in bundle.served)\n",
    )
    assert out.strip() == "False [1] True"


def test_a_probe_for_a_missing_module_is_not_taken_for_an_import_of_one(tmp_path: Path) -> None:
    statement = "import importlib.util\nimportlib.util.find_spec('bunprobe')\ntry:\n    import bunabsent\nexcept ImportError:\n    pass"
    index = _build(tmp_path, statement)
    out = _run(
        tmp_path,
        "import importlib.util\n"
        "from dockerworker import bundle\n"
        f"bundle.install({str(index)!r})\n"
        "print(sorted(n for n in bundle._installed.bundle.absent if n.startswith('bun')), importlib.util.find_spec('bunprobe'))\n",
    )
    assert out.strip() == "['bunabsent'] None"


def test_the_start_path_and_unpacking_an_archive_leave_the_lazy_modules_unrun(tmp_path: Path) -> None:
    import io
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("main.py", "def process(message):\n    return message\n")
    (tmp_path / "code.zip").write_bytes(archive.getvalue())
    (tmp_path / "code").mkdir()
    index = _build(tmp_path, bundle._BUNDLED)

    out = _run(
        tmp_path,
        "import sys\n"
        "from dockerworker import bundle\n"
        f"bundle.install({str(index)!r})\n"
        f"{bundle.START_PATH}\n"
        "from pathlib import Path\n"
        "from dockerworker import codeload, config\n"
        f"codeload.unpack(Path({str(tmp_path / 'code.zip')!r}).read_bytes(), Path({str(tmp_path / 'code')!r}), config.Limits())\n"
        "print(sorted(n for n in bundle.LAZY if n in bundle.served))\n"
        "print(sorted(n for n in bundle.LAZY if n in sys.modules))\n",
    )
    ran, imported = out.splitlines()
    assert ran == "[]"
    assert imported == str(sorted(bundle.LAZY)), "the start path no longer imports all of bundle.LAZY: the list is out of date"
