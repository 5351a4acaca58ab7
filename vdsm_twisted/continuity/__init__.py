"""
Keeping VMs and clients through agent reloads, upgrades and crashes (seed 001).

- L{codeid}: has the installed code changed since this image started?
- L{handoff}: what one image hands the next across C{execv} (fds, children).
- L{upgrade}: the re-exec sequence (drain, preflight, save, exec).
- L{preflight}: the subprocess that proves the new code can start.
"""
