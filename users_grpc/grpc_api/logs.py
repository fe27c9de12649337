"""JSON-lines logging: one object a record, with the ``extra`` fields as keys."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from users_grpc.pipeline.current import current_caller

# Attributes every LogRecord has; whatever else it carries came from ``extra``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _RECORD_ATTRIBUTES})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class CallerContext(logging.Filter):
    """Adds who is calling to every record emitted while an RPC runs.

    ``source`` (the caller's address), and where known ``caller_user_id``,
    ``caller_session_id`` and ``machine``, from the caller the interceptor
    identified: so a refusal, lock or replay can be traced to where it came from
    without each log call repeating it. These are identifiers, never secrets.
    Install it on handlers: a logger's own filters do not see its children's records.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        caller = current_caller.get()
        fields = {
            "source": caller.source,
            "caller_user_id": caller.user_id,
            "caller_session_id": caller.session_id,
            "machine": caller.machine,
        }
        for name, value in fields.items():
            if value and not hasattr(record, name):
                setattr(record, name, value)
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(CallerContext())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def keep_secrets_out_of_logs() -> None:
    """Silence loggers whose records can carry secrets, whatever the configured level.

    PyMongo logs whole command documents at DEBUG; ours hold password hashes and
    activation codes, and outbox documents hold the mail bodies.
    """
    logging.getLogger("pymongo.command").setLevel(logging.WARNING)
