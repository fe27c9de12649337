"""Mails from templates: Jinja2's sandbox, a text and an HTML part per kind, per language.

Each kind has three templates, ``<kind>.<language>.subject.txt``, ``<kind>.<language>.txt`` and
``<kind>.<language>.html``, shipped in ``mail_templates/`` beside this module. An operator's
directory (``USERS_MAIL_TEMPLATES_DIR``) overrides them file by file; a language without a file
falls back to the default language, then to English. Every template is compiled, and rendered
once with sample values, when the renderer is built: a broken one stops the start, never a send.
Security notices are one kind, ``notice``; the service names which notice in the value
``notice``, and the words of every notice are macros in ``notice-texts.<language>.txt``, which
the notice's three templates import. They are tried once per notice kind, so each needs words.

What a stranger typed reaches a template only as a value: Jinja2 never evaluates the text of a
value (``{{ 7*7 }}`` in a name stays those characters), the HTML part is autoescaped, the text
part is plain text (never rendered as HTML by anyone), and the subject is one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_args
from urllib.parse import quote

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from users_grpc.domain.errors import ConfigError
from users_grpc.domain.model import Mail
from users_grpc.domain.ports import MailKind, NoticeKind

SHIPPED_TEMPLATES = Path(__file__).parent / "mail_templates"
_KINDS: tuple[MailKind, ...] = ("activation", "password-reset", "email-change-code", "notice")
_PARTS = ("subject.txt", "txt", "html")
_FALLBACK_LANGUAGE = "en"
# Values every kind's templates may use, for the check at start (a typo'd name fails there).
_SAMPLE_VALUES: dict[MailKind, dict[str, str | int]] = {
    "activation": {
        "username": "jane",
        "first_name": "Jane",
        "code": "123456",
        "token": "t",
        "minutes": 15,
        "hours": 24,
    },
    "password-reset": {"username": "jane", "first_name": "Jane", "token": "t", "minutes": 60},
    "email-change-code": {"username": "jane", "first_name": "Jane", "code": "123456", "minutes": 15},
    "notice": {"username": "jane", "first_name": "Jane"},
}
# A notice's templates are tried once per notice kind (the value `notice`), with its own values:
# every kind must have words in every language that has notice templates.
_NOTICE_KINDS: tuple[NoticeKind, ...] = get_args(NoticeKind)
_NOTICE_VALUES: dict[NoticeKind, dict[str, str | int]] = {
    "passkey-added": {"passkey_name": "Laptop"},
    "passkey-removed": {"passkey_name": "Laptop"},
    "passkey-removed-by-admin": {"passkey_name": "Laptop"},
    "passkey-counter-regressed": {"passkey_name": "Laptop"},
}
# The value each kind's link carries, in the URL's fragment.
_LINK_VALUE: dict[MailKind, str] = {"activation": "token", "password-reset": "token", "email-change-code": "code"}


@dataclass(frozen=True, kw_only=True)
class MailLinks:
    """The front end's pages a mail links to; None: that mail carries no link, only its code."""

    activation_url: str | None = None
    reset_url: str | None = None
    email_change_url: str | None = None

    def base_for(self, kind: MailKind) -> str | None:
        return {
            "activation": self.activation_url,
            "password-reset": self.reset_url,
            "email-change-code": self.email_change_url,
        }.get(kind)


class TemplateMailRenderer:
    """The :class:`~users_grpc.domain.ports.MailRenderer` of the running service."""

    def __init__(self, *, override_dir: Path | None, default_language: str, links: MailLinks) -> None:
        searched = [SHIPPED_TEMPLATES] if override_dir is None else [override_dir, SHIPPED_TEMPLATES]
        loader = jinja2.FileSystemLoader([str(path) for path in searched])
        # StrictUndefined: a misspelt value fails the check at start instead of vanishing from mails.
        self._text = SandboxedEnvironment(loader=loader, autoescape=False, undefined=jinja2.StrictUndefined)
        self._html = SandboxedEnvironment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined)
        self._languages = _languages(searched)
        self._default_language = default_language
        self._links = links
        self._check_every_template()

    def render(self, kind: MailKind, *, to: str, values: Mapping[str, str | int], language: str | None = None) -> Mail:
        context = dict(values)
        link = self._link(kind, values)
        if link is not None:
            context["link"] = link
        languages = self._languages_for(language)

        def rendered(environment: SandboxedEnvironment, part: str) -> str:
            # The first language that has this part: a translation may leave a part out.
            names = [f"{kind}.{each}.{part}" for each in languages]
            return environment.select_template(names).render(context)

        return Mail(
            to=to,
            # One line: a value can never start a header of its own.
            subject=" ".join(rendered(self._text, "subject.txt").split()),
            body=rendered(self._text, "txt").strip() + "\n",
            html=rendered(self._html, "html"),
        )

    def _languages_for(self, requested: str | None) -> list[str]:
        """The request's language, its primary language (de for de-AT), then the default one,
        then English: those with templates."""
        wanted = [requested, _primary(requested), self._default_language, _FALLBACK_LANGUAGE]
        chosen = [each.lower() for each in wanted if each is not None and each.lower() in self._languages]
        return list(dict.fromkeys([*chosen, _FALLBACK_LANGUAGE]))

    def _link(self, kind: MailKind, values: Mapping[str, str | int]) -> str | None:
        """The front end's URL with the token (or code) in its fragment, which browsers send to no
        server: it stays out of access logs and Referer headers."""
        base = self._links.base_for(kind)
        if base is None:
            return None
        name = _LINK_VALUE[kind]
        return f"{base}#{name}={quote(str(values[name]), safe='')}"

    def _check_every_template(self) -> None:
        for language in sorted(self._languages | {_FALLBACK_LANGUAGE}):
            for kind in _KINDS:
                for part in _PARTS:
                    name = f"{kind}.{language}.{part}"
                    self._check(name, kind, language)

    def _check(self, name: str, kind: MailKind, language: str) -> None:
        environment = self._html if name.endswith(".html") else self._text
        try:
            template = environment.get_template(name)
        except jinja2.TemplateNotFound:
            if language == _FALLBACK_LANGUAGE:
                raise ConfigError(f"the mail template {name} is missing") from None
            return  # another language may leave a part out: that part falls back to English
        except jinja2.TemplateSyntaxError as error:
            raise ConfigError(
                f"the mail template {name} line {error.lineno} does not render: {error.message}"
            ) from None
        for what, values in _samples(kind):
            try:
                template.render(values)
            except jinja2.TemplateNotFound as error:
                raise ConfigError(f"the mail template {name} uses {error.name}, which is missing") from None
            except jinja2.TemplateError as error:
                # A syntax error in a template it imports (a notice's words) names that one.
                where = name
                if isinstance(error, jinja2.TemplateSyntaxError):
                    where = f"{error.name} line {error.lineno}"
                raise ConfigError(f"the mail template {where} does not render{what}: {error.message}") from None


def _samples(kind: MailKind) -> list[tuple[str, dict[str, str | int]]]:
    """The values a kind's templates are tried with, and what each try is (for the error)."""
    values = dict(_SAMPLE_VALUES[kind]) | {"link": "https://example.com/#token=t"}
    if kind != "notice":
        return [("", values)]
    return [
        (f" for the notice {each}", values | {"notice": each} | _NOTICE_VALUES.get(each, {})) for each in _NOTICE_KINDS
    ]


def _languages(directories: list[Path]) -> set[str]:
    """Every language some template is written in (``activation.de.txt``: ``de``)."""
    found = set()
    for directory in directories:
        for path in directory.glob("*.*.txt"):
            parts = path.name.split(".")
            if len(parts) >= 3 and parts[0] in _KINDS:
                found.add(parts[1].lower())
    return found


def _primary(language: str | None) -> str | None:
    """The primary language subtag of a BCP 47 tag: de of de-AT."""
    return None if language is None else language.partition("-")[0]
