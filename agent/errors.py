"""The agent's typed errors: a bad-data family and a transport family."""


class EdgeshipError(Exception):
    """Base of every error edgeship raises on purpose."""


class BundleRejected(EdgeshipError):
    """A bundle (or part of one) failed validation. `reason` is a short machine-readable kind."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class RuntimeUnavailable(EdgeshipError):
    """The inference runtime a model needs is not installed or cannot load the model."""


class TransportError(EdgeshipError):
    """The broker or a mirror could not deliver what was asked for. `reason` says why when the transport can tell
    (a chunk that fails its signed hash is `hash_mismatch`, an oversized one `too_large`); retrying may help."""

    def __init__(self, message: str, reason: str = "transport") -> None:
        super().__init__(message)
        self.reason = reason
