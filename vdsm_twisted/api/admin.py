"""C{Host} verbs about the agent itself (upgrade)."""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from vdsm_twisted.api import errors
from vdsm_twisted.api.registry import IApiNamespace
from vdsm_twisted.continuity.upgrade import UpgradeInProgress


@implementer(IApiNamespace)
class HostAdminApi:
    namespace = "Host"

    def __init__(self, upgrader):
        self.upgrader = upgrader

    @defer.inlineCallbacks
    def upgrade(self):
        try:
            outcome = yield self.upgrader.request("Host.upgrade", own_calls=1)
        except UpgradeInProgress as e:
            raise errors.GeneralError(str(e)) from None
        if outcome.startswith("refused"):
            raise errors.GeneralError(f"upgrade {outcome}")
        return {"status": {"code": 0, "message": outcome}}
