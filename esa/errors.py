"""User-facing errors: one line that names the fix (the CLI exits 2 on these)."""


class EsaError(Exception):
    """Base for every error esa raises on bad input or environment."""


class ModelError(EsaError):
    """A model name, file or weights that cannot be used."""


class DataError(EsaError):
    """Text data that is missing, empty or too short."""


class ConfigError(EsaError):
    """An option value out of range or inconsistent with another."""


class RestoreError(EsaError):
    """A perturbation was not undone bit-exactly (this is a bug in esa)."""
