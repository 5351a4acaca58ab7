"""privd: the small root daemon doing the agent's few privileged operations.

It serves a fixed table of AMP commands (L{privd.commands}) on a UNIX socket
and checks every caller's credentials (SO_PEERCRED) against its configuration.
"""
