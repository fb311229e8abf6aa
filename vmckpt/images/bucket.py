"""An S3-compatible bucket: the only code of vmckpt that speaks S3 (through obstore,
docs/S3-RESEARCH.md). It knows objects, not stores: keys under the store's prefix, bodies,
ETags, conditional writes (``If-None-Match: *`` to create, ``If-Match`` to replace) and
listings. images/bucketstore.py lays a store out in it.

Where the bucket is and how to sign requests: ``s3://BUCKET/PREFIX``, then (first found
wins) the options given to ``vmckpt init``, the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``),
and a profile of ``~/.aws/config`` and ``~/.aws/credentials`` (``AWS_PROFILE``, else
``default``). Nothing read from the bucket is trusted here: a read is bounded, and what it
holds is for the caller to check (docs/SECURITY.md).

Every failure of the object store (unreachable, a 5xx answer, throttling, credentials
refused) is a :class:`BucketError` naming the bucket, the object and the step; obstore
retries transient failures a few times first, within ``RETRY_TIMEOUT``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING

from vmckpt.errors import BucketError, UsageError

if TYPE_CHECKING:
    from obstore import PutMode
    from obstore.store import ClientConfig, S3Config

# obstore itself is imported by the methods that speak S3: a command that opens no bucket
# does not load the client (tests/test_cli.py checks the CLI's imports).

SCHEME = "s3://"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_PREFIX_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
RETRIES = 3
RETRY_TIMEOUT = timedelta(seconds=20)
CONNECT_TIMEOUT = "5s"
REQUEST_TIMEOUT = "300s"
_MESSAGE_CHARS = 240


def is_bucket_url(text: str) -> bool:
    return text.startswith(SCHEME)


@dataclass(frozen=True)
class BucketUrl:
    """``s3://BUCKET/PREFIX``: a bucket and the prefix the store's objects are under."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, text: str) -> BucketUrl:
        if not is_bucket_url(text):
            raise UsageError(f"{text!r} is not s3://BUCKET/PREFIX")
        bucket, _, prefix = text[len(SCHEME) :].partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET_RE.match(bucket):
            raise UsageError(f"{text!r}: {bucket!r} is not a bucket name")
        if prefix and not all(_PREFIX_PART_RE.match(part) for part in prefix.split("/")):
            raise UsageError(
                f"{text!r}: the prefix's parts must be letters, digits, '_', '.' and '-'"
            )
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"


@dataclass(frozen=True)
class BucketConfig:
    """Where the object store answers and the credentials to sign with (repr hides them)."""

    endpoint: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None

    def __repr__(self) -> str:
        return f"BucketConfig(endpoint={self.endpoint!r}, region={self.region!r})"

    def fill(self, other: BucketConfig) -> BucketConfig:
        """This configuration, with what it lacks taken from ``other``."""
        return replace(
            self,
            endpoint=self.endpoint or other.endpoint,
            region=self.region or other.region,
            access_key=self.access_key or other.access_key,
            secret_key=self.secret_key or other.secret_key,
            session_token=self.session_token or other.session_token,
        )

    @classmethod
    def from_environment(cls) -> BucketConfig:
        env = os.environ.get
        return cls(
            endpoint=env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
            region=env("AWS_REGION") or env("AWS_DEFAULT_REGION"),
            access_key=env("AWS_ACCESS_KEY_ID"),
            secret_key=env("AWS_SECRET_ACCESS_KEY"),
            session_token=env("AWS_SESSION_TOKEN"),
        )

    @classmethod
    def from_profile(cls, profile: str | None) -> BucketConfig:
        """A profile of ``~/.aws/config`` (``[profile NAME]``, or ``[default]``) and of
        ``~/.aws/credentials`` (``[NAME]``); an empty configuration if there is none. A
        named profile that is in neither file is refused."""
        import configparser  # only a command on a bucket reads these files

        name = profile or os.environ.get("AWS_PROFILE") or "default"
        home = Path.home() / ".aws"
        config_file = Path(os.environ.get("AWS_CONFIG_FILE") or home / "config")
        creds_file = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or home / "credentials")
        section = "default" if name == "default" else f"profile {name}"
        found: dict[str, str] = {}
        seen = False
        for path, wanted in ((config_file, section), (creds_file, name)):
            parser = configparser.RawConfigParser()
            try:
                parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError, configparser.Error) as exc:
                raise UsageError(f"cannot read {path}: {' '.join(str(exc).split())}") from exc
            if parser.has_section(wanted):
                seen = True
                found.update(parser.items(wanted))
        if profile and not seen:
            raise UsageError(f"no profile {profile!r} in {config_file} or {creds_file}")
        return cls(
            endpoint=found.get("endpoint_url"),
            region=found.get("region"),
            access_key=found.get("aws_access_key_id"),
            secret_key=found.get("aws_secret_access_key"),
            session_token=found.get("aws_session_token"),
        )

    @classmethod
    def resolve(cls, given: BucketConfig | None = None, profile: str | None = None) -> BucketConfig:
        """Options, then the environment, then the profile (first found wins)."""
        config = (given or cls()).fill(cls.from_environment())
        return config.fill(cls.from_profile(profile))


@dataclass(frozen=True)
class ObjectInfo:
    """An object of a listing: its key below the store's prefix, size and age."""

    key: str
    size: int
    modified: datetime


class Bucket:
    """The objects under one prefix of one bucket. Keys are relative to the prefix."""

    def __init__(self, url: BucketUrl, config: BucketConfig) -> None:
        from obstore.store import S3Store

        self.url = url
        self.config = config
        options: S3Config = {"virtual_hosted_style_request": False}
        if config.endpoint:
            options["endpoint"] = config.endpoint
        options["region"] = config.region or "us-east-1"
        if config.access_key and config.secret_key:
            options["access_key_id"] = config.access_key
            options["secret_access_key"] = config.secret_key
            if config.session_token:
                options["session_token"] = config.session_token
        else:
            options["skip_signature"] = True
        client: ClientConfig = {
            "connect_timeout": CONNECT_TIMEOUT,
            "timeout": REQUEST_TIMEOUT,
            "allow_http": bool(config.endpoint and config.endpoint.startswith("http://")),
        }
        self._store = S3Store(
            url.bucket,
            prefix=url.prefix or None,
            config=options,
            client_options=client,
            retry_config={"max_retries": RETRIES, "retry_timeout": RETRY_TIMEOUT},
        )

    def _error(self, exc: Exception, key: str, step: str, layer: str | None) -> BucketError:
        text = " ".join(str(exc).split())
        if len(text) > _MESSAGE_CHARS:
            text = text[:_MESSAGE_CHARS] + "..."
        return BucketError(
            f"bucket {self.url}, object {key}: {type(exc).__name__}: {text}",
            layer=layer,
            step=step,
        )

    def get(
        self, key: str, limit: int, step: str, layer: str | None = None
    ) -> tuple[bytes, str] | None:
        """An object's body and ETag; None if there is no such object; BucketError if it is
        larger than ``limit`` bytes (it is never read whole then)."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = obstore.get(self._store, key)
            if result.meta["size"] > limit:
                raise BucketError(
                    f"bucket {self.url}, object {key}: {result.meta['size']} bytes, more than "
                    f"the {limit} such an object may have",
                    layer=layer,
                    step=step,
                )
            data = bytes(result.bytes())
            etag = result.meta.get("e_tag") or ""
        except (NotFoundError, FileNotFoundError):
            return None
        except BucketError:
            raise
        except Exception as exc:
            raise self._error(exc, key, step, layer) from exc
        if len(data) > limit:
            raise BucketError(
                f"bucket {self.url}, object {key}: more than {limit} bytes", layer=layer, step=step
            )
        return data, etag

    def stream(self, key: str, limit: int, step: str, layer: str | None = None) -> Iterator[bytes]:
        """An object's body in chunks; BucketError if it is missing or larger than ``limit``."""
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            result = obstore.get(self._store, key)
            size = result.meta["size"]
            if size > limit:
                raise BucketError(
                    f"bucket {self.url}, object {key}: {size} bytes, more than the {limit} "
                    "its manifest allows",
                    layer=layer,
                    step=step,
                )
            got = 0
            for chunk in result:
                got += len(chunk)
                if got > limit:
                    raise BucketError(
                        f"bucket {self.url}, object {key}: more than {limit} bytes",
                        layer=layer,
                        step=step,
                    )
                yield bytes(chunk)
        except (NotFoundError, FileNotFoundError) as exc:
            raise BucketError(
                f"bucket {self.url}: object {key} is missing", layer=layer, step=step
            ) from exc
        except BucketError:
            raise
        except Exception as exc:
            raise self._error(exc, key, step, layer) from exc

    def put(
        self,
        key: str,
        body: bytes | IO[bytes] | Iterable[bytes],
        step: str,
        *,
        layer: str | None = None,
        create: bool = False,
        if_match: str | None = None,
    ) -> str | None:
        """Write an object; its new ETag. ``create``: only if there is none (If-None-Match:
        *), ``if_match``: only if its ETag is that one (If-Match); either way None when the
        condition does not hold (nothing written). A conditional write is one request."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        mode: PutMode = "overwrite"
        if create:
            mode = "create"
        elif if_match is not None:
            mode = {"e_tag": if_match}
        try:
            result = obstore.put(self._store, key, body, mode=mode)
        except (AlreadyExistsError, PreconditionError, FileExistsError):
            if create or if_match is not None:
                return None
            raise
        except Exception as exc:
            raise self._error(exc, key, step, layer) from exc
        return result.get("e_tag") or ""

    def listing(self, prefix: str, step: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix/`` (all pages)."""
        import obstore

        found: list[ObjectInfo] = []
        try:
            for batch in obstore.list(self._store, prefix, chunk_size=1000):
                for meta in batch:
                    found.append(ObjectInfo(meta["path"], meta["size"], meta["last_modified"]))
        except Exception as exc:
            raise self._error(exc, prefix + "/", step, None) from exc
        return found

    def delete(self, keys: list[str], step: str) -> None:
        """Remove objects (a missing one is no error)."""
        import obstore
        from obstore.exceptions import NotFoundError

        for key in keys:
            try:
                obstore.delete(self._store, key)
            except (NotFoundError, FileNotFoundError):
                continue
            except Exception as exc:
                raise self._error(exc, key, step, None) from exc
