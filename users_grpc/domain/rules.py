"""Domain rules: validation and normalisation of what callers send, the password policy.

Nothing here knows about gRPC or MongoDB; a rule that fails raises InvalidArgument with
field violations (domain/errors.py).
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass

from email_validator import EmailNotValidError, ValidatedEmail, validate_email

from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.domain.model import ImportedUser, ProfileChanges, Registration


def validate_profile_changes(changes: ProfileChanges) -> None:
    violations: list[FieldViolation] = []
    if changes.username is not None and not USERNAME_PATTERN.fullmatch(changes.username):
        violations.append(
            FieldViolation("user.username", "must be 3 to 32 characters of letters, digits, '.', '_' or '-'")
        )
    for field, value in (("first_name", changes.first_name), ("last_name", changes.last_name)):
        if value is not None:
            violations.extend(FieldViolation(f"user.{v.field}", v.description) for v in _name_violations(field, value))
    if changes.language_code is not None:
        violations.extend(_language_code_violations(changes.language_code, "user.language_code"))
    if changes.external_id is not None:
        violations.extend(external_id_violations(changes.external_id, "user.external_id"))
    if violations:
        raise InvalidArgument(violations)


# Limits from the contract (protos/users/v1/user_service.proto).
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{3,32}")
NAME_MAX_LENGTH = 100
EMAIL_MAX_LENGTH = 254
PASSWORD_MAX_LENGTH = 128
IDENTIFIER_MAX_LENGTH = EMAIL_MAX_LENGTH
ACTIVATION_CODE_DIGITS = 6
EXTERNAL_ID_MAX_LENGTH = 256
_USER_ID_PATTERN = re.compile(r"[0-9a-f]{24}")
# A BCP 47 tag's shape (a primary language of 2 or 3 letters, then subtags), not the registry:
# a well-formed tag we have no templates for falls back, as the contract says.
LANGUAGE_CODE_PATTERN = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*")
LANGUAGE_CODE_MAX_LENGTH = 35


def _language_code_violations(language_code: str, field: str) -> list[FieldViolation]:
    if not language_code or (
        len(language_code) <= LANGUAGE_CODE_MAX_LENGTH and LANGUAGE_CODE_PATTERN.fullmatch(language_code)
    ):
        return []
    return [FieldViolation(field, "must be empty or a BCP 47 language tag such as en, de or de-AT")]


def identifier_key(identifier: str) -> str:
    """The form under which usernames and emails are unique and looked up.

    NFKC, then case folding: a KELVIN SIGN, a fullwidth letter or another letter case gives the
    key of the plain letter, so no look-alike can take an account's name or address, and a
    sign-in with one finds the account. The domain of an identifier with ``@`` becomes its
    IDNA A-label, as in stored addresses (UTS #46 keeps ``ß``, which case folding alone would
    make ``ss``: another domain). Usernames cannot contain ``@``, so one key space holds both.

    For ASCII input this is ``strip().lower()``, the key of earlier versions, so stored keys
    need no migration.
    """
    text = unicodedata.normalize("NFKC", identifier.strip())
    local, at, domain_name = text.rpartition("@")
    if not at:
        return _fold(text)
    return f"{_fold(local)}@{_domain_key(domain_name)}"


def _fold(text: str) -> str:
    # NFKC again after folding, as in Unicode's NFKC_Casefold, so the key is stable.
    return unicodedata.normalize("NFKC", text.casefold())


def _domain_key(domain_name: str) -> str:
    try:
        return _validated_email(f"x@{domain_name}").ascii_domain
    except EmailNotValidError:
        # No address has this domain now; the fold still finds one stored under older rules.
        return _fold(domain_name)


def normalized_email(email: str) -> str:
    """The address as stored and mailed to; :class:`InvalidArgument` on ``email`` if it is not one.

    Only a bare ``local@domain``: no display name, comment, list, quoting or IP literal, an
    ASCII local part, and the domain checked and given as its IDNA A-label, so
    ``jane@bücher.example`` is ``jane@xn--bcher-kva.example``. A local part holding an encoded
    word's opening ``=?`` (RFC 2047 forbids them in addresses; some mail clients decode them
    anyway, showing another address) is refused too.
    """
    if not email:
        raise InvalidArgument([FieldViolation("email", "is required")])
    if len(email) > EMAIL_MAX_LENGTH:
        raise InvalidArgument([FieldViolation("email", f"must be at most {EMAIL_MAX_LENGTH} characters")])
    try:
        validated = _validated_email(email)
    except EmailNotValidError as error:
        raise InvalidArgument([FieldViolation("email", f"{_EMAIL_RULE}: {error}")]) from None
    # Never None: non-ASCII local parts were refused.
    assert validated.ascii_local_part is not None
    if "=?" in validated.ascii_local_part:
        raise InvalidArgument([FieldViolation("email", f"{_EMAIL_RULE}: '=?' is not allowed before the @-sign")])
    return f"{validated.ascii_local_part}@{validated.ascii_domain}"


_EMAIL_RULE = "must be a bare address such as jane@example.com"


def _validated_email(email: str) -> ValidatedEmail:
    return validate_email(
        email,
        # An ASCII local part: every relay can carry it, and it has no look-alike letters.
        allow_smtputf8=False,
        allow_quoted_local=False,
        allow_domain_literal=False,
        allow_display_name=False,
        allow_empty_local=False,
        # Also holds the local part to 64 characters (RFC 5321).
        strict=True,
        # No DNS: the activation code proves the mailbox.
        check_deliverability=False,
        # Accept the reserved .test names (RFC 6761) that tests and staging use; the other
        # special-use names (localhost, .local, .invalid, .onion, .arpa) stay refused.
        test_environment=True,
    )


def new_activation_token() -> str:
    # 256 random bits: beyond guessing, so no attempt cap is needed and none can be exhausted.
    return secrets.token_urlsafe(32)


def normalize_password(password: str) -> str:
    """The one form of a password that is measured, compared and hashed: Unicode NFC.

    Whatever a keyboard or platform sends ("é" as one code point or as "e" plus a combining
    accent), the same password then has the same length and the same hash.
    """
    return unicodedata.normalize("NFC", password)


def new_activation_code() -> str:
    # Six digits are typeable; their strength comes from the attempt cap and expiry.
    return f"{secrets.randbelow(10**ACTIVATION_CODE_DIGITS):0{ACTIVATION_CODE_DIGITS}d}"


@dataclass(frozen=True)
class PasswordPolicy:
    """What a new password must be: long enough, not too long, not common, not about its owner.

    No composition rules (NIST 800-63B): length and a blocklist do the work.
    """

    min_length: int = 12
    # Lower-cased; a new password that equals one, in any letter case, is refused.
    common_passwords: frozenset[str] = frozenset()

    def violations(
        self, password: str, *, context_words: tuple[str, ...], field: str = "password"
    ) -> list[FieldViolation]:
        """What is wrong with a new password, under ``field``; empty if nothing."""
        # Length counts code points of the normalized form, so "é" is one character however it was typed.
        password = normalize_password(password)
        length = len(password)
        if length < self.min_length:
            return [FieldViolation(field, f"must be at least {self.min_length} characters")]
        if length > PASSWORD_MAX_LENGTH:
            return [FieldViolation(field, f"must be at most {PASSWORD_MAX_LENGTH} characters")]
        folded = password.casefold()
        if folded in self.common_passwords:
            return [FieldViolation(field, "is one of the most common passwords; a few unrelated words make a good one")]
        for word in context_words:
            if len(word) >= 3 and word.casefold() in folded:
                return [FieldViolation(field, "must not contain the username or email")]
        return []


def validate_registration(registration: Registration, *, password_policy: PasswordPolicy) -> None:
    """Raise :class:`InvalidArgument` naming every bad field of ``registration``."""
    violations = _profile_violations(
        registration.username, registration.first_name, registration.last_name, registration.email
    )
    violations.extend(
        password_policy.violations(
            registration.password, context_words=(registration.username, registration.email.partition("@")[0])
        )
    )
    if not passwords_equal(registration.password_confirmation, registration.password):
        violations.append(FieldViolation("password_confirmation", "must equal password"))
    violations.extend(_language_code_violations(registration.language_code, "language_code"))
    if violations:
        raise InvalidArgument(violations)


def _profile_violations(username: str, first_name: str, last_name: str, email: str) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    if not USERNAME_PATTERN.fullmatch(username):
        violations.append(FieldViolation("username", "must be 3 to 32 characters of letters, digits, '.', '_' or '-'"))
    for field, value in (("first_name", first_name), ("last_name", last_name)):
        violations.extend(_name_violations(field, value))
    violations.extend(_email_violations(email))
    return violations


MAX_IMPORTED_USERS = 1000
# The costliest imported hash, as our own (USERS_BCRYPT_ROUNDS, at most 16): a costlier one would make
# each wrong guess on that account hold a hashing thread 2^(cost - rounds) times as long as one on a
# native account, and a few anonymous guesses would then keep everyone else's sign-in waiting.
MAX_IMPORTED_BCRYPT_COST = 16
# $2a$, $2b$ or $2y$, a two-digit cost, 22 characters of salt and 31 of hash in bcrypt's base64.
# The last salt character carries 2 bits and the last hash character 4 bits of padding, which
# must be zero: bcrypt refuses a salt that is not so, and a hash that is not so never matches.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}[.CGKOSWaeimquy26]")


def validate_imported_user(item: ImportedUser, *, max_cost: int = MAX_IMPORTED_BCRYPT_COST) -> None:
    """Raise :class:`InvalidArgument` naming every bad field: registration's rules, and a
    bcrypt hash in place of the password, of a cost from 4 to ``max_cost`` (our own)."""
    violations = _profile_violations(item.username, item.first_name, item.last_name, item.email)
    violations.extend(external_id_violations(item.external_id))
    if item.password_hash:
        match = _BCRYPT_HASH.fullmatch(item.password_hash)
        if match is None:
            violations.append(
                FieldViolation("password_hash", "must be a bcrypt hash: $2a$, $2b$ or $2y$, cost, salt and hash")
            )
        elif not 4 <= int(match.group(1)) <= max_cost:
            violations.append(
                FieldViolation("password_hash", f"the bcrypt cost must be 04 to {max_cost:02d} (USERS_BCRYPT_ROUNDS)")
            )
    if violations:
        raise InvalidArgument(violations)


def external_id_violations(external_id: str, field: str = "external_id") -> list[FieldViolation]:
    if len(external_id) > EXTERNAL_ID_MAX_LENGTH:
        return [FieldViolation(field, f"must be at most {EXTERNAL_ID_MAX_LENGTH} characters")]
    return []


def validate_external_id(external_id: str) -> None:
    violations = external_id_violations(external_id)
    if violations:
        raise InvalidArgument(violations)


def validate_identifier(identifier: str, field: str = "identifier") -> None:
    if not identifier.strip():
        raise InvalidArgument([FieldViolation(field, "is required: a username or email")])
    if len(identifier) > IDENTIFIER_MAX_LENGTH:
        raise InvalidArgument([FieldViolation(field, f"must be at most {IDENTIFIER_MAX_LENGTH} characters")])


def is_id(value: object) -> bool:
    """True for the form of user and session ids: 24 lower-case hexadecimal digits (a MongoDB ObjectId)."""
    return isinstance(value, str) and _USER_ID_PATTERN.fullmatch(value) is not None


def validate_user_id(user_id: str, field: str = "id") -> None:
    if not is_id(user_id):
        raise InvalidArgument([FieldViolation(field, "must be 24 lower-case hexadecimal digits")])


ACTIVATION_TOKEN_MAX_LENGTH = 128


def validate_activation(code: str, token: str) -> None:
    """One of the two proofs from the activation email: the 6-digit code or the long token."""
    if code and token:
        raise InvalidArgument([FieldViolation("token", "send either the code or the token, not both")])
    if token:
        if len(token) > ACTIVATION_TOKEN_MAX_LENGTH or not token.isascii():
            raise InvalidArgument([FieldViolation("token", "must be the token from the activation email")])
        return
    validate_activation_code(code)


def validate_activation_code(code: str) -> None:
    if len(code) != ACTIVATION_CODE_DIGITS or not code.isascii() or not code.isdigit():
        raise InvalidArgument(
            [FieldViolation("code", f"must be the {ACTIVATION_CODE_DIGITS}-digit code from the activation email")]
        )


def passwords_equal(first: str, second: str) -> bool:
    """Whether two typings are the same password (as hashing sees it): equal once normalized."""
    return normalize_password(first) == normalize_password(second)


def validate_login_password(password: str) -> None:
    """Checks that do not depend on any account, so they reveal nothing about one."""
    if not password:
        raise InvalidArgument([FieldViolation("password", "is required")])
    # Measured as at registration, so every password that registered can sign in.
    if len(normalize_password(password)) > PASSWORD_MAX_LENGTH:
        raise InvalidArgument([FieldViolation("password", f"must be at most {PASSWORD_MAX_LENGTH} characters")])


def _name_violations(field: str, value: str) -> list[FieldViolation]:
    if not value.strip():
        return [FieldViolation(field, "is required")]
    if len(value) > NAME_MAX_LENGTH:
        return [FieldViolation(field, f"must be at most {NAME_MAX_LENGTH} characters")]
    if _has_control_characters(value):
        return [FieldViolation(field, "must not contain control, format or line-break characters")]
    return []


def _email_violations(email: str) -> list[FieldViolation]:
    try:
        normalized_email(email)
    except InvalidArgument as error:
        return list(error.violations)
    return []


def _has_control_characters(value: str) -> bool:
    """Control and format characters, and line and paragraph separators (U+2028, U+2029)."""
    return any(unicodedata.category(char) in _CONTROL_CATEGORIES for char in value)


_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def validate_prefix(prefix: str) -> None:
    if len(prefix) > IDENTIFIER_MAX_LENGTH:
        raise InvalidArgument([FieldViolation("prefix", f"must be at most {IDENTIFIER_MAX_LENGTH} characters")])
    if _has_control_characters(prefix):
        raise InvalidArgument([FieldViolation("prefix", "must not contain control or format characters")])


SERVICE_ACCOUNT_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{2,63}")


def service_account_machine(name: str) -> str:
    """The machine identity of a service account's callers: apart from mTLS identities in logs."""
    return f"service-account:{name}"
