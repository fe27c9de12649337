"""The security notices' mails: the service names the notice and passes its values; the words, in
the user's language, are the templates' (mail_templates/notice-texts.<language>.txt)."""

from __future__ import annotations

from users_grpc.domain.model import Mail, User
from users_grpc.domain.ports import MailRenderer, NoticeKind
from users_grpc.services.accounts import mail_values


def security_notice(renderer: MailRenderer, user: User, notice: NoticeKind, *, passkey_name: str = "") -> Mail:
    """The notice of a change to the account, to its address, pended by the update that makes it.

    No secrets, and no text a stranger chose but the user's own passkey names (in their own mail).
    """
    values = mail_values(user) | {"notice": notice}
    if passkey_name:
        values["passkey_name"] = passkey_name
    return renderer.render("notice", to=user.email, values=values, language=user.language_code or None)
