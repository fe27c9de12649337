"""The ``users`` documents: BSON to domain and back, the state filters, and the updates that more
than one concern of :class:`users_grpc.adapters.mongo.users.MongoUserRepository` sends."""

from __future__ import annotations

from datetime import datetime

from bson import ObjectId

from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.metadata_bson import _metadata_from_document
from users_grpc.domain.model import (
    Account,
    ActivationCode,
    ChangeType,
    Gender,
    Mail,
    Mfa,
    Notice,
    PasswordScheme,
    Role,
    User,
    UserState,
)

# What each state looks like in a filter. Documents written before states existed have no
# ``state``: they were active (is_active true) or never activated.
_STATE_FILTERS: dict[UserState, Document] = {
    UserState.ACTIVE: {"is_active": True},
    UserState.PENDING_ACTIVATION: {
        "is_active": False,
        "state": {"$nin": [UserState.DEACTIVATED.value, UserState.LOCKED.value]},
    },
    UserState.DEACTIVATED: {"state": UserState.DEACTIVATED.value},
    UserState.LOCKED: {"state": UserState.LOCKED.value},
}
_NEVER_ACTIVATED = _STATE_FILTERS[UserState.PENDING_ACTIVATION]


def _state_of(document: Document) -> UserState:
    state = document.get("state")
    if state is not None:
        return UserState(state)
    # Written before states existed: only activation set is_active, and nothing cleared it.
    return UserState.ACTIVE if document["is_active"] else UserState.PENDING_ACTIVATION


def _with_notice(update: Document, notice: Mail, now: datetime) -> Document:
    """``update`` that also pends ``notice`` in the user's document (see :mod:`users_grpc.adapters.mongo`)."""
    return {
        **update,
        "$push": {"pending_mail": _notice_document(Notice(id=str(ObjectId()), mail=notice))},
        # The oldest waiting notice's time; a later push leaves it.
        "$min": {"pending_mail_since": now},
    }


# A user document marked deleting is gone for every call: only the change log still reads it,
# to publish its changes and finish the deletion.
_LIVE: Document = {"deleting": None}


def _with_change(update: Document, change: ChangeType, now: datetime) -> Document:
    """``update`` that also pends ``change`` for the change feed in the user's document.

    The entry carries no number: the update counts ``change_number`` up, and the entries
    pending are always the last ones counted (they leave the array only from its front, once
    published), so the publisher reads each entry's number off the document (MongoChangeLog).
    """
    return {
        **update,
        "$inc": {**update.get("$inc", {}), "change_number": 1},
        "$push": {**update.get("$push", {}), "pending_changes": _change_entry(change, now)},
        "$min": {**update.get("$min", {}), "pending_changes_since": now},
    }


def _change_entry(change: ChangeType, now: datetime) -> Document:
    # The id makes each entry distinct, so that publishers can $pullAll exactly the entries they published.
    return {"id": ObjectId(), "type": change.value, "at": now}


def _notice_document(notice: Notice) -> Document:
    document = {
        "id": ObjectId(notice.id),
        "to": notice.mail.to,
        "subject": notice.mail.subject,
        "body": notice.mail.body,
    }
    if notice.mail.html is not None:
        document["html"] = notice.mail.html
    return document


def _notice_from_document(document: Document) -> Notice:
    return Notice(
        id=str(document["id"]),
        # No "html": pended before mails had an HTML part; it goes out as plain text.
        mail=Mail(to=document["to"], subject=document["subject"], body=document["body"], html=document.get("html")),
    )


def _activation_document(code: ActivationCode) -> Document:
    return {
        "digest": code.digest,
        "expires_at": code.expires_at,
        "attempts_left": code.attempts_left,
        "sends_in_window": code.sends_in_window,
        "window_started_at": code.window_started_at,
        "token_digest": code.token_digest,
        "token_expires_at": code.token_expires_at,
    }


def _user_from_document(document: Document) -> User:
    return User(
        id=str(document["_id"]),
        username=document["username"],
        first_name=document["first_name"],
        last_name=document["last_name"],
        email=document["email"],
        gender=Gender(document["gender"]),
        role=Role(document["role"]),
        state=_state_of(document),
        created_at=document["created_at"],
        updated_at=document["updated_at"],
        token_version=document.get("token_version", 0),
        mfa_enabled=(document.get("mfa") or {}).get("state") == "active",
        revision=document.get("revision", 0),
        language_code=document.get("language_code", ""),
        metadata=_metadata_from_document(document),
        password_change_required=document.get("password_change_required", False),
        password_changed_at=document.get("password_changed_at"),
        external_id=document.get("external_id", ""),
    )


def _account_from_document(document: Document) -> Account:
    activation = document.get("activation")
    password_reset = document.get("password_reset")
    mfa = document.get("mfa")
    return Account(
        user=_user_from_document(document),
        password_hash=document["password_hash"],
        password_scheme=PasswordScheme(document.get("password_scheme", PasswordScheme.PEPPERED.value)),
        password_history=tuple(document.get("password_history", ())),
        activation=None if activation is None else _activation_from_document(activation),
        password_reset=None if password_reset is None else _activation_from_document(password_reset),
        mfa=None
        if mfa is None
        else Mfa(
            active=mfa["state"] == "active",
            sealed_secret=bytes(mfa["sealed_secret"]),
            last_used_step=mfa["last_used_step"],
            recovery_digests=tuple(mfa["recovery_digests"]),
        ),
    )


def _activation_from_document(activation: Document) -> ActivationCode:
    return ActivationCode(
        digest=activation["digest"],
        expires_at=activation["expires_at"],
        attempts_left=activation["attempts_left"],
        sends_in_window=activation["sends_in_window"],
        window_started_at=activation["window_started_at"],
        token_digest=activation.get("token_digest", ""),
        token_expires_at=activation.get("token_expires_at"),
    )
