"""User-facing errors. Each names the file or field, what was wrong, and how to fix it.

The command dispatcher turns them into one `error` event (kind, message, hint) and exit code 2,
before any heavy work where the check allows it.
"""

from __future__ import annotations


class EngineError(Exception):
    kind = "engine"

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  fix: {self.hint}" if self.hint else self.message


class ModelFileError(EngineError):
    kind = "model_file"


class DatasetError(EngineError):
    kind = "dataset"


class OptionError(EngineError):
    kind = "option"


class ConfigError(OptionError, ValueError):
    """An option value that cannot be read or is out of its declared range (command line, run TOML, preset or GUI
    form): names the option or file, the cause and the fix. A ValueError too, for callers that parse values."""


class CacheError(EngineError):
    kind = "cache"


class NumericError(EngineError):
    """NaN or infinite numbers where a result was expected (a diverged training step, a NaN decode)."""
    kind = "numeric"
