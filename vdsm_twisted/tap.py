"""The C{twistd vdsm} entry point (see L{twisted.application.service.ServiceMaker})."""

from twisted.python import usage


class Options(usage.Options):
    optParameters = [
        ["config", "c", None,
         "Agent configuration (INI). Without it the embedded defaults are used; "
         "every key is documented in etc/vdsm.conf."],
    ]


def makeService(options: Options):
    from vdsm_twisted.service import AgentService
    from vdsm_twisted.common.logging import LevelledService

    return LevelledService.wrap(AgentService.from_config_path(options["config"]),
                                getattr(options, "parent", None))
