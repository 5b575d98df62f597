"""reflora-analysis: why LoRA and RefLoRA converge the way they do.

See ``docs/ARCHITECTURE.md`` for the module map and ``../shared/THEORY.md`` for facts F1..F10.
"""

from importlib.metadata import PackageNotFoundError, version as _distribution_version

try:
    #: the installed distribution's version (``reflora-analysis --version``; recorded in
    #: ``run.meta.json`` and ``figures/index.md``)
    __version__ = _distribution_version("reflora-analysis")
except PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0.1.0"  # keep in step with pyproject.toml's [project] version

del PackageNotFoundError, _distribution_version
