"""The ``users-grpc`` command: ``serve`` for deployments, ``dev`` for a laptop."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

from users_grpc.bootstrap import serve
from users_grpc.config import ConfigError, Settings
from users_grpc.devdb import DevDatabaseError, start_dev_database
from users_grpc.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="users-grpc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="serve on the database that USERS_MONGODB_URI names")
    dev = commands.add_parser("dev", help="start the embedded FerretDB (dbharness/) and serve on it")
    dev.add_argument("--data-dir", type=Path, default=Path("var/db"), help="where FerretDB keeps its SQLite files")
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"users-grpc: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)

    if args.command == "serve":
        asyncio.run(serve(settings))
        return 0

    try:
        database = start_dev_database(data_dir=args.data_dir)
    except DevDatabaseError as error:
        print(f"users-grpc: {error}", file=sys.stderr)
        return 1
    try:
        asyncio.run(serve(dataclasses.replace(settings, mongodb_uri=database.uri)))
    finally:
        database.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
