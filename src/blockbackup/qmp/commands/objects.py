"""``object-add``/``object-del``: secrets, TLS credentials and throttle groups.

Why declared as a flat union: QEMU's ``ObjectOptions`` is one, tagged by ``qom-type``; the
declaration gives each type's properties their checks and their schema.
"""

from __future__ import annotations

from blockbackup.qmp.context import Context
from blockbackup.qmp.registry import Args, command
from blockbackup.qmp.schema import BOOL, INT, STR, Enum, Member, Struct

SECRET = Struct(
    "SecretProperties",
    [
        Member("loaded", BOOL, optional=True),
        Member("format", Enum("QCryptoSecretFormat", ("raw", "base64")), optional=True),
        Member("keyid", STR, optional=True),
        Member("iv", STR, optional=True),
        Member("data", STR, optional=True),
        Member("file", STR, optional=True),
    ],
)
TLS_CREDS_X509 = Struct(
    "TlsCredsX509Properties",
    [
        Member("verify-peer", BOOL, optional=True),
        Member("dir", STR, optional=True),
        Member("endpoint", Enum("QCryptoTLSCredsEndpoint", ("client", "server")), optional=True),
        Member("priority", STR, optional=True),
        Member("loaded", BOOL, optional=True),
        Member("sanity-check", BOOL, optional=True),
        Member("passwordid", STR, optional=True),
    ],
)
_LIMIT_KEYS = [
    f"{kind}-{direction}{suffix}"
    for kind in ("iops", "bps")
    for direction in ("total", "read", "write")
    for suffix in ("", "-max", "-max-length")
] + ["iops-size"]
THROTTLE_LIMITS = Struct("ThrottleLimits", [Member(k, INT, optional=True) for k in _LIMIT_KEYS])
THROTTLE_GROUP = Struct(
    "ThrottleGroupProperties",
    [
        Member("limits", THROTTLE_LIMITS, optional=True),
        *(Member(f"x-{k}", INT, optional=True) for k in _LIMIT_KEYS),
    ],
)
OBJECT_OPTIONS = Struct(
    "ObjectOptions",
    [
        Member("qom-type", Enum("ObjectType", ("secret", "throttle-group", "tls-creds-x509"))),
        Member("id", STR),
    ],
    tag="qom-type",
    variants={
        "secret": SECRET,
        "throttle-group": THROTTLE_GROUP,
        "tls-creds-x509": TLS_CREDS_X509,
    },
)


@command("object-add", args=OBJECT_OPTIONS)
async def object_add(ctx: Context, args: Args) -> None:
    props = {k: v for k, v in args.items() if k not in ("qom-type", "id")}
    ctx.services.graph.objects.add(args["qom-type"], args["id"], props)


@command("object-del", args=Struct("q_obj_object-del-arg", [Member("id", STR)]))
async def object_del(ctx: Context, args: Args) -> None:
    ctx.services.graph.objects.delete(args["id"])
