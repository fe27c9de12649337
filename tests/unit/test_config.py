"""Settings come from USERS_* variables; bad values name the variable."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT
from users_grpc.config import MIN_BCRYPT_ROUNDS, READ_BY_COMMANDS, Settings, UnknownVariable
from users_grpc.domain.errors import ConfigError


def test_defaults_serve_locally() -> None:
    """With nothing set, the service listens on loopback and writes mail to files."""
    settings = Settings.from_env({})
    assert settings.grpc_address == "127.0.0.1:50051"
    assert settings.smtp_host is None
    assert settings.mail_dir == Path("var/mail")


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "USERS_GRPC_ADDRESS": "[::]:6000",
            "USERS_SMTP_HOST": "smtp.example.com",
            "USERS_SMTP_PORT": "465",
            "USERS_SMTP_SECURITY": "TLS",
            "USERS_REFLECTION": "off",
            "USERS_DB_TIMEOUT_SECONDS": "2.5",
        }
    )
    assert settings.grpc_address == "[::]:6000"
    assert (settings.smtp_host, settings.smtp_port, settings.smtp_security) == ("smtp.example.com", 465, "tls")
    assert settings.reflection is False
    assert settings.db_timeout_seconds == 2.5


def test_settings_are_frozen() -> None:
    settings = Settings.from_env({})
    with pytest.raises(AttributeError):
        settings.grpc_address = "0.0.0.0:1"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("USERS_GRPC_ADDRESS", "50051"),
        ("USERS_SMTP_PORT", "smtp"),
        ("USERS_SMTP_PORT", "70000"),
        ("USERS_SMTP_SECURITY", "ssl3"),
        ("USERS_MONGODB_URI", "http://db"),
        ("USERS_MONGODB_DATABASE", "users.v1"),
        ("USERS_PASSWORD_MIN_LENGTH", "8"),
        ("USERS_BCRYPT_ROUNDS", "4"),
        ("USERS_REFLECTION", "maybe"),
        ("USERS_MAIL_FROM", "nobody"),
        ("USERS_MAIL_FROM", "a@example.com, b@example.com"),
        ("USERS_MAIL_FROM", "Accounts <no-reply@example.com"),
        ("USERS_MAIL_FROM", "Team: a@example.com;"),
        ("USERS_MAIL_FROM", "no-reply@example.com\r\nBcc: eve@example.com"),
        ("USERS_SESSION_RETENTION_SECONDS", "-1"),
        ("USERS_MAIL_FAILED_RETENTION_SECONDS", "a week"),
        ("USERS_UNACTIVATED_ACCOUNT_RETENTION_SECONDS", "60"),
        ("USERS_HOUSEKEEPING_INTERVAL_SECONDS", "0"),
        ("USERS_AUDIT_RETENTION_DAYS", "0"),
        ("USERS_RATE_LIMIT_SIGN_UP_REQUESTS", "0"),
        ("USERS_RATE_LIMIT_SIGN_IN_REQUESTS", "many"),
        ("USERS_WORKERS", "0"),
        ("USERS_WORKERS", "all"),
        ("USERS_HTTP_TRUSTED_PROXIES", "*"),  # trusting every peer lets any client name its address
        ("USERS_HTTP_TRUSTED_PROXIES", "10.0.0.1/8"),  # host bits: uvicorn would take it for a name
        ("USERS_HTTP_TRUSTED_PROXIES", "ingress.example.com"),
    ],
)
def test_bad_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_workers_are_one_per_core_and_share_the_cores_for_hashing() -> None:
    """N workers each hashing on every core would only queue behind each other."""
    everyone = len(os.sched_getaffinity(0))
    assert (Settings.from_env({}).workers, Settings.from_env({}).hash_workers) == (everyone, 1)
    assert Settings.from_env({"USERS_WORKERS": "1"}).hash_workers == everyone
    assert Settings.from_env({"USERS_WORKERS": "1", "USERS_HASH_WORKERS": "3"}).hash_workers == 3


def test_trusted_proxies_are_addresses_and_networks() -> None:
    settings = Settings.from_env({"USERS_HTTP_TRUSTED_PROXIES": "10.0.0.0/8, 192.0.2.7,fd00::/8"})
    assert settings.http_trusted_proxies == ("10.0.0.0/8", "192.0.2.7", "fd00::/8")
    assert Settings.from_env({}).http_trusted_proxies == ()


@pytest.mark.parametrize("rounds", ["4", "9"])
def test_the_environment_never_sets_a_bcrypt_cost_below_the_floor(rounds: str) -> None:
    """The suite's servers hash at cost 4 through a flag of Settings; no variable reaches it, so
    from the environment (what an operator sets) the cost stays at 10 or more."""
    with pytest.raises(ConfigError, match="USERS_BCRYPT_ROUNDS"):
        Settings.from_env({"USERS_BCRYPT_ROUNDS": rounds, "USERS_INSECURE_BCRYPT_FOR_TESTS": "1"})
    unread = Settings.from_env({"USERS_INSECURE_BCRYPT_FOR_TESTS": "true"})
    assert unread.insecure_bcrypt_for_tests is False
    assert [variable.name for variable in unread.unknown_variables] == ["USERS_INSECURE_BCRYPT_FOR_TESTS"]
    assert Settings.from_env({"USERS_BCRYPT_ROUNDS": str(MIN_BCRYPT_ROUNDS)}).bcrypt_rounds == MIN_BCRYPT_ROUNDS == 10


def test_settings_below_the_bcrypt_floor_need_the_test_only_flag() -> None:
    with pytest.raises(ConfigError, match="bcrypt_rounds=9: below the floor of 10"):
        Settings(bcrypt_rounds=9)
    with pytest.raises(ConfigError, match="bcrypt_rounds=4"):
        dataclasses.replace(Settings.from_env({}), bcrypt_rounds=4)
    assert Settings(bcrypt_rounds=4, insecure_bcrypt_for_tests=True).bcrypt_rounds == 4


def test_a_flow_without_a_budget_of_its_own_takes_the_shared_setting() -> None:
    """Unset, a flow's budget is None (USERS_RATE_LIMIT_REQUESTS then sets it); set, it is its own."""
    settings = Settings.from_env({"USERS_RATE_LIMIT_SIGN_UP_REQUESTS": "500", "USERS_RATE_LIMIT_REQUESTS": "30"})
    assert settings.rate_limit_sign_up_requests == 500
    assert settings.rate_limit_requests == 30
    assert settings.rate_limit_sign_in_requests is None
    assert settings.rate_limit_activation_requests is None
    assert settings.rate_limit_recovery_requests is None


def unset_until_the_test_ends(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Unset, and unset again after the test whatever it set (``main(["dev"])`` sets defaults in
    os.environ). delenv alone records nothing to undo for a variable that was not set, and the
    leftover would reach every server a later test starts."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("USERS_DB_TIMEOUT_SECONDS", "abc", "USERS_DB_TIMEOUT_SECONDS='abc': must be a number of seconds, such as 5.0"),
        (
            "USERS_ACCESS_TOKEN_TTL_SECONDS",
            "15m",
            "USERS_ACCESS_TOKEN_TTL_SECONDS='15m': must be a whole number of seconds, such as 900",
        ),
        (
            "USERS_AUDIT_RETENTION_DAYS",
            "1y",
            "USERS_AUDIT_RETENTION_DAYS='1y': must be a whole number of days, such as 365",
        ),
        ("USERS_SMTP_PORT", "smtp", "USERS_SMTP_PORT='smtp': must be a whole number, such as 587"),
    ],
)
def test_a_number_that_does_not_parse_is_told_what_is_expected(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.from_env({name: value})
    assert str(raised.value) == message


def test_unknown_users_variables_are_found_with_the_nearest_known_name() -> None:
    settings = Settings.from_env(
        {
            "USERS_BCRYPT_ROUND": "10",
            "USERS_SMTP_HOTS": "mail.example.com",
            "USERS_ZZZZZZZZZZZZZZZZZZZZ": "1",
            "USERS_BCRYPT_ROUNDS": "13",
            "USERS_ADMIN_PASSWORD": "read by create-admin",
            "HOME": "/root",
        }
    )
    assert settings.unknown_variables == (
        UnknownVariable("USERS_BCRYPT_ROUND", "USERS_BCRYPT_ROUNDS"),
        UnknownVariable("USERS_SMTP_HOTS", "USERS_SMTP_HOST"),
        UnknownVariable("USERS_ZZZZZZZZZZZZZZZZZZZZ", None),
    )
    assert settings.bcrypt_rounds == 13
    assert Settings.from_env({"USERS_BCRYPT_ROUNDS": "13"}).unknown_variables == ()


def test_unknown_variables_are_logged_once_each_at_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from users_grpc import __main__ as cli

    monkeypatch.setattr(cli, "_dev", lambda settings, data_dir, db_listen: 0)
    monkeypatch.setattr(cli, "_dev_key_encryption_key", lambda: "A" * 43)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    unset_until_the_test_ends(monkeypatch, "USERS_KEY_ENCRYPTION_KEY", "USERS_HTTP_ADDRESS", "USERS_WORKERS")
    monkeypatch.setenv("USERS_BCRYPT_ROUND", "10")
    with caplog.at_level("WARNING", logger="users_grpc"):
        assert cli.main(["dev"]) == 0
    warnings = [
        record
        for record in caplog.records
        if record.getMessage() == "unknown setting ignored" and record.variable == "USERS_BCRYPT_ROUND"  # type: ignore[attr-defined]
    ]
    assert [record.did_you_mean for record in warnings] == ["USERS_BCRYPT_ROUNDS"]  # type: ignore[attr-defined]


def test_an_account_must_outlive_its_activation_code() -> None:
    with pytest.raises(ConfigError, match="USERS_UNACTIVATED_ACCOUNT_RETENTION_SECONDS"):
        Settings.from_env(
            {"USERS_UNACTIVATED_ACCOUNT_RETENTION_SECONDS": "7200", "USERS_ACTIVATION_CODE_TTL_SECONDS": "7201"}
        )


def test_env_example_lists_every_variable() -> None:
    """.env.example documents exactly the variables config.py reads, each set to its default."""
    source = (REPO_ROOT / "users_grpc/config.py").read_text()
    read = set(re.findall(r'"(USERS_[A-Z_]+)"', source)) - READ_BY_COMMANDS
    example = (REPO_ROOT / ".env.example").read_text()
    documented = dict(re.findall(r"^(USERS_[A-Z_]+)=(.*)$", example, flags=re.MULTILINE))
    assert set(documented) == read
    assert Settings.from_env(documented) == Settings()


def test_the_sender_is_parsed_once_into_an_address() -> None:
    sender = Settings.from_env({"USERS_MAIL_FROM": "Accounts <no-reply@example.com>"}).mail_from
    assert (sender.display_name, sender.username, sender.domain) == ("Accounts", "no-reply", "example.com")
    assert Settings.from_env({"USERS_MAIL_FROM": "no-reply@example.com"}).mail_from.addr_spec == "no-reply@example.com"


@pytest.mark.parametrize(
    ("given", "served"), [(None, "127.0.0.1:9464"), ("", None), ("127.0.0.1:9100", "127.0.0.1:9100")]
)
def test_dev_serves_http_unless_told_not_to_and_serve_does_not(
    monkeypatch: pytest.MonkeyPatch, given: str | None, served: str | None
) -> None:
    from users_grpc import __main__ as cli

    started: list[Settings] = []

    def dev(settings: Settings, data_dir: Path, db_listen: str) -> int:
        started.append(settings)
        return 0

    monkeypatch.setattr(cli, "_dev", dev)
    monkeypatch.setattr(cli, "_dev_key_encryption_key", lambda: "A" * 43)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    # main() sets these defaults in the process environment: put back after.
    unset_until_the_test_ends(monkeypatch, "USERS_KEY_ENCRYPTION_KEY", "USERS_HTTP_ADDRESS", "USERS_WORKERS")
    if given is not None:
        monkeypatch.setenv("USERS_HTTP_ADDRESS", given)
    assert cli.main(["dev"]) == 0
    assert started[0].http_address == served
    assert Settings.from_env({}).http_address is None  # serve: off unless set
