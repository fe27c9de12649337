"""Input validation: bad input is refused naming the field and saying what is wrong with it.

The field names and messages are what a caller sees in INVALID_ARGUMENT's field violations.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from users_grpc.domain.errors import FieldViolation, InvalidArgument
from users_grpc.domain.model import Gender, ImportedUser, ProfileChanges, Registration, Role
from users_grpc.domain.rules import (
    PasswordPolicy,
    identifier_key,
    is_id,
    normalized_email,
    passwords_equal,
    validate_activation,
    validate_activation_code,
    validate_identifier,
    validate_imported_user,
    validate_login_password,
    validate_prefix,
    validate_profile_changes,
    validate_registration,
    validate_user_id,
)

PASSWORD = "correct horse battery"
TOKEN = "A" * 43
CODE_RULE = "must be the 6-digit code from the activation email"
USERNAME_RULE = "must be 3 to 32 characters of letters, digits, '.', '_' or '-'"
EMAIL_RULE = "must be a bare address such as jane@example.com"
CONTROL_RULE = "must not contain control, format or line-break characters"
# Composed and decomposed spellings of the same letter.
E_ACUTE = "\u00e9"
E_ACUTE_DECOMPOSED = "e\u0301"


def refusal(check: Callable[[], object]) -> list[FieldViolation]:
    with pytest.raises(InvalidArgument) as error:
        check()
    return list(error.value.violations)


# Activation


def test_an_activation_code_of_six_ascii_digits_is_accepted() -> None:
    validate_activation("012345", "")
    validate_activation_code("999999")


@pytest.mark.parametrize("code", ["", "12345", "1234567", "12345a", "12 345", "\u0661\u0662\u0663\u0664\u0665\u0666"])
def test_anything_but_six_ascii_digits_is_refused_on_code(code: str) -> None:
    assert refusal(lambda: validate_activation(code, "")) == [FieldViolation("code", CODE_RULE)]


@pytest.mark.parametrize("token", [TOKEN, "t" * 128])
def test_an_activation_token_alone_is_accepted(token: str) -> None:
    validate_activation("", token)


def test_a_code_and_a_token_together_are_refused_on_token() -> None:
    assert refusal(lambda: validate_activation("123456", TOKEN)) == [
        FieldViolation("token", "send either the code or the token, not both")
    ]


@pytest.mark.parametrize("token", ["t" * 129, "t\u00f6ken"])
def test_a_token_too_long_or_not_ascii_is_refused_on_token(token: str) -> None:
    assert refusal(lambda: validate_activation("", token)) == [
        FieldViolation("token", "must be the token from the activation email")
    ]


# Identifiers and ids


@pytest.mark.parametrize("identifier", ["jane", "jane@example.test", "x" * 254])
def test_an_identifier_up_to_254_characters_is_accepted(identifier: str) -> None:
    validate_identifier(identifier)


@pytest.mark.parametrize("identifier", ["", "   "])
def test_a_blank_identifier_is_required(identifier: str) -> None:
    assert refusal(lambda: validate_identifier(identifier)) == [
        FieldViolation("identifier", "is required: a username or email")
    ]


def test_a_long_identifier_is_refused_with_the_limit() -> None:
    assert refusal(lambda: validate_identifier("x" * 255)) == [
        FieldViolation("identifier", "must be at most 254 characters")
    ]


def test_an_identifier_is_refused_under_the_field_the_caller_sent() -> None:
    assert [v.field for v in refusal(lambda: validate_identifier("", "new_identifier"))] == ["new_identifier"]
    assert [v.field for v in refusal(lambda: validate_identifier("x" * 255, "new_identifier"))] == ["new_identifier"]


@pytest.mark.parametrize(("value", "valid"), [("0123456789abcdef01234567", True), ("A" * 24, False), ("a" * 23, False)])
def test_ids_are_24_lower_case_hexadecimal_digits(value: str, valid: bool) -> None:
    assert is_id(value) is valid


@pytest.mark.parametrize("value", [None, 12, b"a" * 24])
def test_only_a_string_is_an_id(value: object) -> None:
    assert not is_id(value)


def test_a_bad_user_id_is_refused_on_the_field_that_holds_it() -> None:
    rule = "must be 24 lower-case hexadecimal digits"
    assert refusal(lambda: validate_user_id("42")) == [FieldViolation("id", rule)]
    assert refusal(lambda: validate_user_id("42", "user_id")) == [FieldViolation("user_id", rule)]
    validate_user_id("a" * 24)


# Sign-in password


@pytest.mark.parametrize("password", ["x", "x" * 128, E_ACUTE_DECOMPOSED * 128])
def test_a_sign_in_password_up_to_128_characters_once_normalized_is_checked(password: str) -> None:
    """Measured as at registration: a password that could register can sign in."""
    validate_login_password(password)


def test_an_empty_sign_in_password_is_required() -> None:
    assert refusal(lambda: validate_login_password("")) == [FieldViolation("password", "is required")]


def test_a_sign_in_password_over_128_characters_is_refused() -> None:
    assert refusal(lambda: validate_login_password("x" * 129)) == [
        FieldViolation("password", "must be at most 128 characters")
    ]


# New passwords


POLICY = PasswordPolicy(common_passwords=frozenset({"password1234"}))


def test_a_new_password_of_12_to_128_characters_is_accepted() -> None:
    assert POLICY.violations("x" * 12, context_words=()) == []
    assert POLICY.violations("x" * 128, context_words=()) == []


def test_a_short_new_password_is_refused_with_the_minimum() -> None:
    assert POLICY.violations("x" * 11, context_words=()) == [
        FieldViolation("password", "must be at least 12 characters")
    ]
    assert PasswordPolicy(min_length=15).violations("x" * 14, context_words=()) == [
        FieldViolation("password", "must be at least 15 characters")
    ]


def test_length_counts_characters_however_they_were_typed() -> None:
    assert POLICY.violations(E_ACUTE_DECOMPOSED * 11, context_words=()) != []
    assert POLICY.violations(E_ACUTE_DECOMPOSED * 128, context_words=()) == []


def test_a_long_new_password_is_refused_with_the_maximum() -> None:
    assert POLICY.violations("x" * 129, context_words=()) == [
        FieldViolation("password", "must be at most 128 characters")
    ]


@pytest.mark.parametrize("password", ["password1234", "PassWord1234"])
def test_a_common_password_is_refused_in_any_letter_case(password: str) -> None:
    assert POLICY.violations(password, context_words=()) == [
        FieldViolation("password", "is one of the most common passwords; a few unrelated words make a good one")
    ]


@pytest.mark.parametrize("word", ["jane", "JANE", "Doe"])
def test_a_new_password_containing_the_username_or_email_is_refused(word: str) -> None:
    assert POLICY.violations("my-jane-doe-secret", context_words=(word, "unrelated")) == [
        FieldViolation("password", "must not contain the username or email")
    ]


def test_context_words_shorter_than_three_characters_do_not_count() -> None:
    """A two-letter username would rule out too many good passwords."""
    assert POLICY.violations("my-jo-secret-words", context_words=("jo", "")) == []


def test_password_violations_are_named_after_the_field_asked_for() -> None:
    for password, words in (("short", ()), ("x" * 129, ()), ("password1234", ()), ("my-jane-secret", ("jane",))):
        violations = POLICY.violations(password, context_words=words, field="new_password")
        assert [v.field for v in violations] == ["new_password"]


def test_passwords_equal_once_normalized() -> None:
    assert passwords_equal(f"caf{E_ACUTE} au lait", f"caf{E_ACUTE_DECOMPOSED} au lait")
    assert not passwords_equal("cafe au lait", f"caf{E_ACUTE} au lait")


# Registration


def registration(**changes: str) -> Registration:
    fields = {
        "username": "jane",
        "first_name": "Jane",
        "last_name": "Doe",
        "email": "jane.doe@example.com",
        "password": PASSWORD,
        "password_confirmation": PASSWORD,
    }
    fields.update(changes)
    if "password" in changes and "password_confirmation" not in changes:
        fields["password_confirmation"] = changes["password"]
    return Registration(**fields, gender=Gender.FEMALE, role=Role.USER)


def test_a_good_registration_is_accepted() -> None:
    validate_registration(registration(), password_policy=POLICY)


def test_every_bad_field_of_a_registration_is_named_at_once() -> None:
    bad = registration(
        username="j",
        first_name=" ",
        last_name="x" * 101,
        email="not an address",
        password="short",
        password_confirmation="other",
    )
    violations = refusal(lambda: validate_registration(bad, password_policy=POLICY))
    assert [(v.field, v.description) for v in violations if v.field != "email"] == [
        ("username", USERNAME_RULE),
        ("first_name", "is required"),
        ("last_name", "must be at most 100 characters"),
        ("password", "must be at least 12 characters"),
        ("password_confirmation", "must equal password"),
    ]
    assert [v.field for v in violations if v.field == "email"] == ["email"]


@pytest.mark.parametrize("password", ["i-am-jane_d-really", "i-am-jane.doe-really"])
def test_a_registration_password_must_not_contain_the_username_or_the_email_local_part(password: str) -> None:
    bad = registration(username="jane_d", email="jane.doe@example.com", password=password)
    assert refusal(lambda: validate_registration(bad, password_policy=POLICY)) == [
        FieldViolation("password", "must not contain the username or email")
    ]


def test_a_confirmation_equal_once_normalized_is_accepted() -> None:
    password = f"caf{E_ACUTE} au lait, please"
    typed_again = f"caf{E_ACUTE_DECOMPOSED} au lait, please"
    validate_registration(registration(password=password, password_confirmation=typed_again), password_policy=POLICY)


@pytest.mark.parametrize("username", ["jo", "j" * 33, "jane doe", "jane@example", "jäne"])
def test_a_bad_username_is_refused_with_the_rule(username: str) -> None:
    violations = refusal(lambda: validate_registration(registration(username=username), password_policy=POLICY))
    assert FieldViolation("username", USERNAME_RULE) in violations


@pytest.mark.parametrize("username", ["jan", "j" * 32, "Jane.Doe_1-x"])
def test_a_username_of_3_to_32_allowed_characters_is_accepted(username: str) -> None:
    validate_registration(registration(username=username), password_policy=POLICY)


@pytest.mark.parametrize(
    ("value", "description"),
    [
        ("", "is required"),
        ("  ", "is required"),
        ("x" * 101, "must be at most 100 characters"),
        ("Jane\nDoe", CONTROL_RULE),  # Cc
        ("Jane\u200bDoe", CONTROL_RULE),  # Cf: zero-width space
        ("Jane\u202eeoD", CONTROL_RULE),  # Cf: right-to-left override
        ("Jane\u2028Doe", CONTROL_RULE),  # Zl
        ("Jane\u2029Doe", CONTROL_RULE),  # Zp
        ("Jane\ud800Doe", CONTROL_RULE),  # Cs: a lone surrogate
    ],
)
@pytest.mark.parametrize("field", ["first_name", "last_name"])
def test_a_bad_name_is_refused_naming_the_field_and_the_rule(field: str, value: str, description: str) -> None:
    bad = registration(**{field: value})
    assert refusal(lambda: validate_registration(bad, password_policy=POLICY)) == [FieldViolation(field, description)]


@pytest.mark.parametrize("value", ["J", "x" * 100, "Zoë O'Brien-Ñúñez", "李"])
def test_names_up_to_100_printable_characters_are_accepted(value: str) -> None:
    validate_registration(registration(first_name=value, last_name=value), password_policy=POLICY)


# UpdateUser


def test_profile_changes_of_valid_values_are_accepted() -> None:
    validate_profile_changes(ProfileChanges(first_name="Janet", last_name="Smith", gender=Gender.OTHER, username="jjs"))
    validate_profile_changes(ProfileChanges())  # fields left out are not checked


def test_every_bad_profile_change_is_named_by_its_path_in_user() -> None:
    changes = ProfileChanges(username="x", first_name="", last_name="Doe\u0000")
    assert refusal(lambda: validate_profile_changes(changes)) == [
        FieldViolation("user.username", USERNAME_RULE),
        FieldViolation("user.first_name", "is required"),
        FieldViolation("user.last_name", CONTROL_RULE),
    ]


@pytest.mark.parametrize(
    ("changes", "field"),
    [(ProfileChanges(first_name="x" * 101), "first_name"), (ProfileChanges(last_name="x" * 101), "last_name")],
)
def test_a_too_long_name_change_is_refused_on_its_path(changes: ProfileChanges, field: str) -> None:
    assert refusal(lambda: validate_profile_changes(changes)) == [
        FieldViolation(f"user.{field}", "must be at most 100 characters")
    ]


# Imported users

BCRYPT_HASH = "$2b$04$5oEuzFvewtss3uDyVQxzPevYVsaXwfeDcT1VlU37oNQn9kP9VKvvu"
HASH_RULE = "must be a bcrypt hash: $2a$, $2b$ or $2y$, cost, salt and hash"


def imported(**changes: str) -> ImportedUser:
    fields = {
        "username": "jane",
        "first_name": "Jane",
        "last_name": "Doe",
        "email": "jane@example.com",
        "password_hash": BCRYPT_HASH,
    }
    fields.update(changes)
    return ImportedUser(
        username=fields["username"],
        first_name=fields["first_name"],
        last_name=fields["last_name"],
        email=fields["email"],
        password_hash=fields["password_hash"],
        gender=Gender.FEMALE,
        role=Role.USER,
        email_verified=True,
    )


@pytest.mark.parametrize(
    "password_hash",
    [
        "",  # none: the person sets a password with ForgotPassword
        BCRYPT_HASH,
        BCRYPT_HASH.replace("$2b$", "$2a$"),
        BCRYPT_HASH.replace("$2b$", "$2y$"),
        BCRYPT_HASH.replace("$04$", "$16$"),
    ],
)
def test_an_imported_user_with_a_bcrypt_hash_or_none_is_accepted(password_hash: str) -> None:
    validate_imported_user(imported(password_hash=password_hash))


@pytest.mark.parametrize(
    "password_hash",
    [
        "secret",
        BCRYPT_HASH.replace("$2b$", "$2x$"),
        BCRYPT_HASH[:-1],
        BCRYPT_HASH + "u",
        BCRYPT_HASH[:-1] + "v",  # the last character's padding bits are not zero
        BCRYPT_HASH[:28] + "v" + BCRYPT_HASH[29:],  # nor those of the salt's last character
        " " + BCRYPT_HASH,
    ],
)
def test_an_imported_password_hash_that_is_no_bcrypt_hash_is_refused(password_hash: str) -> None:
    assert refusal(lambda: validate_imported_user(imported(password_hash=password_hash))) == [
        FieldViolation("password_hash", HASH_RULE)
    ]


@pytest.mark.parametrize("cost", ["03", "17", "31", "00"])
def test_an_imported_bcrypt_cost_outside_4_to_16_is_refused(cost: str) -> None:
    """A high cost would make every sign-in try hold a hashing thread for seconds or days."""
    password_hash = BCRYPT_HASH.replace("$04$", f"${cost}$")
    assert refusal(lambda: validate_imported_user(imported(password_hash=password_hash))) == [
        FieldViolation("password_hash", "the bcrypt cost must be 04 to 16 (USERS_BCRYPT_ROUNDS)")
    ]


def test_an_imported_bcrypt_cost_above_our_own_is_refused() -> None:
    """A guess on the account would cost more hashing than one on a native account."""
    ours, costlier = BCRYPT_HASH.replace("$04$", "$12$"), BCRYPT_HASH.replace("$04$", "$13$")
    validate_imported_user(imported(password_hash=ours), max_cost=12)
    assert refusal(lambda: validate_imported_user(imported(password_hash=costlier), max_cost=12)) == [
        FieldViolation("password_hash", "the bcrypt cost must be 04 to 12 (USERS_BCRYPT_ROUNDS)")
    ]


def test_an_imported_user_is_held_to_the_registration_rules_for_its_profile() -> None:
    bad = imported(username="j", first_name="", last_name="Doe", email="", password_hash="secret")
    assert refusal(lambda: validate_imported_user(bad)) == [
        FieldViolation("username", USERNAME_RULE),
        FieldViolation("first_name", "is required"),
        FieldViolation("email", "is required"),
        FieldViolation("password_hash", HASH_RULE),
    ]


# Emails


def test_an_empty_email_is_required() -> None:
    assert refusal(lambda: normalized_email("")) == [FieldViolation("email", "is required")]


def test_an_email_of_254_characters_is_accepted() -> None:
    email = "j" * 64 + "@" + "a" * 63 + "." + "b" * 63 + "." + "c" * 56 + ".test"
    assert len(email) == 254
    assert normalized_email(email) == email


def test_an_email_over_254_characters_is_refused_with_the_limit() -> None:
    email = "jane.d@" + "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 60 + ".test"
    assert len(email) == 255
    assert refusal(lambda: normalized_email(email)) == [FieldViolation("email", "must be at most 254 characters")]


@pytest.mark.parametrize(
    "email", ["jane@", "@example.test", "jane", "jane@@example.test", "jäne@example.test", '"jane"@example.test']
)
def test_an_email_that_is_no_bare_address_is_refused_saying_what_one_is(email: str) -> None:
    violations = refusal(lambda: normalized_email(email))
    assert [v.field for v in violations] == ["email"]
    assert violations[0].description.startswith(EMAIL_RULE + ": ")


def test_an_encoded_word_before_the_at_sign_is_refused_saying_so() -> None:
    assert refusal(lambda: normalized_email("=?utf-8?q?x?=@example.test")) == [
        FieldViolation("email", f"{EMAIL_RULE}: '=?' is not allowed before the @-sign")
    ]


def test_a_registration_email_is_checked_by_the_same_rules() -> None:
    bad = registration(email="jane@example.test(2)")
    violations = refusal(lambda: validate_registration(bad, password_policy=POLICY))
    assert [v.field for v in violations] == ["email"]
    assert violations[0].description.startswith(EMAIL_RULE)


def test_a_key_of_an_identifier_with_a_domain_no_address_has_is_still_folded() -> None:
    """Older rules stored such addresses; a sign-in with any letter case still finds them."""
    assert identifier_key("Jane@Under_Score.EXAMPLE") == "jane@under_score.example"


# ListUsers prefix


@pytest.mark.parametrize("prefix", ["", "ja", "x" * 254])
def test_a_prefix_up_to_254_printable_characters_is_accepted(prefix: str) -> None:
    validate_prefix(prefix)


def test_a_long_prefix_is_refused_with_the_limit() -> None:
    assert refusal(lambda: validate_prefix("x" * 255)) == [FieldViolation("prefix", "must be at most 254 characters")]


@pytest.mark.parametrize("prefix", ["ja\n", "ja\u200b", "ja\u2028"])
def test_a_prefix_with_control_characters_is_refused(prefix: str) -> None:
    assert refusal(lambda: validate_prefix(prefix)) == [
        FieldViolation("prefix", "must not contain control or format characters")
    ]
