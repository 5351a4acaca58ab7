"""The agent's client of privd, the root helper (see L{privd.commands})."""

from privd.commands import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    NotFound,
    NotPermitted,
    OperationFailed,
    PrivdError,
)
from vdsm_twisted.privdclient.client import PrivdClient, PrivdTimeout, PrivdUnavailable, TapDevice

__all__ = [
    "AlreadyExists",
    "Busy",
    "InvalidArgument",
    "NotFound",
    "NotPermitted",
    "OperationFailed",
    "PrivdClient",
    "PrivdError",
    "PrivdTimeout",
    "PrivdUnavailable",
    "TapDevice",
]
