"""Prove each promise of issue 11 is held: apply one one-line change that breaks it, run the tests
that hold it, expect them to fail, and put the code back. A promise whose change leaves its tests
green is reported SURVIVED. docs/testing.md lists what each change is and which test holds it.

    .venv/bin/python tests/tools/promise_mutations.py            # all of them
    .venv/bin/python tests/tools/promise_mutations.py M5a M12b   # some

It edits users_grpc/ in place while it runs: run nothing else in the work tree meanwhile.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
P = "tests/e2e/test_promises.py::"
SECRETS = "tests/e2e/test_secrets_at_rest.py::test_a_copy_of_the_database_holds_no_code_or_token"
# (name, file, anchor the change is searched after or None, the text, its replacement, the tests)
Mutation = tuple[str, str, str | None, str, str, list[str]]
MUTATIONS: list[Mutation] = [
    (
        "M1a sign-in success forgets source",
        "users_grpc/services/throttling.py",
        None,
        "        await self._store.forget(source_key)\n",
        "        pass\n",
        [P + "test_a_successful_sign_in_forgets_the_sources_failed_tries"],
    ),
    (
        "M1b repository forget deletes the tally",
        "users_grpc/adapters/mongo/throttles.py",
        "async def forget(self, key: str)",
        'await self._tallies.delete_one({"_id": key})',
        'await self._tallies.delete_one({"_id": key + "-"})',
        [P + "test_a_successful_sign_in_forgets_the_sources_failed_tries", "tests/integration/test_throttle_store.py"],
    ),
    (
        "M2a ChangePassword throttled",
        "users_grpc/services/passwords.py",
        None,
        "if not await self._accounts.password_matches(account, current_password, source=source):",
        "if not await self._hasher.verify(current_password, account.password_hash, account.password_scheme):",
        [P + "test_change_password_tries_count_toward_the_password_throttle"],
    ),
    (
        "M2b DisableMfa throttled",
        "users_grpc/services/mfa.py",
        "async def disable(",
        "if not await self._accounts.password_matches(account, password, source=source):",
        "if not await self._accounts._hasher.verify(password, account.password_hash, account.password_scheme):",
        [P + "test_disable_mfa_password_tries_count_toward_the_password_throttle"],
    ),
    (
        "M3a ConfirmMfa bumps token version",
        "users_grpc/adapters/mongo/users_mfa.py",
        "async def confirm_mfa(",
        '"$inc": {"token_version": 1},',
        '"$inc": {"token_version": 0},',
        [P + "test_confirm_mfa_ends_every_session_and_token_and_mails_a_notice"],
    ),
    (
        "M3b ConfirmMfa pends a notice",
        "users_grpc/adapters/mongo/users_mfa.py",
        "async def confirm_mfa(",
        "_with_notice(",
        "(lambda update, notice, now: update)(",
        [P + "test_confirm_mfa_ends_every_session_and_token_and_mails_a_notice"],
    ),
    (
        "M3c ConfirmMfa revokes sessions",
        "users_grpc/services/mfa.py",
        "async def confirm(",
        '        await self._after_change(account.user, "on")\n',
        "        pass\n",
        [P + "test_confirm_mfa_ends_every_session_and_token_and_mails_a_notice"],
    ),
    (
        "M4a refresh token digest",
        "users_grpc/services/sessions.py",
        "def _digest(self, token",
        'return self._digests.digest("refresh-token", token.session_id, token.text)',
        "return token.text",
        [SECRETS],
    ),
    (
        "M4b reset token digest",
        "users_grpc/services/passwords.py",
        "def _digest(self",
        'return self._digests.digest("password-reset", user_id, secret)',
        "return secret",
        [SECRETS],
    ),
    (
        "M4c activation code digest",
        "users_grpc/services/accounts.py",
        "def _activation_digest(",
        'return self._digests.digest("activation-code", user_id, code)',
        "return code",
        [SECRETS],
    ),
    (
        "M4d activation token digest",
        "users_grpc/services/accounts.py",
        "def _new_activation(",
        'token_digest=self._digests.digest("activation-token", user_id, token),',
        "token_digest=token,",
        [SECRETS],
    ),
    (
        "M5a delivered mail deleted",
        "users_grpc/adapters/mongo/outbox.py",
        "async def delivered(",
        'await self._outbox.delete_one({"_id": _object_id(mail_id)})',
        'await self._outbox.update_one({"_id": _object_id(mail_id)}, {"$set": {"status": "sent"}})',
        [P + "test_a_delivered_mail_is_deleted_from_the_outbox"],
    ),
    (
        "M5b give up at max attempts",
        "users_grpc/services/mail.py",
        None,
        "if queued.attempts >= self._max_attempts:",
        "if queued.attempts > self._max_attempts:",
        [P + "test_a_mail_is_given_up_after_the_maximum_attempts"],
    ),
    (
        "M6 ListSessions newest first",
        "users_grpc/adapters/mongo/sessions.py",
        None,
        'cursor.sort("created_at", -1)',
        'cursor.sort("created_at", 1)',
        [P + "test_list_sessions_is_newest_first"],
    ),
    (
        "M7a db work bounded by db timeout",
        "users_grpc/domain/budget.py",
        None,
        "return max(min(self.per_operation, self.deadline - time.monotonic()), 0.001)",
        "return max(self.deadline - time.monotonic(), 0.001)",
        [P + "test_database_work_ends_at_the_db_timeout_when_the_deadline_is_later"],
    ),
    (
        "M7b db work bounded by deadline",
        "users_grpc/domain/budget.py",
        None,
        "return max(min(self.per_operation, self.deadline - time.monotonic()), 0.001)",
        "return self.per_operation",
        [P + "test_database_work_ends_at_the_deadline_when_it_is_sooner_than_the_db_timeout"],
    ),
    (
        "M8 unknown kid reloads",
        "users_grpc/services/tokens.py",
        "if kid not in self._verifying",
        "                await self.reload()\n",
        "                pass\n",
        [P + "test_an_unknown_kid_makes_a_server_reload_its_keys"],
    ),
    (
        "M9 EnableMfa replaces pending",
        "users_grpc/adapters/mongo/users_mfa.py",
        "async def start_mfa_enrollment(",
        '"mfa.state": {"$ne": "active"}',
        '"mfa": None',
        [P + "test_a_new_enable_mfa_replaces_the_pending_enrollment"],
    ),
    (
        "M10a local part (registration)",
        "users_grpc/domain/rules.py",
        None,
        'context_words=(registration.username, registration.email.partition("@")[0])',
        "context_words=(registration.username,)",
        [P + "test_a_password_may_not_contain_the_emails_local_part"],
    ),
    (
        "M10b local part (new password)",
        "users_grpc/services/passwords.py",
        None,
        'context_words=(user.username, user.email.partition("@")[0])',
        "context_words=(user.username,)",
        [P + "test_a_password_may_not_contain_the_emails_local_part"],
    ),
    (
        "M10c length after normalization",
        "users_grpc/domain/rules.py",
        None,
        "        password = normalize_password(password)\n        length = len(password)\n",
        "        length = len(password)\n",
        [P + "test_password_lengths_count_after_normalization"],
    ),
    (
        "M11 MFA_REQUIRED reason",
        "users_grpc/services/mfa.py",
        None,
        "                raise MfaRequired()\n",
        '                raise FailedPrecondition("a second factor is required")\n',
        [P + "test_verify_credentials_names_mfa_required"],
    ),
    (
        "M12a shutdown delay",
        "users_grpc/bootstrap.py",
        None,
        "        await asyncio.sleep(self.settings.shutdown_delay_seconds)\n",
        "        pass\n",
        [P + "test_shutdown_takes_calls_during_the_delay_then_cuts_in_flight_calls_after_the_grace"],
    ),
    (
        "M12b shutdown grace",
        "users_grpc/bootstrap.py",
        None,
        "await self.server.stop(self.settings.shutdown_grace_seconds)",
        "await self.server.stop(None)",
        [P + "test_shutdown_takes_calls_during_the_delay_then_cuts_in_flight_calls_after_the_grace"],
    ),
    (
        "M13a new password ends tokens",
        "users_grpc/adapters/mongo/users_credentials.py",
        "def _new_password(",
        '"$inc": {"token_version": 1},',
        '"$inc": {"token_version": 0},',
        [P + "test_validate_token_refuses_the_tokens_of_a_user_who_changed"],
    ),
    (
        "M13b admin change ends tokens",
        "users_grpc/services/admin.py",
        None,
        "        await self._users.bump_token_version(user_id, now)\n",
        "        pass\n",
        [P + "test_validate_token_refuses_the_tokens_of_a_user_who_changed"],
    ),
    (
        "M13c inactive user's token refused",
        "users_grpc/services/sessions.py",
        "async def check_access_token",
        "if user is None or not user.is_active or user.token_version != claims.token_version:",
        "if user is None or user.token_version != claims.token_version:",
        [P + "test_validate_token_refuses_the_tokens_of_a_user_who_changed"],
    ),
    (
        "M14a keys new-kek",
        "users_grpc/__main__.py",
        None,
        "        print(new_key_encryption_key())\n",
        "        print(new_key_encryption_key()[:8])\n",
        [P + "test_keys_new_kek_prints_a_fresh_usable_key"],
    ),
    (
        "M14b dev stops its database",
        "users_grpc/__main__.py",
        "def _dev(",
        "        database.stop()\n",
        "        pass\n",
        [P + "test_dev_serves_on_the_embedded_database_and_stops_it"],
    ),
    (
        "M14c dev key file private",
        "users_grpc/__main__.py",
        None,
        "os.O_EXCL, 0o600)",
        "os.O_EXCL, 0o644)",
        [P + "test_dev_serves_on_the_embedded_database_and_stops_it"],
    ),
]


def main(only: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    survived = 0
    for name, path, anchor, old, new, tests in MUTATIONS:
        if only and name.split()[0] not in only:
            continue
        file = ROOT / path
        source = file.read_text()
        at = source.index(old, source.index(anchor) if anchor else 0)
        assert anchor or source.count(old) == 1, f"{name}: the text is not unique in {path}"
        file.write_text(source[:at] + new + source[at + len(old) :])
        try:
            started = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        finally:
            file.write_text(source)
        verdict = "killed (its tests fail)" if result.returncode != 0 else "SURVIVED"
        survived += result.returncode == 0
        print(f"{name}: {verdict} in {time.monotonic() - started:.0f} s", flush=True)  # noqa: T201
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
