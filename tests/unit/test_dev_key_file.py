"""`users-grpc dev` keeps its key-encryption key in var/key-encryption-key, readable by its owner alone."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from users_grpc import __main__ as cli


def test_the_dev_key_file_is_created_private_not_made_so_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    # A chmod after the write would leave a moment where the key is readable: make it do nothing,
    # and let the umask allow everything, so only the mode the file is created with counts.
    monkeypatch.setattr(Path, "chmod", lambda *_args, **_kwargs: None)
    previous = os.umask(0)
    try:
        key = cli._dev_key_encryption_key()
    finally:
        os.umask(previous)
    key_file = tmp_path / cli.DEV_KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert len(base64.urlsafe_b64decode(key)) == 32
    assert cli._dev_key_encryption_key() == key  # made once, then read
