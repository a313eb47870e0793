"""Key slots under both key derivation functions: Argon2id (the default) and scrypt,
mixed in one repository, each opening it; a wrong passphrase is one line."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from blockbackup.cli import repo as repo_cli
from blockbackup.repository import keys
from blockbackup.repository.errors import CorruptData, WrongKey
from blockbackup.repository.repo import Repository
from testkit import repocli

BB = repocli.BB
ENV = {**os.environ, "BBP": "the passphrase", "OTHER": "another one", "BAD": "not it"}


bb = functools.partial(repocli.bb, env=ENV, timeout=120)


js = repocli.js


def test_the_cli_offers_the_library_kdfs() -> None:
    assert repo_cli.KDFS == keys.KDFS


@pytest.mark.parametrize("kdf", ["argon2id", "scrypt"])
def test_each_kdf_opens_and_records_its_costs(tmp_path: Path, kdf: str) -> None:
    repo = Repository.init(str(tmp_path / "r"), b"secret", kdf=kdf)
    ((slot_id, slot),) = repo.key_slots().items()
    assert slot["kdf"] == kdf
    expected = {"argon2id": {"m": 65536, "t": 3, "p": 4}, "scrypt": {"n": 1 << 15, "r": 8, "p": 1}}
    assert {k: slot[k] for k in expected[kdf]} == expected[kdf]
    again = Repository.open(str(tmp_path / "r"), b"secret")
    assert again.keys.master == repo.keys.master
    with pytest.raises(WrongKey):
        Repository.open(str(tmp_path / "r"), b"wrong")
    assert slot_id


def test_a_slot_asking_for_absurd_costs_is_damaged_not_obeyed(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), b"secret", kdf="argon2id")
    ((slot_id, slot),) = repo.key_slots().items()
    slot["m"] = 1 << 40  # 1 PiB of memory per try
    (tmp_path / "r" / "keys" / slot_id).write_text(json.dumps(slot))
    with pytest.raises(CorruptData, match=f"key slot {slot_id} is damaged"):
        Repository.open(str(tmp_path / "r"), b"secret")


def test_mixed_slots_from_the_command_line(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    init = js(bb("repo", "init", repo, "--passphrase-env", "BBP", "--kdf", "scrypt", "--json"))
    assert init["encryption"] == "aes-256-gcm"
    added = js(
        bb("repo", "key", "add", "--repo", repo, "--passphrase-env", "BBP",
           "--new-passphrase-env", "OTHER", "--json")
    )  # fmt: skip
    assert added["kdf"] == "argon2id"  # the default
    rows = js(bb("repo", "key", "list", "--repo", repo, "--json"))
    assert sorted(r["kdf"] for r in rows) == ["argon2id", "scrypt"]
    text = bb("repo", "key", "list", "--repo", repo).stdout
    assert "scrypt" in text
    assert "argon2id" in text
    for var in ("BBP", "OTHER"):
        assert js(bb("snapshots", "--repo", repo, "--passphrase-env", var, "--json")) == []
    wrong = bb("snapshots", "--repo", repo, "--passphrase-env", "BAD", ok=False)
    assert "wrong passphrase" in wrong.stderr


def test_no_encryption_takes_no_kdf(tmp_path: Path) -> None:
    err = bb("repo", "init", tmp_path / "r", "--no-encryption", "--kdf", "scrypt", ok=False)
    assert "--no-encryption takes no --kdf" in err.stderr
    assert not (tmp_path / "r" / "config").exists()
    bb("repo", "init", tmp_path / "r", "--no-encryption")


@pytest.mark.parametrize("secret", [b"secret", b"wrong"])
def test_an_unlock_started_ahead_is_the_one_the_opening_takes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: bytes
) -> None:
    """The command line starts unlocking while it imports the engine: the opening takes
    that outcome (the slots are tried once in all), opened or refused alike."""
    repo = Repository.init(str(tmp_path / "r"), b"secret", kdf="scrypt")
    repo.add_key(b"other", kdf="scrypt")
    unlocks: list[bytes] = []
    unlock = keys._unlock

    def counted(slots: dict[str, dict[str, object]], secret: bytes, repo_id: str) -> object:
        unlocks.append(secret)
        return unlock(slots, secret, repo_id)

    monkeypatch.setattr(keys, "_unlock", counted)
    Repository.unlock_ahead(str(tmp_path / "r"), secret)
    if secret == b"secret":
        assert Repository.open(str(tmp_path / "r"), secret).keys.master == repo.keys.master
    else:
        with pytest.raises(WrongKey, match="wrong passphrase"):
            Repository.open(str(tmp_path / "r"), secret)
    assert unlocks == [secret]
    assert keys._ahead == {}  # taken: nothing is kept
    assert Repository.open(str(tmp_path / "r"), b"other").keys.master == repo.keys.master
    assert unlocks == [secret, b"other"]  # nothing ahead: unlocked as always
