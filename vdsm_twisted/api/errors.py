"""
Errors the API returns, with VDSM's codes (PROTOCOL.md).

Every protocol turns an L{ApiError} into its own error shape (a JSON-RPC
error object, an AMP error box) with the same code and message.
"""

from __future__ import annotations


class ApiError(Exception):
    """An error with a stable numeric code, safe to show to the caller."""

    code: int = 100
    name: str = "General"

    def __init__(self, message: str | None = None):
        self.message = message or self.name
        super().__init__(self.message)

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


# JSON-RPC 2.0 protocol errors.
class ParseError(ApiError):
    code, name = -32700, "Parse error"


class InvalidRequest(ApiError):
    code, name = -32600, "Invalid request"


class MethodNotFound(ApiError):
    code, name = -32601, "Method not found"


class InvalidParams(ApiError):
    code, name = -32602, "Invalid params"


class InternalError(ApiError):
    code, name = -32603, "Internal error"


# VDSM domain errors.
class NoSuchVM(ApiError):
    code, name = 1, "Virtual machine does not exist"


class VMExists(ApiError):
    code, name = 4, "Virtual machine already exists"


class CannotCreateVM(ApiError):
    code, name = 9, "Error creating the requested VM"


class RecoveryInProgress(ApiError):
    code, name = 99, "Recovering from crash or Initializing"


class GeneralError(ApiError):
    code, name = 100, "General Exception"


class ServerBusy(ApiError):
    """Too many requests in flight on one connection."""

    code, name = 101, "Server busy: too many pending requests"


#: Every error class by code, for clients that rebuild errors from the wire.
BY_CODE: dict[int, type[ApiError]] = {
    cls.code: cls
    for cls in (ParseError, InvalidRequest, MethodNotFound, InvalidParams,
                InternalError, NoSuchVM, VMExists, CannotCreateVM,
                RecoveryInProgress, GeneralError, ServerBusy)
}


def from_code(code: int, message: str) -> ApiError:
    cls = BY_CODE.get(code)
    if cls is None:
        err = ApiError(message)
        err.code = code
        return err
    return cls(message)
