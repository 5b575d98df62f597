"""reflora-analysis: why LoRA and RefLoRA converge the way they do.

See ``docs/ARCHITECTURE.md`` for the module map and ``../shared/THEORY.md`` for facts F1..F10.
"""

__version__ = "0.1.0"
