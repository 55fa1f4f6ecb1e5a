"""The start path's module bundle: what it serves, when it does not, and that it steps aside for user code."""

from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path


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
    index = tmp_path / "start.bundle"
    _run(tmp_path, f"from dockerworker import bundle\nbundle.build('import bunmod, bunpkg', {str(index)!r})\n")
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
    index = tmp_path / "start.bundle"
    _run(tmp_path, f"from dockerworker import bundle\nbundle.build('import bunmod', {str(index)!r})\n")
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
    index.write_bytes(marshal.dumps(("cpython-27", {"json": ("/nonexistent.pyc", "/nonexistent.py", "")})))
    out = _run(tmp_path, f"from dockerworker import bundle\nprint(bundle.install({str(index)!r}))\n")
    assert out.strip() == "False"
