"""User metadata in the ``users`` documents: the ``metadata`` array, BSON to domain and back, and
the ListUsers filter on it.

Each entry is one element ``{s: scope, k: key, v: value, e: etag, t: update time, sk, skv}`` of
the user's ``metadata`` array, and ``metadata_revision`` counts the writes of the whole set (see
:class:`users_grpc.adapters.mongo.users_metadata.MetadataUpdates`).

``sk`` ("<scope>/<key>") and ``skv`` (``sk``, a NUL, then the SHA-256 of the value) are what
ListUsers matches: each one field, so a dotted equality (``metadata.skv``) matches scope, key and
value *of one element*. Matching ``s``, ``k`` and ``v`` apart would need ``$elemMatch``, which
FerretDB 1.24 does not take on documents ("unknown operator"). Keys hold no "/" and no NUL, so
neither spelling is ambiguous; the digest keeps every index entry small however long the value
(MongoDB 7 and 8 index keys of any size, but 4 KB values would bloat the index). Two multikey
indexes serve them, ``(metadata.skv, _id)`` and ``(metadata.sk, _id)``, each in the ``_id``
order of the keyset.
"""

from __future__ import annotations

import hashlib

from bson import Binary, ObjectId

from users_grpc.adapters.mongo.documents import Document
from users_grpc.domain.metadata import MetadataEntry, MetadataFilter, MetadataKey, MetadataScope


def _metadata_from_document(document: Document) -> tuple[MetadataEntry, ...]:
    return tuple(
        MetadataEntry(
            scope=MetadataScope(element["s"]),
            key=element["k"],
            value=bytes(element["v"]),
            etag=str(element["e"]),
            updated_at=element["t"],
        )
        for element in document.get("metadata") or ()
    )


def _metadata_document(entries: tuple[MetadataEntry, ...]) -> list[Document]:
    return [
        {
            "s": e.scope.value,
            "k": e.key,
            "v": Binary(e.value),
            "e": ObjectId(e.etag),
            "t": e.updated_at,
            "sk": _scoped_key(e.scope, e.key),
            "skv": _scoped_value(e.scope, e.key, e.value),
        }
        for e in entries
    ]


def _scoped_key(scope: MetadataScope, key: str) -> str:
    return f"{scope.value}/{key}"


def _scoped_value(scope: MetadataScope, key: str, value: bytes) -> Binary:
    return Binary(_scoped_key(scope, key).encode() + b"\x00" + hashlib.sha256(value).digest())


def _metadata_keys_document(keys: tuple[MetadataKey, ...]) -> list[Document]:
    return [{"s": key.scope.value, "k": key.key} for key in keys]


def _metadata_keys_from_document(elements: list[Document] | None) -> tuple[MetadataKey, ...]:
    return tuple(MetadataKey(MetadataScope(element["s"]), element["k"]) for element in elements or ())


def _metadata_clause(wanted: MetadataFilter) -> Document:
    """An element with scope and key (and, if given, value): one field, so one element matches all."""
    if wanted.value is None:
        return {"metadata.sk": _scoped_key(wanted.scope, wanted.key)}
    return {"metadata.skv": _scoped_value(wanted.scope, wanted.key, wanted.value)}
