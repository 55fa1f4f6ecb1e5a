"""Command line: `python -m dockerworker [run]` (the container) or `run-once` (the local harness).

The container's own command (`run`, or nothing) goes straight to `app.run`:
argparse (with gettext and locale) and the harness are imported only for
the rest, so that a container's start does not pay for them.
"""

# Imported before the start path's bundle is installed (`bundle`), so it
# imports only what the interpreter has loaded already: no `typing`, no
# `from __future__`.
import gc
import os
import sys

TYPE_CHECKING = False  # typing's, without importing typing (mypy takes it as True)
if TYPE_CHECKING:
    import argparse


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if given in ([], ["run"]):
        # No garbage collection while the runtime starts: its imports make
        # thousands of objects that live as long as the process, and each
        # collection on the way would scan them again. `app` turns it back on
        # once the code is loaded.
        gc.disable()
        from . import bundle

        # In the image, the start path's modules come from one file made with
        # it (`bundle`: one open instead of a search of sys.path and an open
        # per module); `app` removes the finder before user code is
        # imported. Elsewhere there is no bundle: nothing changes.
        bundle.install()
        from . import app

        return app.run(os.environ)
    if given == ["debug-relay"]:
        from . import debug

        return debug.relay()
    from . import app, harness  # noqa: F811

    args = _parser().parse_args(given)
    if args.command == "run-once":
        return harness.run_once(
            harness.RunOnce(
                code=args.code,
                message=args.message,
                entrypoint=args.entrypoint,
                devices_endpoint=args.devices_endpoint,
                worker_id=args.worker_id,
            )
        )
    return app.run(os.environ)


def _parser() -> "argparse.ArgumentParser":
    import argparse  # noqa: F811

    from .config import DEFAULT_ENTRYPOINT

    parser = argparse.ArgumentParser(prog="python -m dockerworker", description="SensorBucket user-worker runtime")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="consume the worker's queue (the container's command; the default)")
    commands.add_parser("debug-relay", help="connect stdin/stdout to this container's debug adapter (--debug workers)")
    once = commands.add_parser("run-once", help="run one message through user code, without a broker")
    once.add_argument("--code", required=True, help="a .py file, a directory, or a zip in the SensorBucket layout")
    once.add_argument("--message", required=True, help="a JSON pipeline message file, or - for stdin")
    once.add_argument("--entrypoint", default=os.environ.get("CODE_ENTRYPOINT") or DEFAULT_ENTRYPOINT)
    once.add_argument("--devices-endpoint", default=os.environ.get("ENDPOINT_DEVICES"))
    once.add_argument("--worker-id", default="00000000-0000-0000-0000-000000000000")
    return parser


if __name__ == "__main__":
    sys.exit(main())
