"""API keys: who a request's principal is, and which tier it gets.

A key is ``dmk_`` + 43 URL-safe characters (256 random bits), shown once when it is added and
never stored: the key file holds its SHA-256. A request presents it as
``Authorization: Bearer KEY``. A request without the header is *anonymous*, keyed by its client
address (an IPv6 client by its /64, the block one host is usually given, so that it cannot
rotate through addresses to get a fresh allowance each time).

    principal = identify(request.headers.get("Authorization"), request.remote, keyfile.current())

Lookup is by the digest of the presented key, confirmed with ``hmac.compare_digest``. The dict
lookup's timing depends only on the digest of what the client sent, which tells it nothing
about any stored key (finding a key from digests is a preimage search on 256 random bits).

The key file (JSON, mode 0600, replaced atomically under an exclusive lock)::

    {"format": "dmlsys-keys", "version": 1,
     "keys": {"alice": {"tier": "authenticated", "sha256": "9f86...", "created": "2026-12-06T01:00:00Z",
                        "revoked": null}}}

A revoked key keeps its entry (so ``ls`` shows it and its name cannot be reused by mistake);
presenting it answers 401 like an unknown key. Command line (the cluster CLI embeds the same
parser as ``python -m dmlsys.cluster keys ...``)::

    python -m dmlsys.events.keys add alice --tier authenticated     # prints the key, once
    python -m dmlsys.events.keys ls
    python -m dmlsys.events.keys revoke alice
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import stat
import sys
from pathlib import Path
from typing import Iterator, Mapping

from dmlsys.events.errors import Unauthorized

log = logging.getLogger(__name__)

KEY_PREFIX = "dmk_"
FORMAT, VERSION = "dmlsys-keys", 1
MAX_FILE_BYTES = 16 << 20
MAX_HEADER_CHARS = 512
ANONYMOUS_TIER = "anonymous"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{43}")


class KeyFileError(ValueError):
    """The key file is unreadable, malformed, too open, or the command cannot be done; names the file."""


def default_path() -> Path:
    """``$DMLSYS_KEYS``, else ``~/.config/dmlsys/keys.json``."""
    env = os.environ.get("DMLSYS_KEYS")
    return Path(env) if env else Path.home() / ".config" / "dmlsys" / "keys.json"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class KeyInfo:
    name: str
    tier: str
    sha256: str
    created: str
    revoked: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who sent a request: ``id`` keys its limits ("key:alice", "anon:10.0.0.7", "anon:2001:db8::/64")."""

    id: str
    tier: str
    name: str | None = None  # the key's name; None when anonymous


class KeyRing:
    """The keys of one file, as loaded: a pure lookup from a presented key to its ``KeyInfo``."""

    __slots__ = ("_by_digest", "keys")

    def __init__(self, keys: Mapping[str, KeyInfo] | None = None) -> None:
        self.keys: dict[str, KeyInfo] = dict(keys or {})
        self._by_digest = {k.sha256: k for k in self.keys.values()}

    def authenticate(self, key: str) -> KeyInfo:
        """The key's entry. Raises ``Unauthorized`` for a malformed, unknown or revoked key."""
        if not _KEY.fullmatch(key):
            raise Unauthorized(f"malformed API key: expected {KEY_PREFIX} followed by 43 URL-safe characters")
        d = digest(key)
        info = self._by_digest.get(d)
        if info is None or not hmac.compare_digest(info.sha256, d):
            raise Unauthorized("unknown API key")
        if info.revoked:
            raise Unauthorized(f"the API key of {info.name!r} was revoked at {info.revoked}")
        return info


@functools.lru_cache(maxsize=65536)  # parsing an address costs microseconds; the same ones repeat
def anonymous_id(client: str | None) -> str:
    """"anon:ADDR" for IPv4, "anon:NET/64" for IPv6, "anon:unknown" when the address is missing."""
    if not client:
        return "anon:unknown"
    try:
        ip = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return f"anon:{client[:64]}"
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return f"anon:{ip.ipv4_mapped}"
        return f"anon:{ipaddress.ip_network((ip, 64), strict=False)}"
    return f"anon:{ip}"


def identify(authorization: str | None, client: str | None, ring: KeyRing,
             anonymous_tier: str = ANONYMOUS_TIER) -> Principal:
    """The principal of a request from its ``Authorization`` header and client address.

    Raises:
        Unauthorized: a header that is not ``Bearer KEY``, or a key that is unknown or revoked
            (a bad key never falls back to anonymous: the client meant to authenticate).
    """
    if authorization is None or authorization.strip() == "":
        return Principal(anonymous_id(client), anonymous_tier)
    if len(authorization) > MAX_HEADER_CHARS:
        raise Unauthorized(f"Authorization header longer than {MAX_HEADER_CHARS} characters")
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Authorization must be 'Bearer KEY'")
    info = ring.authenticate(key.strip())
    return Principal(f"key:{info.name}", info.tier, info.name)


# ----------------------------------------------------------------------------- the file
def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str, where: str) -> dict[str, KeyInfo]:
    """The key file's JSON text -> {name: KeyInfo}; errors name ``where`` and the entry."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise KeyFileError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise KeyFileError(f"{where}: not a dmlsys key file (expected format {FORMAT!r}, version {VERSION})")
    entries = doc.get("keys")
    if not isinstance(entries, dict):
        raise KeyFileError(f"{where}: 'keys' must be an object of name -> entry")
    out = {}
    for name, e in entries.items():
        if not _NAME.fullmatch(name):
            raise KeyFileError(f"{where}: key name {name!r} is not 1-64 characters of [A-Za-z0-9_.-]")
        try:
            info = KeyInfo(name, e["tier"], e["sha256"], e["created"], e.get("revoked"))
        except (TypeError, KeyError) as err:
            raise KeyFileError(f"{where}: entry {name!r} lacks field {err}") from None
        if not _NAME.fullmatch(str(info.tier)) or not re.fullmatch(r"[0-9a-f]{64}", str(info.sha256)):
            raise KeyFileError(f"{where}: entry {name!r} has a bad tier or sha256")
        out[name] = info
    return out


def dump(keys: Mapping[str, KeyInfo]) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION,
                       "keys": {n: {"tier": k.tier, "sha256": k.sha256, "created": k.created, "revoked": k.revoked}
                                for n, k in sorted(keys.items())}}, indent=2) + "\n"


class KeyFile:
    """The key file on disk: atomic, locked read-modify-write for the commands; ``current()``
    for the front door, re-read when the file changes (checked at most once a ``recheck``)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, recheck: float = 1.0) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.recheck = recheck
        self._ring = KeyRing()
        self._stamp: tuple | None = None
        self._checked = -float("inf")

    # -- reading
    def load(self) -> dict[str, KeyInfo]:
        """The file's keys; a missing file has none. Refuses a file others may read or write."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise KeyFileError(f"{self.path}: cannot open ({e.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & 0o077:
                raise KeyFileError(f"{self.path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read or write "
                                   f"it; run chmod 600 {self.path}")
            if st.st_size > MAX_FILE_BYTES:
                raise KeyFileError(f"{self.path}: {st.st_size} bytes, over the {MAX_FILE_BYTES} byte limit")
            text = f.read(MAX_FILE_BYTES + 1).decode("utf-8", "replace")
        return parse(text, str(self.path))

    def current(self, now: float | None = None) -> KeyRing:
        """The keys as of the file's last change (re-stat at most once per ``recheck`` seconds of
        ``now``; pass none to re-stat every call). A file that turned bad keeps the last good keys."""
        if now is not None and now - self._checked < self.recheck:
            return self._ring
        self._checked = now if now is not None else self._checked
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            try:
                self._ring = KeyRing(self.load())
                self._stamp = stamp
            except KeyFileError as e:
                log.warning("keys: keeping the previous keys: %s", e)
        return self._ring

    # -- writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, KeyInfo]]:
        """Exclusive lock, current keys in; whatever the block leaves in the dict is written atomically."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            keys = self.load()
            yield keys
            self._write(dump(keys))
        finally:
            os.close(lock_fd)

    def _write(self, text: str) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # readers see the old file or the new one, never half of one
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself survives a crash
        finally:
            os.close(dfd)

    def add(self, name: str, tier: str) -> str:
        """A new key for ``name`` in ``tier``; returns the key (the only time it is ever shown)."""
        if not _NAME.fullmatch(name or ""):
            raise KeyFileError(f"key name {name!r} must be 1-64 characters of [A-Za-z0-9_.-]")
        if not _NAME.fullmatch(tier or ""):
            raise KeyFileError(f"tier {tier!r} must be 1-64 characters of [A-Za-z0-9_.-]")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self._locked() as keys:
            if name in keys:
                state = f"revoked at {keys[name].revoked}" if keys[name].revoked else "in use"
                raise KeyFileError(f"{self.path}: a key named {name!r} exists ({state}); pick another name")
            keys[name] = KeyInfo(name, tier, digest(key), _now_iso())
        return key

    def revoke(self, name: str) -> KeyInfo:
        with self._locked() as keys:
            if name not in keys:
                raise KeyFileError(f"{self.path}: no key named {name!r}; known: {', '.join(sorted(keys)) or '(none)'}")
            if not keys[name].revoked:
                keys[name] = dataclasses.replace(keys[name], revoked=_now_iso())
            return keys[name]

    def ls(self) -> list[KeyInfo]:
        return [self.load()[n] for n in sorted(self.load())]


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``keys`` subcommands, for embedding in another CLI (``dmlsys.cluster``)."""
    parser.add_argument("--file", default=None, help="key file (default $DMLSYS_KEYS or ~/.config/dmlsys/keys.json)")
    sub = parser.add_subparsers(dest="keys_command", required=True)
    a = sub.add_parser("add", help="create a key for NAME in TIER and print it (shown once)")
    a.add_argument("name")
    a.add_argument("--tier", required=True)
    sub.add_parser("ls", help="list keys: name, tier, created, revoked")
    r = sub.add_parser("revoke", help="revoke NAME's key (401 from then on)")
    r.add_argument("name")


def run(args: argparse.Namespace, known_tiers: set[str] | None = None, out=None) -> int:
    """Carry out parsed ``keys`` arguments; 0 on success, 2 on an error (printed to stderr)."""
    out = out or sys.stdout
    kf = KeyFile(args.file)
    try:
        if args.keys_command == "add":
            if known_tiers is not None and args.tier not in known_tiers:
                raise KeyFileError(f"unknown tier {args.tier!r}; configured tiers: {', '.join(sorted(known_tiers))}")
            key = kf.add(args.name, args.tier)
            print(key, file=out)
            print(f"key for {args.name!r} (tier {args.tier}) written to {kf.path}; it is shown only this once",
                  file=sys.stderr)
        elif args.keys_command == "ls":
            for k in kf.ls():
                print(f"{k.name}\t{k.tier}\t{k.created}\t{'revoked ' + k.revoked if k.revoked else 'active'}\t"
                      f"sha256:{k.sha256[:12]}", file=out)
        else:
            k = kf.revoke(args.name)
            print(f"revoked {k.name!r} at {k.revoked}", file=out)
    except KeyFileError as e:
        print(f"keys: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dmlsys.events.keys", description="Manage dmlsys API keys.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
