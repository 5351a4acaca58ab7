"""
Preflight of an upgrade: can the installed code start and read our state?

Run as C{python -m vdsm_twisted.continuity.preflight [--config PATH] RUN_DIR}
by the running agent before it execs.  It imports everything the new image
will import at start-up, parses the configuration, and decodes every state
document; any failure exits non-zero with the reason on stderr, and the old
image keeps serving.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vdsm-twisted-preflight")
    parser.add_argument("--config", default=None)
    parser.add_argument("state_dir")
    args = parser.parse_args(argv)
    try:
        import twisted.plugins.vdsm_twisted_plugins  # noqa: F401  (the twistd entry)
        import vdsm_twisted.service  # noqa: F401  (what the agent imports to serve)
        import vdsm_twisted.tap  # noqa: F401
        from vdsm_twisted.continuity.standby import warm_up

        warm_up()  # and everything it imports later (the VM side, the standby's)
        from vdsm_twisted import config as agent_config
        from vdsm_twisted.state.store import decode

        agent_config.load(args.config)
        checked = 0
        for root, _, files in os.walk(args.state_dir):
            for name in files:
                if name.endswith(".json"):
                    with open(os.path.join(root, name), "rb") as f:
                        decode(f.read())
                    checked += 1
    except BaseException as e:  # noqa: BLE001 - report anything, including SystemExit
        print(f"preflight failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"preflight ok: {checked} state document(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
