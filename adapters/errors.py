"""Typed errors of the core. The HTTP layer maps each `error_type` to a status code in one place."""


class LoraplexError(Exception):
    """Base error; `message` is a sentence a user can act on."""

    error_type = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidAdapterError(LoraplexError):
    """An adapter (config, tensors or labels) that loraplex cannot serve exactly."""

    error_type = "validation"


class InvalidInputError(LoraplexError):
    """A request input that cannot be classified as given (e.g. too long with truncate=false)."""

    error_type = "validation"


class BadRequestError(LoraplexError):
    error_type = "bad_request"


class UnsupportedMediaError(LoraplexError):
    """A weights file that is not safetensors (pickle, .bin, anything else)."""

    error_type = "unsupported_media_type"


class PayloadTooLargeError(LoraplexError):
    error_type = "payload_too_large"


class NotFoundError(LoraplexError):
    error_type = "not_found"


class ConflictError(LoraplexError):
    error_type = "conflict"


class DamagedAdapterError(ConflictError):
    """What the store holds for an adapter is damaged or foreign (not JSON, wrong fields, unreadable weights);
    the adapter is skipped, never served, until it is uploaded again or deleted."""


class OverloadedError(LoraplexError):
    """The queue is full; `retry_after` is in seconds."""

    error_type = "overloaded"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(LoraplexError):
    error_type = "unavailable"

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after
