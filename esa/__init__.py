"""esa: Extreme Sensitivity Analysis of transformer language models."""

from esa.errors import ConfigError, DataError, EsaError, ModelError, RestoreError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "EsaError", "ModelError", "RestoreError", "__version__"]
