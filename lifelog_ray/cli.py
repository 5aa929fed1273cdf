"""`lifelog-ray` command line: parse, then dispatch to the subcommand's handler (all defined in commands.py)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .commands import COMMANDS, Flag
from .console import Console
from .doctor import version
from .errors import USER_ERRORS
from .storage import access_errors

log = logging.getLogger("lifelog_ray")
VERBOSE_HELP = ("show everything Ray, TensorFlow and our own code log on the console (default: stage lines, "
                "progress, warnings and summaries; the rest goes to STUDY/logs/<stage>-<time>.log)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config; flags override it")
    p.add_argument("--study", help="study directory (output.study)", required=False)
    p.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_",
                   help="any config key, dotted, value as YAML (repeatable), e.g. "
                        "--set storage.options.s3.endpoint_url=http://minio:9000")


def _add_flags(p: argparse.ArgumentParser, flags: list[Flag]) -> None:
    for flag, key, kw in flags:
        if kw.get("action") != "store_true":
            kw = {"metavar": "N" if kw.get("type") in (int, float) else flag.lstrip("-").upper().replace("-", "_"), **kw}
        p.add_argument(flag, dest=key, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lifelog-ray",
        description="Transfer-learning study of daily activities in lifelog images, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"lifelog-ray {version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        p = sub.add_parser(c.name, help=c.help)
        if c.study:
            _add_common(p)
        _add_flags(p, c.flags)
        if c.arguments:
            c.arguments(p)
        # accepted after the subcommand too; SUPPRESS keeps it from resetting one given before it
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        p.add_argument("--log-level", default="INFO", help="with --verbose: the lowest level shown")
        p.set_defaults(func=c.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # as the workers (runtime.WORKER_ENV): no C++ INFO lines
    parser = build_parser()
    args = parser.parse_args(argv)
    args.console = console = Console(verbose=args.verbose).install()
    if args.verbose:
        logging.getLogger().setLevel(getattr(logging, str(args.log_level).upper(), logging.INFO))
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    try:
        return args.func(args)
    except USER_ERRORS as e:
        console.say(f"error: {e}", err=True)
        return 2
    except access_errors() as e:
        console.say(f"error: cannot use the storage location ({type(e).__name__}: {e}); check the path, "
                    f"storage.options and the credentials in the environment", err=True)
        return 2
    except Exception:
        if console.log_path and not args.verbose:  # our bug: its traceback goes to the log, named on the console
            log.exception("lifelog-ray %s failed", args.command)
            console.say(f"error: the command failed unexpectedly; the traceback is in {console.log_path}", err=True)
            return 1
        raise
    finally:
        if not ray_was_up and "ray" in sys.modules and sys.modules["ray"].is_initialized() and not args.verbose:
            sys.modules["ray"].shutdown()  # while the log still holds descriptors 1/2: Ray's exit lines go there
        console.close()


if __name__ == "__main__":
    sys.exit(main())
