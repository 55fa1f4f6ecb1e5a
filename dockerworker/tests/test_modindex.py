"""The start path's module index: what it serves, and that it steps aside for user code."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path


def _package(root: Path) -> None:
    """A package `idxpkg` (with a submodule) and a module `idxmod`, compiled beside their sources."""
    (root / "idxpkg").mkdir()
    (root / "idxpkg" / "__init__.py").write_text("WHO = 'package'\n")
    (root / "idxpkg" / "sub.py").write_text("WHO = 'sub'\n")
    (root / "idxmod.py").write_text("WHO = 'module'\n")
    for source in (root / "idxpkg" / "__init__.py", root / "idxpkg" / "sub.py", root / "idxmod.py"):
        py_compile.compile(str(source), doraise=True)


def _run(root: Path, script: str) -> str:
    """`script` in a fresh interpreter with `root` and this checkout on its path."""
    checkout = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{checkout}"}
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, cwd=root
    ).stdout


def test_indexed_modules_come_from_their_pyc_with_their_source_as_file(tmp_path: Path) -> None:
    _package(tmp_path)
    index = tmp_path / "modules.index"
    out = _run(
        tmp_path,
        "from dockerworker import modindex\n"
        f"print(modindex.build('import idxpkg.sub, idxmod', {str(index)!r}))\n",
    )
    assert int(out) >= 3

    out = _run(
        tmp_path,
        "from dockerworker import modindex\n"
        f"assert modindex.install({str(index)!r})\n"
        "import idxpkg.sub, idxmod\n"
        "print(idxpkg.sub.WHO, idxmod.WHO, idxmod.__file__.endswith('idxmod.py'), sorted(modindex.served))\n",
    )
    assert out.split(" ", 3)[:3] == ["sub", "module", "True"]
    assert "'idxmod'" in out and "'idxpkg'" in out and "'idxpkg.sub'" in out


def test_a_module_whose_pyc_is_gone_is_compiled_from_its_source(tmp_path: Path) -> None:
    _package(tmp_path)
    index = tmp_path / "modules.index"
    _run(tmp_path, f"from dockerworker import modindex\nmodindex.build('import idxmod', {str(index)!r})\n")
    for pyc in (tmp_path / "__pycache__").glob("idxmod*.pyc"):
        pyc.unlink()

    out = _run(
        tmp_path,
        "import sys; sys.dont_write_bytecode = True\n"
        "from dockerworker import modindex\n"
        f"modindex.install({str(index)!r})\n"
        "import idxmod\n"
        "print(idxmod.WHO, modindex.compiled)\n",
    )
    assert out.strip() == "module ['idxmod']"


def test_after_uninstall_a_module_that_shadows_an_indexed_one_wins_as_on_the_path(tmp_path: Path) -> None:
    _package(tmp_path)
    index = tmp_path / "modules.index"
    _run(tmp_path, f"from dockerworker import modindex\nmodindex.build('import idxmod', {str(index)!r})\n")
    user = tmp_path / "user"
    user.mkdir()
    (user / "idxmod.py").write_text("WHO = 'user'\n")

    out = _run(
        tmp_path,
        "import sys\n"
        "from dockerworker import modindex\n"
        f"modindex.install({str(index)!r})\n"
        "modindex.uninstall()\n"
        f"sys.path.insert(0, {str(user)!r})\n"
        "import idxmod\n"
        "print(idxmod.WHO)\n",
    )
    assert out.strip() == "user"


def test_an_index_made_by_another_interpreter_is_not_used(tmp_path: Path) -> None:
    import marshal

    index = tmp_path / "modules.index"
    index.write_bytes(marshal.dumps(("cpython-27", {"json": ("/nonexistent.pyc", "/nonexistent.py", "")})))
    out = _run(tmp_path, f"from dockerworker import modindex\nprint(modindex.install({str(index)!r}))\n")
    assert out.strip() == "False"
