"""
C{vdsm-twisted-client}: call one API method, or watch events, from a shell.

    vdsm-twisted-client Host getCapabilities
    vdsm-twisted-client VM getStats vmID=6f1c...
    vdsm-twisted-client --params '{"vmID": "6f1c..."}' VM destroy
    vdsm-twisted-client --events

Exit status: 0 success, 1 the API answered with an error, 2 no answer
(connection, TLS or certificate problem, timeout) or bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, TextIO

from twisted.internet import defer, task

from vdsm_twisted import client as _client
from vdsm_twisted.api import errors

EXIT_OK, EXIT_API_ERROR, EXIT_NO_ANSWER = 0, 1, 2


class UsageError(Exception):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vdsm-twisted-client",
        description="Call one method of a vdsm-twisted (or VDSM) agent's API and print the result as JSON.",
        epilog="Values of key=value parse as JSON when they can (42, true, [1], {\"a\": 1}), "
               "else they are strings. Exit status: 0 ok, 1 API error, 2 no answer.")
    p.add_argument("--host", default="localhost", help="agent host (default: %(default)s)")
    p.add_argument("--port", type=int, default=54321, help="agent port (default: %(default)s)")
    p.add_argument("--pki", default="/etc/pki/vdsm", metavar="DIR",
                   help="PKI directory in VDSM's layout (default: %(default)s)")
    p.add_argument("--protocol", choices=_client.PROTOCOLS, default="stomp",
                   help="wire protocol (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds to wait for the connection and for the answer (default: %(default)s)")
    p.add_argument("--no-verify-hostname", action="store_true",
                   help="accept a certificate that does not name --host (the CA is still checked)")
    p.add_argument("--flow-id", help="correlation id for the agent's logs")
    p.add_argument("--params", metavar="JSON",
                   help="all parameters as one JSON object or array ('-' reads standard input)")
    p.add_argument("--events", action="store_true", help="print events as they arrive, until interrupted")
    p.add_argument("words", nargs="*", metavar="NAMESPACE VERB [key=value ...]",
                   help="the method (as 'Host getStats' or 'Host.getStats') and its parameters")
    return p


def parse_value(text: str) -> Any:
    """JSON when it parses, else the string itself (VDSM's client does the same)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def method_and_params(args: argparse.Namespace, stdin: TextIO) -> tuple[str, Any]:
    words = list(args.words)
    if not words:
        raise UsageError("a method is required (NAMESPACE VERB), or --events")
    if "." in words[0] and "=" not in words[0]:
        method, rest = words[0], words[1:]
    else:
        if len(words) < 2 or "=" in words[1]:
            raise UsageError("both NAMESPACE and VERB are required (e.g. 'Host getCapabilities')")
        method, rest = f"{words[0]}.{words[1]}", words[2:]
    if args.params is not None:
        if rest:
            raise UsageError("give parameters either as key=value or with --params, not both")
        text = stdin.read() if args.params == "-" else args.params
        try:
            params = json.loads(text)
        except ValueError as e:
            raise UsageError(f"--params is not JSON: {e}") from None
        if not isinstance(params, (dict, list)):
            raise UsageError("--params must be a JSON object or array")
        return method, params
    params = {}
    for word in rest:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {word!r}")
        params[key] = parse_value(value)
    return method, params


def format_result(result: Any) -> str:
    return json.dumps(result, indent=4, sort_keys=True, ensure_ascii=False) + "\n"


async def run(reactor, argv: list[str] | None = None, connect: Callable = _client.connect,
              stdout: TextIO | None = None, stderr: TextIO | None = None,
              stdin: TextIO | None = None) -> int:
    """The whole command; returns the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.events:
            if args.words or args.params is not None:
                raise UsageError("--events takes no method")
            method = params = None
        else:
            method, params = method_and_params(args, stdin or sys.stdin)
    except UsageError as e:
        err.write(f"vdsm-twisted-client: {e}\n")
        return EXIT_NO_ANSWER

    where = f"{args.host}:{args.port}"
    try:
        client = await connect(host=args.host, port=args.port, pki_dir=args.pki,
                               protocol=args.protocol, reactor=reactor, timeout=args.timeout,
                               verify_hostname=not args.no_verify_hostname)
    except (_client.ConnectFailed, _client.PkiError, OSError) as e:
        err.write(f"cannot connect to {where}: {e}\n")
        return EXIT_NO_ANSWER

    try:
        if args.events:
            return await _watch(client, out)
        try:
            result = await client.call(method, params, timeout=args.timeout, flow_id=args.flow_id)
        except errors.ApiError as e:
            err.write(f"error {e.code}: {e.message}\n")
            return EXIT_API_ERROR
        except _client.CallTimeout:
            err.write(f"{method}: no answer from {where} within {args.timeout:g} s\n")
            return EXIT_NO_ANSWER
        except _client.Disconnected as e:
            err.write(f"{method}: connection to {where} lost before the answer ({e})\n")
            return EXIT_NO_ANSWER
        out.write(format_result(result))
        out.flush()
        return EXIT_OK
    finally:
        await client.close()


async def _watch(client, out: TextIO) -> int:
    """Print events, one JSON object a line, until the reactor stops (Ctrl-C)."""
    def show(method: str, params: Any) -> None:
        out.write(json.dumps({"method": method, "params": params}, sort_keys=True) + "\n")
        out.flush()
    await client.subscribe_events(show)
    await defer.Deferred()  # forever: the reactor stops on SIGINT/SIGTERM
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Console script entry point; exits with the status of L{run}."""
    async def _main(reactor):
        raise SystemExit(await run(reactor, sys.argv[1:] if argv is None else argv))
    task.react(lambda reactor: defer.ensureDeferred(_main(reactor)))


if __name__ == "__main__":
    main()
