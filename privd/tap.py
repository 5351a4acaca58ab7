"""The C{twistd privd} entry point (see L{twisted.application.service.ServiceMaker})."""

from twisted.python import usage


class Options(usage.Options):
    optParameters = [
        ["config", "c", None,
         "privd configuration (INI). Without it the embedded defaults are used; "
         "every key is documented in etc/privd.conf."],
    ]


def makeService(options: Options):
    from privd.service import make_service
    from vdsm_twisted.common.logging import LevelledService

    return LevelledService.wrap(make_service(options["config"]), getattr(options, "parent", None))
