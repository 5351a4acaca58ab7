"""vdsm-twisted: a node virtualization agent for KVM hosts, on Twisted."""

from vdsm_twisted._version import __version__

__all__ = ["__version__"]
