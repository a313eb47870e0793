"""Where an ``s3://bucket/prefix`` repository is: endpoint, region, addressing style, retries.

Why three sources: a flag for one command, the environment for a session or a service unit,
and a file for a host that always talks to the same object store. The first that sets a
value wins, in that order (flags, environment, file). Credentials are never among them:
they come from boto3's standard chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles), so they never reach a command line or a node option.

Environment: ``BB_S3_ENDPOINT`` (or boto3's own ``AWS_ENDPOINT_URL``), ``BB_S3_REGION`` (or
``AWS_REGION``/``AWS_DEFAULT_REGION``), ``BB_S3_ADDRESSING_STYLE``, ``BB_S3_MAX_ATTEMPTS``,
``BB_S3_TIMEOUT`` (seconds, per connect and per read).

File: ``$BB_CONFIG``, else ``$XDG_CONFIG_HOME/blockbackup/s3.toml`` (``~/.config/...``)::

    endpoint = "https://s3.example.net"
    region = "eu-central-1"
    addressing-style = "path"        # or "virtual"
    max-attempts = 8
    timeout = 30
    [buckets.other-bucket]           # per-bucket values override the top-level ones
    endpoint = "http://127.0.0.1:9000"
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockbackup.repository.errors import RepositoryError

#: The option names, the same in node options (``bb-repo-*``) and as CLI flags' dests.
OPTION_NAMES = ("endpoint", "region", "addressing-style")
_FILE_KEYS = {*OPTION_NAMES, "max-attempts", "timeout"}
_ENV = {
    "endpoint": ("BB_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "region": ("BB_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    "addressing-style": ("BB_S3_ADDRESSING_STYLE",),
    "max-attempts": ("BB_S3_MAX_ATTEMPTS",),
    "timeout": ("BB_S3_TIMEOUT",),
}


@dataclass(frozen=True)
class S3Location:
    """An ``s3://`` repository: bucket, key prefix (``""`` or ending in ``/``), settings."""

    bucket: str
    prefix: str
    endpoint: str | None
    region: str
    addressing_style: str
    max_attempts: int
    timeout: float

    def describe(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return where if self.endpoint is None else f"{where} at {self.endpoint}"


def parse_url(location: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/")."""
    rest = location.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
        raise RepositoryError(f"{location}: give the repository as s3://BUCKET[/PREFIX]")
    return bucket, prefix + "/" if prefix else ""


def config_path() -> Path:
    explicit = os.environ.get("BB_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(base) / "blockbackup" / "s3.toml"


def _file_values(bucket: str) -> dict[str, Any]:
    path = config_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RepositoryError(f"{path}: cannot read the S3 settings: {exc}") from None
    buckets = data.pop("buckets", {})
    values = dict(data)
    if isinstance(buckets, dict) and isinstance(buckets.get(bucket), dict):
        values.update(buckets[bucket])
    unknown = set(values) - _FILE_KEYS
    if unknown:
        raise RepositoryError(f"{path}: unknown S3 setting(s): {', '.join(sorted(unknown))}")
    return values


def resolve(location: str, options: Mapping[str, str | None] | None = None) -> S3Location:
    """The settings of ``location``: ``options`` (flags or node options), then the
    environment, then the config file, then defaults."""
    bucket, prefix = parse_url(location)
    given = {k: v for k, v in (options or {}).items() if v}
    unknown = set(given) - set(OPTION_NAMES)
    if unknown:
        raise RepositoryError(f"unknown storage option(s): {', '.join(sorted(unknown))}")
    file_values = _file_values(bucket)

    def pick(name: str) -> Any:
        if name in given:
            return given[name]
        for var in _ENV[name]:
            if os.environ.get(var):
                return os.environ[var]
        return file_values.get(name)

    endpoint = pick("endpoint")
    style = pick("addressing-style") or ("path" if endpoint else "virtual")
    if style not in ("path", "virtual"):
        raise RepositoryError(f"addressing style must be path or virtual, not {style!r}")
    try:
        attempts = int(pick("max-attempts") or 8)
        timeout = float(pick("timeout") or 30)
    except ValueError as exc:
        raise RepositoryError(f"S3 settings: {exc}") from None
    if attempts < 1 or timeout <= 0:
        raise RepositoryError("S3 settings: max-attempts and timeout must be positive")
    return S3Location(
        bucket=bucket,
        prefix=prefix,
        endpoint=str(endpoint) if endpoint else None,
        region=str(pick("region") or "us-east-1"),
        addressing_style=style,
        max_attempts=attempts,
        timeout=timeout,
    )
