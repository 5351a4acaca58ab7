"""VDSM-style lifecycle hooks: operator scripts run around VM and agent events."""

from vdsm_twisted.hooks.runner import HOOK_NAMES, HookError, HookRunner, IHookRunner

__all__ = ["HOOK_NAMES", "HookError", "HookRunner", "IHookRunner"]
