"""
twistd plugins: C{twistd -n vdsm [--config PATH]} and C{twistd -n privd [--config PATH]}.

Only names live here; the services are built lazily so that C{twistd --help}
stays cheap and a broken daemon cannot break the other's plugin.
"""

from twisted.application.service import ServiceMaker

vdsm = ServiceMaker(
    "vdsm-twisted agent",
    "vdsm_twisted.tap",
    "The node virtualization agent: the engine API over mutual TLS "
    "(STOMP + JSON-RPC, AMP), unprivileged.",
    "vdsm",
)

privd = ServiceMaker(
    "vdsm-twisted privd",
    "privd.tap",
    "The root helper of the vdsm-twisted agent: bridges, taps and other "
    "privileged operations over AMP on a UNIX socket.",
    "privd",
)
