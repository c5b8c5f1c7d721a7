"""Errors that name the problem. Every user-facing failure raises one of these."""


class CupagedError(Exception):
    """Base class for cupaged's own errors."""


class ModelNotFoundError(CupagedError):
    """An unknown model name, or a path that does not exist."""


class WeightsError(CupagedError):
    """A weights file or model directory that cannot be used (missing, corrupt, wrong shape or dtype, pickle)."""


class UnsupportedModelError(CupagedError):
    """An architecture or format that cupaged does not implement."""


class InvalidRequestError(CupagedError, ValueError):
    """A request that cannot be served: empty or too-long prompt, invalid sampling value."""


class OutOfMemoryError(CupagedError):
    """The KV cache budget cannot hold even one sequence."""


class TraceError(CupagedError, ValueError):
    """A request trace (JSONL) that cannot be replayed: bad JSON, a missing or invalid field (names the line)."""
