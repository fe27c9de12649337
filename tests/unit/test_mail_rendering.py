"""The mail renderer on its own: the subject stays one line whatever a value holds, link
settings, languages, and the shipped templates' values."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest

from users_grpc.adapters.mail_rendering import SHIPPED_TEMPLATES, MailLinks, TemplateMailRenderer
from users_grpc.domain.errors import ConfigError
from users_grpc.domain.ports import NoticeKind


def renderer(**links: str) -> TemplateMailRenderer:
    return TemplateMailRenderer(override_dir=None, default_language="en", links=MailLinks(**links))


def test_a_value_with_line_breaks_never_makes_a_second_header_line(tmp_path: Path) -> None:
    (tmp_path / "password-reset.en.subject.txt").write_text("Hi {{ first_name }}\n")
    mail = TemplateMailRenderer(override_dir=tmp_path, default_language="en", links=MailLinks()).render(
        "password-reset",
        to="jane@example.com",
        values={"username": "jane", "first_name": "x\r\nBcc: evil@example.com", "token": "t", "minutes": 5},
    )
    assert mail.subject == "Hi x Bcc: evil@example.com"


def test_the_email_change_link_carries_the_code_in_its_fragment() -> None:
    mail = renderer(email_change_url="https://app.example/confirm").render(
        "email-change-code",
        to="new@example.com",
        values={"username": "jane", "first_name": "J", "code": "123456", "minutes": 15},
    )
    assert "https://app.example/confirm#code=123456" in mail.body.split("\n")
    assert mail.html is not None
    assert 'href="https://app.example/confirm#code=123456"' in mail.html


def test_a_language_without_templates_falls_back_to_english() -> None:
    german = TemplateMailRenderer(override_dir=None, default_language="de", links=MailLinks())
    values: dict[str, str | int] = {"username": "jane", "first_name": "J", "notice": "mfa-enabled"}
    notice = german.render("notice", to="j@example.com", values=values, language="fr")
    assert notice.subject == "Die Zwei-Faktor-Anmeldung ist eingeschaltet"
    assert notice.html is not None
    assert 'lang="de"' in notice.html
    assert renderer().render("notice", to="j@example.com", values=values, language="fr").subject == (
        "Two-factor sign-in is on"
    )
    activation: dict[str, str | int] = {
        "username": "jane",
        "first_name": "J",
        "code": "1",
        "token": "t",
        "minutes": 5,
        "hours": 2,
    }
    assert german.render("activation", to="j@example.com", values=activation, language="fr").subject == (
        "Dein Aktivierungscode"
    )
    assert german.render("activation", to="j@example.com", values=activation, language="en").subject == (
        "Your activation code"
    )


def test_every_shipped_kind_has_its_three_english_parts() -> None:
    names = {path.name for path in SHIPPED_TEMPLATES.iterdir()}
    for kind in ("activation", "password-reset", "email-change-code", "notice"):
        assert {f"{kind}.en.subject.txt", f"{kind}.en.txt", f"{kind}.en.html"} <= names


def test_a_template_using_python_internals_is_refused_by_the_sandbox(tmp_path: Path) -> None:
    (tmp_path / "notice.en.txt").write_text("{{ username.__class__.__mro__[1].__subclasses__() }}\n")
    with pytest.raises(ConfigError, match=r"notice\.en\.txt does not render"):
        TemplateMailRenderer(override_dir=tmp_path, default_language="en", links=MailLinks())


def test_a_regional_tag_falls_back_to_its_primary_language() -> None:
    english = TemplateMailRenderer(override_dir=None, default_language="en", links=MailLinks())
    values: dict[str, str | int] = {"username": "jane", "first_name": "J", "token": "t", "minutes": 5}
    assert english.render("password-reset", to="j@example.com", values=values, language="de-AT").subject == (
        "Setze dein Passwort zurück"
    )
    assert english.render("password-reset", to="j@example.com", values=values, language="DE").subject == (
        "Setze dein Passwort zurück"
    )


@pytest.mark.parametrize("kind", get_args(NoticeKind))
def test_every_notice_kind_has_its_own_words_in_english_and_german(kind: NoticeKind) -> None:
    values: dict[str, str | int] = {"username": "jane", "first_name": "J", "notice": kind, "passkey_name": "Laptop"}
    english = renderer().render("notice", to="j@example.com", values=values)
    german = renderer().render("notice", to="j@example.com", values=values, language="de")
    assert english.body.startswith("Hello jane,\n\n")
    assert german.body.startswith("Hallo jane,\n\n")
    assert german.subject != english.subject
    assert german.body != english.body
    assert german.html is not None
    assert 'lang="de"' in german.html
    if kind.startswith("passkey-"):
        assert "Laptop" in german.body
        assert "Laptop" in german.html


def test_the_notice_words_of_every_kind_are_checked_at_start(tmp_path: Path) -> None:
    """An operator's words that forget one kind stop the start, naming the template and the kind."""
    shipped = (SHIPPED_TEMPLATES / "notice-texts.en.txt").read_text()
    (tmp_path / "notice-texts.en.txt").write_text(shipped.replace('notice == "mfa-reset"', 'notice == "mfa-rest"'))
    with pytest.raises(ConfigError, match=r"notice\.en\.subject\.txt does not render for the notice mfa-reset"):
        TemplateMailRenderer(override_dir=tmp_path, default_language="en", links=MailLinks())


def test_a_notice_translation_without_its_words_stops_the_start(tmp_path: Path) -> None:
    (tmp_path / "notice.fr.txt").write_text(
        '{% import "notice-texts.fr.txt" as words with context %}{{ words.message() }}\n'
    )
    with pytest.raises(ConfigError, match=r"notice\.fr\.txt uses notice-texts\.fr\.txt, which is missing"):
        TemplateMailRenderer(override_dir=tmp_path, default_language="en", links=MailLinks())
