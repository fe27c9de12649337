"""What every store shares: the document type, ``_id`` values, and a unique index's refusal."""

from __future__ import annotations

from typing import Any

from bson import ObjectId
from pymongo.errors import DuplicateKeyError, OperationFailure

Document = dict[str, Any]
_INDEX_NOT_FOUND = 27


def _is_duplicate_key(error: OperationFailure) -> bool:
    """A unique index refused the write. MongoDB says so with E11000 (DuplicateKeyError); FerretDB
    on SQLite says so for updates (not inserts) only as an InternalError naming the constraint."""
    return isinstance(error, DuplicateKeyError) or (error.code == 1 and "UNIQUE constraint failed" in str(error))


def _object_id(value: str) -> ObjectId | str:
    """The ``_id`` that ``value`` names. Every ``_id`` here is an ObjectId, so a string that
    is not one (from a forged token, say) stays a string and names no document: not found,
    rather than a bson error."""
    return ObjectId(value) if ObjectId.is_valid(value) else value
