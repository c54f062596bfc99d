"""Exception hierarchy of the ``linreg`` package.

Library code raises subclasses of :class:`LinregError`; command-line entry points catch
``LinregError``, print ``error: <message>`` and return exit status 2. Messages name the
offending input (file, key, value) and, where possible, what would be accepted instead.
"""

from __future__ import annotations


class LinregError(Exception):
    """Base class of every error that ``linreg`` raises on bad input or state."""


class ConfigError(LinregError):
    """A recipe, option or registry name is invalid (unknown key, wrong type, unknown name)."""


class DataError(LinregError):
    """Input data is missing, malformed, or inconsistent (shapes, dtypes, files, tokenizers)."""


class CheckpointError(LinregError):
    """A checkpoint is missing, incomplete (no COMPLETE marker) or does not match the model."""


class NotEnoughTokensError(DataError):
    """Too few tokens for a meaningful least-squares fit: a score needs n_tokens > dim + 1.

    With n <= d + 1 centered tokens the d x d least-squares map can fit any target exactly, so
    every linearity score would be 1 regardless of the data.
    """

    def __init__(self, n_tokens: int, dim: int, what: str = "linearity score"):
        self.n_tokens = int(n_tokens)
        self.dim = int(dim)
        self.needed = self.dim + 2
        super().__init__(
            f"{what}: {self.n_tokens} tokens for hidden size {self.dim}; need at least "
            f"{self.needed} (n_tokens > dim + 1), and many more (n >> dim) for a score well above "
            f"the chance level dim/(n-1). Feed more tokens or batches."
        )


__all__ = ["LinregError", "ConfigError", "DataError", "CheckpointError", "NotEnoughTokensError"]
