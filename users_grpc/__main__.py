"""The ``users-grpc`` command: serve, run locally, and the operator's tasks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from users_grpc.bootstrap import App, build_app, serve
from users_grpc.config import Settings, listen_address
from users_grpc.domain.errors import ConfigError, InvalidArgument, UsersError
from users_grpc.domain.model import ActorKind, AuditActor, AuditEvent, AuditEventType, Gender, Registration, Role
from users_grpc.grpc_api.logs import configure_logging
from users_grpc.ops import migrations
from users_grpc.ops.devdb import DevDatabaseError, ensure_harness, start_dev_database
from users_grpc.ops.rewrap import RewrapReport, rewrap, start_digest_root
from users_grpc.services.tokens import new_key_encryption_key
from users_grpc.workers import WorkersFailed, serve_in_workers

_T = TypeVar("_T")
DEV_KEY_FILE = Path("var/key-encryption-key")
DEV_HTTP_ADDRESS = "127.0.0.1:9464"
DEV_PASSKEYS = {
    "USERS_WEBAUTHN_RP_ID": "localhost",
    "USERS_WEBAUTHN_RP_NAME": "users-grpc dev",
    "USERS_WEBAUTHN_ORIGINS": "http://localhost:8000",
}
DEFAULT_ADMIN_NAME = "Admin"
log = logging.getLogger("users_grpc")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "keys" and args.keys_command == "new-kek":
        print(new_key_encryption_key())
        return 0
    status = 0
    if args.command in {"serve", "dev"} and args.workers is not None:
        os.environ["USERS_WORKERS"] = str(args.workers)  # the flag wins: what was typed last
    try:
        if args.command == "dev":
            # One process locally unless asked (--workers): one stream of log lines, a debugger
            # that stops the only server, and the embedded database runs one command at a time.
            os.environ.setdefault("USERS_WORKERS", "1")
            os.environ.setdefault("USERS_KEY_ENCRYPTION_KEY", _dev_key_encryption_key())
            # Locally, the metrics and the key set over HTTP are on (USERS_HTTP_ADDRESS= turns them off).
            os.environ.setdefault("USERS_HTTP_ADDRESS", DEV_HTTP_ADDRESS)
            # Passkeys on for localhost, the origin the example page is served from
            # (docs/passkeys.md), so the README's passkey calls run on a plain `dev`.
            for variable, value in DEV_PASSKEYS.items():
                os.environ.setdefault(variable, value)
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        _warn_of_unknown_variables(settings)
        if args.command == "serve":
            status = _serve(settings)
        elif args.command == "dev":
            status = _dev(_with_dev_addresses(settings, args), args.data_dir, args.db_listen)
        elif args.command == "create-admin":
            user_id = _with_app(settings, lambda app: _create_admin(app, args))
            print(f"admin {args.username} created: id {user_id}")
            if args.first_name is None or args.last_name is None:
                # Said, not silent: the name shows in every admin listing and audit reader.
                print(
                    f"users-grpc: named {_admin_name(args.first_name)} {_admin_name(args.last_name)}; "
                    "choose with --first-name and --last-name, or later with UpdateUser",
                    file=sys.stderr,
                )
        elif args.command == "migrate":
            _with_app(settings, lambda app: _migrate(app, args))
        elif args.keys_command == "rotate":
            print(_with_app(settings, lambda app: app.services.tokens.rotate()))
        elif args.keys_command == "rewrap":
            report = _with_app(settings, _rewrap)
            print(report)
            if report.unopenable:
                print(
                    f"users-grpc: {report.unopenable} sealed values open under neither USERS_KEY_ENCRYPTION_KEY "
                    "nor any key in USERS_OLD_KEY_ENCRYPTION_KEYS; list the key they were sealed with there and "
                    "run `users-grpc keys rewrap` again",
                    file=sys.stderr,
                )
                return 1
        elif args.keys_command == "rotate-digest-root":
            in_use_after = args.in_use_after if args.in_use_after is not None else 2 * settings.key_reload_seconds
            in_use_from = datetime.now(UTC) + timedelta(seconds=in_use_after)
            version = _with_app(
                settings, lambda app: start_digest_root(app.stores.key_material, app.services.encryption, in_use_from)
            )
            print(f"digest root {version} started: new digests use it from {in_use_from.isoformat(timespec='seconds')}")
        elif args.keys_command == "retire":
            retired = _with_app(settings, lambda app: _retire_key(app, args.kid))
            print(f"{args.kid} retired" if retired else f"{args.kid}: no such live key")
            return 0 if retired else 1
    except (ConfigError, DevDatabaseError) as error:
        print(f"users-grpc: {error}", file=sys.stderr)
        return 2
    except InvalidArgument as error:
        details = "; ".join(f"{v.field} {v.description}" for v in error.violations)
        print(f"users-grpc: {error}: {details}", file=sys.stderr)
        return 1
    except (UsersError, WorkersFailed) as error:
        print(f"users-grpc: {error}", file=sys.stderr)
        return 1
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="users-grpc", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_command = commands.add_parser("serve", help="serve on the database that USERS_MONGODB_URI names")
    serve_command.add_argument(
        "--workers",
        type=_worker_count,
        help="processes serving the address (default: USERS_WORKERS, or one per core); docs/operations.md",
    )
    dev = commands.add_parser("dev", help="start the embedded FerretDB (dbharness/) and serve on it")
    dev.add_argument(
        "--workers", type=_worker_count, help="processes serving the address (default: USERS_WORKERS, or 1)"
    )
    dev.add_argument("--data-dir", type=Path, default=Path("var/db"), help="where FerretDB keeps its SQLite files")
    dev.add_argument(
        "--db-listen", default="127.0.0.1:27018", help="FerretDB's address, for other commands such as create-admin"
    )
    dev.add_argument(
        "--grpc-listen", type=_address, help="the service's address (default: USERS_GRPC_ADDRESS, or 127.0.0.1:50051)"
    )
    dev.add_argument(
        "--http-listen",
        type=_address,
        help=f"the metrics and key set over HTTP (default: USERS_HTTP_ADDRESS, or {DEV_HTTP_ADDRESS})",
    )

    admin = commands.add_parser(
        "create-admin", help="create an active admin; the password comes from USERS_ADMIN_PASSWORD or a prompt"
    )
    admin.add_argument("--username", required=True)
    admin.add_argument("--email", required=True)
    admin.add_argument("--first-name", help=f"the admin's first name (default: {DEFAULT_ADMIN_NAME})")
    admin.add_argument("--last-name", help=f"the admin's last name (default: {DEFAULT_ADMIN_NAME})")

    migrate = commands.add_parser(
        "migrate", help="bring the database's schema to this version (idempotent; resumes after a crash)"
    )
    migrate.add_argument("--dry-run", action="store_true", help="say which steps would run, change nothing")
    migrate.add_argument(
        "--all-replicas-upgraded",
        action="store_true",
        help="every replica runs this version or newer: steps that older replicas would break may run",
    )

    keys = commands.add_parser("keys", help="manage the token signing keys and the key-encryption key")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    key_commands.add_parser("new-kek", help="print a new random key-encryption key for USERS_KEY_ENCRYPTION_KEY")
    key_commands.add_parser("rotate", help="add a signing key; it signs from now on, older keys keep verifying")
    key_commands.add_parser(
        "rewrap",
        help="re-seal everything sealed under an old key-encryption key (USERS_OLD_KEY_ENCRYPTION_KEYS) "
        "under USERS_KEY_ENCRYPTION_KEY; safe to run again, and beside running servers",
    )
    digest_root = key_commands.add_parser(
        "rotate-digest-root",
        help="start a new random root for the digests of codes and tokens (after a key-encryption key leaked, "
        "say): new digests use it once every replica has loaded it, older ones keep matching under theirs",
    )
    digest_root.add_argument(
        "--in-use-after",
        type=float,
        metavar="SECONDS",
        help="how long replicas have to load it before it is used (default: twice USERS_KEY_RELOAD_SECONDS; "
        "0 only if every replica restarts, or reloads, before it serves again)",
    )
    retire = key_commands.add_parser("retire", help="stop trusting a key: tokens it signed stop verifying")
    retire.add_argument("kid")
    return parser


def _worker_count(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 256:
        raise argparse.ArgumentTypeError(f"{raw!r} must be a whole number from 1 to 256")
    return int(raw)


def _serve(settings: Settings) -> int:
    """One server in this process, or ``settings.workers`` of them in processes of their own."""
    if settings.workers > 1:
        return serve_in_workers(settings)
    asyncio.run(serve(settings))
    return 0


def _address(raw: str) -> str:
    try:
        return listen_address(raw)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{raw!r} {error}") from None


def _with_dev_addresses(settings: Settings, args: argparse.Namespace) -> Settings:
    """The flags win over the environment: they are what the developer typed last."""
    if args.grpc_listen is not None:
        settings = dataclasses.replace(settings, grpc_address=args.grpc_listen)
    if args.http_listen is not None:
        settings = dataclasses.replace(settings, http_address=args.http_listen)
    return settings


# The variable a start-up error names, to the dev flag that sets it too.
_DEV_FLAGS = {"USERS_GRPC_ADDRESS": "--grpc-listen", "USERS_HTTP_ADDRESS": "--http-listen"}


def _version() -> str:
    """The installed distribution's version: the one pip, a lock file or an SBOM names."""
    try:
        return metadata.version("users-grpc")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed: no version)"


def _dev(settings: Settings, data_dir: Path, db_listen: str) -> int:
    binary = ensure_harness(announce=lambda line: print(f"users-grpc dev: {line}", file=sys.stderr))
    database = start_dev_database(data_dir=data_dir, binary=binary, listen=db_listen)
    print(f"users-grpc dev: database at {database.uri}", file=sys.stderr)
    try:
        return _serve(dataclasses.replace(settings, mongodb_uri=database.uri))
    except ConfigError as error:
        # A port taken by another process: say which flag moves it.
        flag = next((flag for variable, flag in _DEV_FLAGS.items() if str(error).startswith(f"{variable}=")), None)
        if flag is None:
            raise
        raise ConfigError(f"{error}; or pass {flag} with a free address") from None
    finally:
        database.stop()


def _warn_of_unknown_variables(settings: Settings) -> None:
    """A mistyped name (USERS_BCRYPT_ROUND) leaves its setting at the default; say so, once."""
    for variable in settings.unknown_variables:
        log.warning("unknown setting ignored", extra={"variable": variable.name, "did_you_mean": variable.nearest})


def _dev_key_encryption_key() -> str:
    # Local use only: a key kept beside the local database, made on first start.
    if not DEV_KEY_FILE.exists():
        DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        # Created 0600, never made so afterwards: no moment where another user may read it.
        # O_EXCL: never write a key into a file someone else made.
        with contextlib.suppress(FileExistsError):
            descriptor = os.open(DEV_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as key_file:
                key_file.write(new_key_encryption_key())
    return DEV_KEY_FILE.read_text().strip()


def _with_app(settings: Settings, task: Callable[[App], Awaitable[_T]]) -> _T:
    async def run() -> _T:
        # An operator's command serves nothing: a port of its own, so it runs beside a live server.
        app = await build_app(dataclasses.replace(settings, grpc_address="127.0.0.1:0", http_address=None))
        try:
            await app.prepare_database()
            return await task(app)
        finally:
            await app.close()

    return asyncio.run(run())


async def _create_admin(app: App, args: argparse.Namespace) -> str:
    password = os.environ.get("USERS_ADMIN_PASSWORD") or getpass.getpass("Password: ")
    user = await app.services.accounts.create_admin(
        Registration(
            username=args.username,
            first_name=_admin_name(args.first_name),
            last_name=_admin_name(args.last_name),
            email=args.email,
            password=password,
            password_confirmation=password,
            gender=Gender.UNSPECIFIED,
            role=Role.ADMIN,
        )
    )
    # Every grant of the admin role is on the record, this one too: no call, so no interceptor.
    await app.services.audit.record(
        AuditEvent(
            type=AuditEventType.ROLE_CHANGE,
            time=datetime.now(UTC),
            actor=AuditActor(kind=ActorKind.OPERATOR, id="create-admin", source=""),
            subject_id=user.id,
            status_code=0,
            reason="role ROLE_ADMIN, at creation",
        )
    )
    return user.id


def _admin_name(given: str | None) -> str:
    """A name create-admin was given (--first-name, --last-name), else the default."""
    return given or DEFAULT_ADMIN_NAME


async def _migrate(app: App, args: argparse.Namespace) -> int:
    return await migrations.migrate(
        app.stores.schema,
        datetime.now(UTC),
        dry_run=args.dry_run,
        all_replicas_upgraded=args.all_replicas_upgraded,
        say=print,
    )


async def _rewrap(app: App) -> RewrapReport:
    return await rewrap(
        encryption=app.services.encryption,
        keys=app.stores.key_store,
        users=app.stores.users,
        outbox=app.stores.outbox,
        material=app.stores.key_material,
    )


async def _retire_key(app: App, kid: str) -> bool:
    if kid == app.services.tokens.signing_kid:
        raise ConfigError(f"{kid} is the key that signs now: run `users-grpc keys rotate` first")
    return await app.services.tokens.retire(kid)


if __name__ == "__main__":
    sys.exit(main())
