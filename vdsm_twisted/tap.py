"""The C{twistd vdsm} entry point (see L{twisted.application.service.ServiceMaker})."""

import os

from twisted.python import usage


class Options(usage.Options):
    optParameters = [
        ["config", "c", None,
         "Agent configuration (INI). Without it the embedded defaults are used; "
         "every key is documented in etc/vdsm.conf."],
    ]


def makeService(options: Options):
    from vdsm_twisted.common.logging import LevelledService
    from vdsm_twisted.continuity import standby
    from vdsm_twisted.continuity.runlock import RunDirBusy
    from vdsm_twisted.service import AgentService

    takeover = None
    if os.environ.get(standby.ENV):
        # Started as a warm standby: wait here, before twistd opens the log or
        # runs the reactor, until the serving agent dies (or stops us).
        takeover = standby.wait_for_takeover()
        if takeover is None:
            raise SystemExit(0)
    from vdsm_twisted import config as agent_config

    try:
        agent = AgentService(agent_config.load(options["config"]),
                             config_path=options["config"], takeover=takeover)
    except RunDirBusy as e:
        raise SystemExit(f"vdsm-twisted agent not started: {e}") from None
    return LevelledService.wrap(agent, getattr(options, "parent", None))
