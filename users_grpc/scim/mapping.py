"""users.v1.User <-> the SCIM core User (RFC 7643 section 4.1), attribute by attribute.

Mapped: ``id``, ``userName`` (username), ``name.givenName`` (first_name), ``name.familyName``
(last_name), the primary email (email, ``type`` "work"), ``active`` (USER_STATE_ACTIVE),
``externalId`` (external_id) and ``meta`` (create_time, update_time, the etag as a weak version).
Nothing else is published in the Schemas endpoint, so a client knows not to send it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from typing import Any

from scim2_models import Email, Meta, Name, Required, User

from users.v1 import user_pb2

ScimUser = User[Any]
USER_SCHEMA = "urn:ietf:params:scim:schemas:core:2.0:User"


@dataclass(frozen=True)
class Wanted:
    """What a SCIM User asks the account to be."""

    username: str
    first_name: str
    last_name: str
    email: str
    active: bool
    external_id: str = ""


def to_scim(user: user_pb2.User, base_url: str) -> ScimUser:
    return User(
        id=user.id,
        external_id=user.external_id or None,
        user_name=user.username,
        name=Name(given_name=user.first_name, family_name=user.last_name),
        emails=[Email(value=user.email)] if user.email else None,
        active=user.state == user_pb2.USER_STATE_ACTIVE,
        meta=Meta(
            resource_type="User",
            created=user.create_time.ToDatetime().replace(tzinfo=UTC),
            last_modified=user.update_time.ToDatetime().replace(tzinfo=UTC),
            version=version_of(user),
            location=f"{base_url}/Users/{user.id}",
        ),
    )


def version_of(user: user_pb2.User) -> str:
    return f'W/"{user.etag}"'


def etag_of(version: str) -> str:
    """The etag inside an If-Match value (W/"..." or "...")."""
    return version.strip().removeprefix("W/").strip('"')


def wanted(resource: ScimUser) -> Wanted:
    name = resource.name or Name()
    return Wanted(
        username=resource.user_name or "",
        first_name=name.given_name or "",
        last_name=name.family_name or "",
        email=_primary_email(resource.emails or []),
        active=True if resource.active is None else bool(resource.active),
        external_id=resource.external_id or "",
    )


def _primary_email(emails: list[Email]) -> str:
    # RFC 7643: at most one is primary; without one, the first is the address to use.
    chosen = next((email for email in emails if email.primary), emails[0] if emails else None)
    return "" if chosen is None or chosen.value is None else str(chosen.value)


def user_schema() -> dict[str, object]:
    """The core User schema, cut down to the attributes mapped above."""
    schema = User.to_schema()
    keep = {"userName": None, "name": {"givenName", "familyName"}, "emails": {"value"}, "active": None}
    attributes = []
    for attribute in schema.attributes or []:
        if attribute.name not in keep:
            continue
        subs = keep[attribute.name]
        # Every account has a username, both names and an address, as in CreateUser, and is active or
        # not: required (a POST without `active` is still taken, as active).
        attribute.required = Required.true
        if subs is not None and attribute.sub_attributes:
            attribute.sub_attributes = [sub for sub in attribute.sub_attributes if sub.name in subs]
            for sub in attribute.sub_attributes:
                if sub.name in ("givenName", "familyName", "value"):
                    sub.required = Required.true
        attributes.append(attribute)
    schema.attributes = attributes
    return schema.model_dump(mode="json")
