"""``blockbackup repo init|key|sync``: create a repository, manage its keys, copy it.

- ``repo init PATH --passphrase-env VAR | --passphrase-file F | --key-file F | --no-encryption``
- ``repo key list|add|remove --repo PATH``: key slots wrap one master key; adding or removing
  one re-encrypts no data.
- ``repo sync SRC DST``: copy a repository between a directory and S3 (``repo_sync``).
"""

from __future__ import annotations

import argparse
from typing import Any

from blockbackup.cli import repo_sync
from blockbackup.cli.repo_common import (
    add_json_arg,
    add_repo_arg,
    add_secret_args,
    add_storage_args,
    emit,
    guarded,
    open_repository,
    read_secret,
    storage_options,
)
from blockbackup.errors import BlockBackupError


def add_parser(sub: Any) -> None:
    repo = sub.add_parser("repo", help="backup repositories: init, keys, backup an image")
    cmds = repo.add_subparsers(dest="repo_command", required=True)

    init = cmds.add_parser("init", help="create a repository")
    init.add_argument("path", metavar="PATH")
    add_secret_args(init)
    init.add_argument("--no-encryption", action="store_true", help="store data unencrypted")
    _add_kdf_arg(init)
    add_storage_args(init)
    add_json_arg(init)
    init.set_defaults(run=_init)

    key = cmds.add_parser("key", help="list, add or remove the passphrases and key files")
    keys = key.add_subparsers(dest="key_command", required=True)
    listing = keys.add_parser("list", help="list the key slots")
    add_repo_arg(listing)
    add_json_arg(listing)
    listing.set_defaults(run=_key_list)
    add = keys.add_parser("add", help="add a passphrase or key file (give the new one with new-)")
    add_repo_arg(add)
    add_secret_args(add)
    add_secret_args(add, prefix="new-")
    add.add_argument("--comment", default="", help="a note shown by key list")
    _add_kdf_arg(add)
    add_json_arg(add)
    add.set_defaults(run=_key_add)
    remove = keys.add_parser("remove", help="remove a key slot (never the last one)")
    add_repo_arg(remove)
    remove.add_argument("slot", metavar="SLOT")
    add_secret_args(remove)
    add_json_arg(remove)
    remove.set_defaults(run=_key_remove)

    repo_sync.add_parser(cmds)


#: ``repository.keys.KDFS`` (default first), written out so that building the parser does
#: not import ``cryptography`` (a test keeps the two equal).
KDFS = ("argon2id", "scrypt")


class _KdfAction(argparse.Action):
    """Stores the choice and notes that it was given (``--no-encryption`` refuses it)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)
        namespace.kdf_given = True


def _add_kdf_arg(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(kdf_given=False)
    parser.add_argument(
        "--kdf",
        choices=KDFS,
        default=KDFS[0],
        action=_KdfAction,
        help=f"how the passphrase or key file wraps the key (default: {KDFS[0]}, "
        "64 MiB and 3 passes per try; scrypt: 32 MiB)",
    )


@guarded
def _init(args: argparse.Namespace) -> int:
    from blockbackup.repository.repo import Repository  # lazy: start-up cost

    given = any((args.passphrase_env, args.passphrase_file, args.key_file))
    if args.no_encryption and given:
        raise BlockBackupError("--no-encryption takes no passphrase or key file")
    if args.no_encryption and args.kdf_given:
        raise BlockBackupError("--no-encryption takes no --kdf: there is no key to wrap")
    secret, kind = None, "passphrase"
    if not args.no_encryption:
        got = read_secret(args, prompt="New passphrase", confirm=True)
        if got is None:
            raise BlockBackupError(
                "give --passphrase-env VAR, --passphrase-file FILE or --key-file FILE "
                "(or --no-encryption)"
            )
        secret, kind = got
    repo = Repository.init(args.path, secret, kind, kdf=args.kdf, options=storage_options(args))
    encryption = repo.config["encryption"]
    emit(
        args,
        {"repository": args.path, "id": repo.id, "encryption": encryption},
        f"created repository {args.path} (encryption: {encryption})",
    )
    return 0


@guarded
def _key_list(args: argparse.Namespace) -> int:
    from blockbackup.repository.repo import Repository  # lazy: start-up cost

    # the slots are not secret: listing them needs no key
    slots = Repository.key_slots_at(args.repo, storage_options(args))
    rows = [
        {
            "slot": s,
            "kind": v["kind"],
            "kdf": v["kdf"],
            "created": v["created"],
            "comment": v.get("comment", ""),
        }
        for s, v in sorted(slots.items())
    ]
    text = "\n".join(
        f"{r['slot']}  {r['kind']:10}  {r['kdf']:8}  {r['created']}  {r['comment']}" for r in rows
    )
    emit(args, rows, text or "no key slots (the repository is not encrypted)")
    return 0


@guarded
def _key_add(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    got = read_secret(args, prefix="new-", prompt="New passphrase", confirm=True)
    if got is None:
        raise BlockBackupError(
            "give the new secret with --new-passphrase-env, --new-passphrase-file or --new-key-file"
        )
    slot = repo.add_key(got[0], got[1], args.comment, kdf=args.kdf)
    emit(
        args,
        {"slot": slot, "kind": got[1], "kdf": args.kdf},
        f"added key slot {slot} ({args.kdf})",
    )
    return 0


@guarded
def _key_remove(args: argparse.Namespace) -> int:
    repo = open_repository(args)
    repo.remove_key(args.slot)
    emit(args, {"removed": args.slot}, f"removed key slot {args.slot}")
    return 0
