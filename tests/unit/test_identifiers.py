"""The pure rules of emails and identifier keys."""

from __future__ import annotations

import pytest

from users_grpc.domain.errors import InvalidArgument
from users_grpc.domain.rules import identifier_key, normalized_email


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("jane@example.com", "jane@example.com"),
        ("Jane.Doe@Example.COM", "Jane.Doe@example.com"),
        ("jane@bücher.example", "jane@xn--bcher-kva.example"),
        ("jane@BÜCHER.example", "jane@xn--bcher-kva.example"),
        ("jane@xn--bcher-kva.example", "jane@xn--bcher-kva.example"),
        ("jane@straße.example", "jane@xn--strae-oqa.example"),
        ("jane+tag@sub.example.test", "jane+tag@sub.example.test"),
    ],
)
def test_an_address_is_stored_with_its_domain_as_a_label(given: str, stored: str) -> None:
    assert normalized_email(given) == stored


@pytest.mark.parametrize(
    "email",
    [
        "ceo.corp.com<attacker@evil.test>",
        "postmaster,root,attacker@evil.test",
        "enA@example.test(2)",
        "=?utf-8?q?attacker=40evil=2Etest=2C_x?=@corp.test",
        "x=?y@example.test",
        '"quoted"@example.test',
        "jane@[192.0.2.1]",
        "jäne@example.test",
        "jane@localhost",
        "jane@example.local",
        "j" * 65 + "@example.test",
        "",
    ],
)
def test_anything_but_a_bare_address_is_refused_on_email(email: str) -> None:
    with pytest.raises(InvalidArgument) as error:
        normalized_email(email)
    assert [v.field for v in error.value.violations] == ["email"]


@pytest.mark.parametrize(
    "identifier", ["jane", "Jane.Doe", " JANE_doe-1 ", "Jane@Example.COM", "x@y.io", "enA@example.test(2)"]
)
def test_ascii_keys_are_the_lower_cased_keys_already_stored(identifier: str) -> None:
    """No migration: for ASCII input the key is what earlier versions stored."""
    assert identifier_key(identifier) == identifier.strip().lower()


@pytest.mark.parametrize(
    ("variant", "key"),
    [
        ("\u212aate@example.test", "kate@example.test"),  # KELVIN SIGN
        ("\uff2b\uff41\uff54\uff45", "kate"),  # fullwidth
        ("kate@EXAMPLE.\uff34\uff25\uff33\uff34", "kate@example.test"),
        ("jane@BÜCHER.example", "jane@xn--bcher-kva.example"),
        ("jane@bu\u0308cher.example", "jane@xn--bcher-kva.example"),  # decomposed ü
        ("STRASSE", "strasse"),
        ("straße", "strasse"),
    ],
)
def test_keys_compare_after_nfkc_and_case_folding(variant: str, key: str) -> None:
    assert identifier_key(variant) == key


def test_a_domain_with_sharp_s_keeps_it() -> None:
    """UTS #46 keeps ß in a domain; folding it to ss would name another domain."""
    assert identifier_key("jane@straße.example") == identifier_key("jane@xn--strae-oqa.example")
    assert identifier_key("jane@straße.example") != identifier_key("jane@strasse.example")
