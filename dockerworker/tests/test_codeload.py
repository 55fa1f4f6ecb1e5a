"""Code loading: both layouts, unsafe and broken archives, broken code."""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from dockerworker.codeload import CodeInvalid, load_archive, load_path, resolve_entrypoint, unpack
from dockerworker.config import DEFAULT_ENTRYPOINT, Limits

from .support import FLASK_MAIN, sensorbucket_zip, zip_bytes


def load(tmp_path: Path, archive: bytes, entrypoint: str = DEFAULT_ENTRYPOINT, limits: Limits = Limits()):
    return load_archive(archive, str(tmp_path / "code"), entrypoint, limits)


def test_sensorbucket_layout_calls_usercode_process_and_never_imports_the_flask_main(tmp_path):
    code = load(tmp_path, sensorbucket_zip("def process(msg):\n    return ('usercode', msg)\n"))

    assert code.entrypoint == "usercode.process"
    assert code.function("m") == ("usercode", "m")


def test_a_plain_module_is_loaded_by_its_entrypoint(tmp_path):
    archive = zip_bytes({"handler.py": "def handle(msg):\n    return msg * 2\n"})

    code = load(tmp_path, archive, "handler.handle")

    assert code.function(21) == 42


def test_default_entrypoint_without_usercode_loads_main_main(tmp_path):
    code = load(tmp_path, zip_bytes({"main.py": "def main(msg):\n    return 'main'\n"}))

    assert code.entrypoint == "main.main"
    assert code.function(None) == "main"


def test_an_explicit_entrypoint_wins_over_the_sensorbucket_layout(tmp_path):
    archive = zip_bytes({"usercode.py": "def process(m):\n    return 1\n", "other.py": "def run(m):\n    return 2\n"})

    assert load(tmp_path, archive, "other.run").function(None) == 2


def test_user_code_can_import_its_sibling_modules(tmp_path):
    archive = zip_bytes(
        {"usercode.py": "from helpers import double\n\ndef process(m):\n    return double(m)\n", "helpers.py": "def double(x):\n    return 2 * x\n"}
    )

    assert load(tmp_path, archive).function(4) == 8


def test_a_second_load_in_one_process_gets_the_new_code(tmp_path):
    load(tmp_path, sensorbucket_zip("def process(m):\n    return 'old'\n"))

    assert load(tmp_path, sensorbucket_zip("def process(m):\n    return 'new'\n")).function(None) == "new"


def test_an_archive_of_a_zipped_folder_is_loaded_from_inside_the_folder(tmp_path):
    archive = zip_bytes({"myworker/usercode.py": "def process(m):\n    return 'nested'\n", "myworker/main.py": FLASK_MAIN})

    assert load(tmp_path, archive).function(None) == "nested"


def test_the_main_py_of_the_sensorbucket_archive_is_never_imported(tmp_path):
    archive = sensorbucket_zip("def process(m):\n    return m\n")
    assert "flask" in zipfile.ZipFile(io.BytesIO(archive)).read("main.py").decode()

    load(tmp_path, archive)  # would raise ModuleNotFoundError: flask if main.py were imported


@pytest.mark.parametrize(
    "archive, reason",
    [
        (b"definitely not a zip", "not a valid zip"),
        (zip_bytes({"../evil.py": "x = 1\n"}), "escapes the code directory"),
        (zip_bytes({"a/../../evil.py": "x = 1\n"}), "escapes the code directory"),
        (zip_bytes({"/etc/evil.py": "x = 1\n"}), "absolute path"),
        (zip_bytes({"C:/evil.py": "x = 1\n"}), "absolute path"),
        (zip_bytes({"..\\evil.py": "x = 1\n"}), "escapes the code directory"),
    ],
    ids=["not-a-zip", "dot-dot", "nested-dot-dot", "absolute", "drive-letter", "backslash-dot-dot"],
)
def test_unsafe_or_broken_archives_are_refused(tmp_path, archive, reason):
    with pytest.raises(CodeInvalid, match=reason):
        load(tmp_path, archive)
    assert not (tmp_path / "evil.py").exists()
    assert not (tmp_path.parent / "evil.py").exists()


def test_symbolic_links_in_the_archive_are_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("usercode.py")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")

    with pytest.raises(CodeInvalid, match="symbolic link"):
        load(tmp_path, buffer.getvalue())


def test_too_many_members_are_refused(tmp_path):
    archive = zip_bytes({f"m{i}.py": "" for i in range(11)})

    with pytest.raises(CodeInvalid, match="11 members"):
        load(tmp_path, archive, limits=Limits(max_members=10))


def test_an_archive_that_unpacks_past_the_size_limit_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("usercode.py", "#" * 100_000)  # compresses to a few hundred bytes

    with pytest.raises(CodeInvalid, match="size limit|more than the limit"):
        load(tmp_path, buffer.getvalue(), limits=Limits(max_unpacked_bytes=10_000))


def test_a_size_lie_in_the_zip_headers_is_caught_while_extracting(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("usercode.py", "#" * 5000)
    # Make the central directory claim a tiny size; the real data is larger.
    data = bytearray(buffer.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("usercode.py")
    central = data.rfind(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")  # uncompressed size

    with pytest.raises(CodeInvalid):
        unpack(bytes(data), dest, Limits(max_unpacked_bytes=100))
    assert info.file_size == 5000


def test_a_syntax_error_is_reported_with_file_and_line(tmp_path):
    with pytest.raises(CodeInvalid, match=r"syntax error in usercode.py line 2"):
        load(tmp_path, sensorbucket_zip("def process(msg):\n    return msg +\n"))


def test_code_without_process_is_refused(tmp_path):
    with pytest.raises(CodeInvalid, match="defines no 'process' function"):
        load(tmp_path, sensorbucket_zip("def proces(msg):\n    return msg\n"))


def test_a_process_that_is_not_a_function_is_refused(tmp_path):
    with pytest.raises(CodeInvalid, match="is not a function"):
        load(tmp_path, sensorbucket_zip("process = 42\n"))


def test_a_process_with_the_wrong_arity_is_refused(tmp_path):
    with pytest.raises(CodeInvalid, match="exactly one argument"):
        load(tmp_path, sensorbucket_zip("def process():\n    return None\n"))


def test_an_import_that_raises_is_reported_with_its_traceback(tmp_path):
    with pytest.raises(CodeInvalid, match="(?s)importing 'usercode' failed.*ModuleNotFoundError"):
        load(tmp_path, sensorbucket_zip("import no_such_module_here\n\ndef process(m):\n    return m\n"))


def test_an_import_that_exits_is_reported_not_obeyed(tmp_path):
    with pytest.raises(CodeInvalid, match="SystemExit"):
        load(tmp_path, sensorbucket_zip("import sys\nsys.exit(3)\n"))


def test_a_missing_entrypoint_module_lists_what_is_there(tmp_path):
    with pytest.raises(CodeInvalid, match="module 'worker' not found.*handler.py"):
        load(tmp_path, zip_bytes({"handler.py": "def run(m):\n    return m\n"}), "worker.run")


def test_resolve_entrypoint_prefers_usercode_only_for_the_default(tmp_path):
    (tmp_path / "usercode.py").write_text("")

    assert resolve_entrypoint(tmp_path, "main.main") == ("usercode", "process")
    assert resolve_entrypoint(tmp_path, "pkg.mod.fn") == ("pkg.mod", "fn")


def test_load_path_accepts_a_file_a_directory_and_a_zip(tmp_path):
    single = tmp_path / "transform.py"
    single.write_text("def process(m):\n    return 'file'\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "usercode.py").write_text("def process(m):\n    return 'dir'\n")
    archive = tmp_path / "code.zip"
    archive.write_bytes(sensorbucket_zip("def process(m):\n    return 'zip'\n"))
    work = tmp_path / "work"
    work.mkdir()

    results = [load_path(str(path), DEFAULT_ENTRYPOINT, Limits(), str(work)).function(None) for path in (single, folder, archive)]

    assert results == ["file", "dir", "zip"]
