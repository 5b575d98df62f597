"""Files that are never half-written, and logs that are never lost.

Two guarantees, used by training, figures and indexes alike:

* **Atomic replace.** ``atomic_write_*`` write to a temporary file in the *same directory*
  as the target, ``fsync`` it, then ``os.replace`` it onto the target (atomic on POSIX and
  Windows for files on one filesystem) and ``fsync`` the directory where the platform
  allows. A reader therefore sees either the complete old file or the complete new one;
  if anything fails before the rename, the old file is left untouched and the temporary
  file is removed.
* **Append and flush.** :class:`JsonLinesWriter` appends one JSON object per line and
  flushes (and by default ``fsync``\\ s) after each line, so a process killed at any moment
  keeps every line it had logged. :func:`read_json_lines` tolerates a torn last line
  (a kill in the middle of a write) by ignoring it, and :func:`truncate_json_lines`
  rewrites a log atomically keeping only the lines a predicate accepts (used on resume).

Two conventions make the files portable and stable:

* **Standard JSON.** Non-finite floats (a diverged loss) are written as the strings
  ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (:data:`NONFINITE_STRINGS`), so strict parsers
  (``jq``, JavaScript, ``json.loads(..., parse_constant=...)`` with rejection) read every file;
  :func:`read_json`, :func:`read_json_lines` and :func:`decode_nonfinite` turn them back into
  floats, and also read older files that hold bare ``NaN`` / ``Infinity``.
* **Stable data files.** :func:`atomic_write_json` and :func:`write_csv_atomic` round floats to
  :data:`DATA_SIGNIFICANT_DIGITS` significant digits, so an unchanged result re-computed with a
  different summation order (threads, BLAS kernels) is an unchanged file. Training logs
  (:class:`JsonLinesWriter`) keep full precision: resuming is checked bit for bit.

Example
-------
>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> atomic_write_json(d / "cfg.json", {"lr": 0.1})
>>> with JsonLinesWriter(d / "run.jsonl") as log:
...     log.write({"step": 0, "loss": 1.0})
>>> read_json_lines(d / "run.jsonl")
[{'step': 0, 'loss': 1.0}]
"""

from __future__ import annotations

import csv
import io
import json
import os
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "write_csv_atomic",
    "atomic_save_torch",
    "JsonLinesWriter",
    "read_json_lines",
    "truncate_json_lines",
    "to_jsonable",
    "round_significant",
    "decode_nonfinite",
    "read_json",
    "DATA_SIGNIFICANT_DIGITS",
    "NONFINITE_STRINGS",
]

# 10 significant digits: far below any tolerance a figure or a test reads (the smallest
# quantities we plot, consistency spreads ~1e-15, keep 10 digits of their own), and far above
# the 1e-16 relative noise of a different summation order, so reruns give identical files.
DATA_SIGNIFICANT_DIGITS = 10

NONFINITE_STRINGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write: Callable[[Any], None], *, binary: bool) -> None:
    """Run ``write(fileobj)`` on a temp file next to ``path``, then rename it onto ``path``."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot write {target}: directory {directory} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        mode = "wb" if binary else "w"
        kwargs = {} if binary else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kwargs) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if target.exists():
            # keep the permissions a user gave the old file instead of mkstemp's 0600
            os.chmod(tmp_name, target.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir + fsync + rename)."""
    _atomic_write(path, lambda fh: fh.write(data), binary=True)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; the old file survives any failure."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    _atomic_write(path, lambda fh: fh.write(text), binary=False)


def _encode_float(value: float, digits: int | None) -> float | str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return round_significant(value, digits) if digits is not None else value


def round_significant(value: float, digits: int = DATA_SIGNIFICANT_DIGITS) -> float:
    """``value`` rounded to ``digits`` significant digits (non-finite values unchanged).

    Decimal rounding through ``format(value, ".{digits}g")``: the result is the float nearest
    to a ``digits``-digit decimal, so it prints as at most ``digits`` digits.
    """
    if not math.isfinite(value) or value == 0:
        return value
    return float(format(value, f".{digits}g"))


def to_jsonable(value: Any, *, digits: int | None = None) -> Any:
    """Convert tensors, numpy scalars/arrays, paths and tuples to plain, standard JSON values.

    Non-finite floats become the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (standard
    JSON has no such numbers; :func:`decode_nonfinite` reverses it). With ``digits``, finite
    floats are rounded to that many significant digits (:func:`round_significant`).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return _encode_float(value, digits)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, digits=digits) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v, digits=digits) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)  # torch / numpy scalars
    tolist = getattr(value, "tolist", None)
    if tolist is not None and getattr(value, "ndim", 0) > 0:
        return to_jsonable(tolist(), digits=digits)
    if item is not None:
        return to_jsonable(item(), digits=digits)
    if type(value).__module__.startswith("torch"):  # torch.dtype, torch.device
        return str(value)
    raise TypeError(f"cannot convert {type(value).__name__} to JSON")


def decode_nonfinite(value: Any) -> Any:
    """Inverse of the non-finite encoding: ``"NaN"``/``"Infinity"``/``"-Infinity"`` -> floats."""
    if isinstance(value, str):
        return NONFINITE_STRINGS.get(value, value)
    if isinstance(value, dict):
        return {k: decode_nonfinite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_nonfinite(v) for v in value]
    return value


def _dumps(obj: Any, indent: int | None, digits: int | None = None) -> str:
    # allow_nan=False: a non-finite float that escaped the encoding is a bug, not a file
    return json.dumps(to_jsonable(obj, digits=digits), indent=indent, allow_nan=False,
                      sort_keys=False)


def _loads(text: str) -> Any:
    return decode_nonfinite(json.loads(text))  # json.loads also reads old bare NaN/Infinity


def read_json(path) -> Any:
    """Read a JSON file written by this module (or an older one with bare ``NaN``)."""
    return _loads(Path(path).read_text(encoding="utf-8"))


def atomic_write_json(path, obj: Any, *, indent: int | None = 2,
                      digits: int | None = DATA_SIGNIFICANT_DIGITS) -> None:
    """Write ``obj`` as standard JSON (see :func:`to_jsonable`) to ``path`` atomically.

    Floats are rounded to ``digits`` significant digits (``None``: full precision).
    """
    text = _dumps(obj, indent, digits) + "\n"  # serialise first: a bad object never touches the file
    atomic_write_text(path, text)


def _csv_field(value: Any, digits: int | None) -> Any:
    if getattr(value, "ndim", None) == 0:  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float):  # CSV keeps nan / inf as the words pandas and numpy read
        return round_significant(value, digits) if digits is not None else value
    if isinstance(value, str):
        return value
    return to_jsonable(value, digits=digits)


def write_csv_atomic(path, header: Sequence[str], rows: Iterable[Sequence[Any]], *,
                     digits: int | None = DATA_SIGNIFICANT_DIGITS) -> None:
    """Write a CSV file (``header`` then ``rows``) atomically.

    Every row must have ``len(header)`` fields; a bad row raises ``ValueError`` and leaves
    any existing file unchanged. Floats are rounded to ``digits`` significant digits.
    """
    header = list(header)
    if not header:
        raise ValueError("write_csv_atomic: header must name at least one column")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for i, row in enumerate(rows):
        row = list(row)
        if len(row) != len(header):
            raise ValueError(f"write_csv_atomic: row {i} has {len(row)} fields, header has {len(header)}")
        writer.writerow([_csv_field(v, digits) for v in row])
    atomic_write_text(path, buffer.getvalue())


def atomic_save_torch(path, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically: a killed process never leaves a torn checkpoint."""
    import torch  # local: io stays importable (and fast) without torch for figures-only use

    def write(fh):
        torch.save(obj, fh)

    _atomic_write(path, write, binary=True)


def _drop_torn_last_line(path: Path) -> None:
    """Truncate ``path`` after its last newline (no-op if missing, empty or complete)."""
    if not path.exists():
        return
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        block, end = 4096, size
        keep = 0
        while end > 0:  # scan backwards for the last complete line
            start = max(0, end - block)
            fh.seek(start)
            chunk = fh.read(end - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())


class JsonLinesWriter:
    """Append JSON objects to a ``.jsonl`` file, one per line, flushed as they come.

    Parameters
    ----------
    path : file to append to (created if missing; its directory must exist).
    fsync : also ``os.fsync`` after each line (default True): survives a power cut, not
        only a killed process. Costs ~a millisecond per line on most disks.

    If the file does not end with a newline (a line torn by a killed writer), that partial
    line is removed first: it was never a complete record, and the next record must start
    on its own line.
    """

    def __init__(self, path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {self.path}: directory {self.path.parent} does not exist")
        self._fsync = fsync
        _drop_torn_last_line(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def _flush(self) -> None:
        self._fh.flush()
        if self._fsync:
            os.fsync(self._fh.fileno())

    def write(self, record: dict) -> None:
        """Append ``record`` as one JSON line and flush it to disk."""
        if self._fh.closed:
            raise ValueError(f"JsonLinesWriter for {self.path} is closed")
        self._fh.write(_dumps(record, None) + "\n")
        self._flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "JsonLinesWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_json_lines(path) -> list[dict]:
    """Records of a JSON-lines file; a torn (unparseable) *last* line is ignored.

    A bad line anywhere else means the file was not written by :class:`JsonLinesWriter`
    and raises ``ValueError`` naming the line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such JSON-lines file: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(_loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # the writer was killed mid-line
            raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return records


def truncate_json_lines(path, keep: Callable[[dict], bool]) -> list[dict]:
    """Atomically rewrite ``path`` with only the records for which ``keep(record)`` holds.

    Returns the kept records. Used on resume to drop lines logged after the last
    checkpoint (they will be logged again), so no step is duplicated.
    """
    kept = [r for r in read_json_lines(path) if keep(r)]
    atomic_write_text(path, "".join(_dumps(r, None) + "\n" for r in kept))
    return kept
