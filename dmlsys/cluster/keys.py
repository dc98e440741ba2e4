"""The cluster's key on disk, and the permissions of everything under the state directory.

    .dmlsys/              0700  state.json, resolved.json, supervisor.log (0600)
    .dmlsys/keys/         0700
    .dmlsys/keys/cluster.key  0600  the cluster key (Z85), from which every member's keys derive
    .dmlsys/sock/         0700  the ipc:// sockets of a single-host cluster
    .dmlsys/logs/         0700  one log per node

``up`` makes the key once (``ensure``) and every process of the cluster reads it (``load``);
a second host gets it with ``keys export FILE`` here and ``keys import FILE`` there. Nothing
here is in a global: the key travels as a value into ``ZmqTransports(keys=...)``.
See docs/security.md for what the key protects and what it does not.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dmlsys.cluster.errors import ClusterError
from dmlsys.wire.curve import ClusterKey

KEYS_DIR = "keys"
KEY_FILE = "cluster.key"
HEADER = "# dmlsys cluster key v1: whoever holds this file is a member of the cluster. Keep it 0600.\n"
PRIVATE_UMASK = 0o077  # files 0600, directories 0700: set by every cluster process before it writes


class KeyFileError(ClusterError):
    """A key file is missing, unreadable, malformed or open to other users."""


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / KEYS_DIR / KEY_FILE


def private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner can enter (made if missing, tightened if not)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def secure_state_dir(state_dir: Path) -> None:
    """The state directory and its sub-directories 0700, and this process's umask 077, so every
    file and socket the cluster makes from now on is its user's alone."""
    os.umask(PRIVATE_UMASK)
    private_dir(state_dir)
    for sub in (KEYS_DIR, "sock", "logs"):
        if (Path(state_dir) / sub).exists():
            private_dir(Path(state_dir) / sub)


def _write_private(path: Path, text: str, *, exclusive: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode only applies to a new file
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure(state_dir: Path) -> tuple[ClusterKey, bool]:
    """The cluster key of ``state_dir``, made now if there is none: (key, made)."""
    private_dir(Path(state_dir) / KEYS_DIR)
    path = key_path(state_dir)
    key = ClusterKey.generate()
    try:
        _write_private(path, HEADER + key.to_text() + "\n", exclusive=True)
        return key, True
    except FileExistsError:
        return load(state_dir), False


def load(state_dir: Path) -> ClusterKey | None:
    """The cluster key of ``state_dir``; None where no key was ever made (a cluster without
    authentication, as before issue 12). Raises KeyFileError for a key others could read."""
    return read(key_path(state_dir), missing_ok=True)


def read(path: Path, *, missing_ok: bool = False) -> ClusterKey | None:
    try:
        st = os.stat(path)
        text = Path(path).read_text()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read the cluster key: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path} is readable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"run `chmod 600 {path}`, and make a new key if someone else could have read it")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    try:
        if len(lines) != 1:
            raise ValueError("expected one line of key text")
        return ClusterKey.from_text(lines[0])
    except ValueError as e:
        raise KeyFileError(f"{path}: not a dmlsys cluster key ({e})") from None


def export(state_dir: Path, dest: Path, *, force: bool = False) -> ClusterKey:
    """Write the cluster key to ``dest`` (0600) for another host's ``keys import``."""
    key = load(state_dir)
    if key is None:
        raise KeyFileError(f"no cluster key under {Path(state_dir) / KEYS_DIR} yet; `up` makes one")
    try:
        _write_private(Path(dest), HEADER + key.to_text() + "\n", exclusive=not force)
    except FileExistsError:
        raise KeyFileError(f"{dest} exists; pass --force to overwrite it") from None
    return key


def import_(state_dir: Path, source: Path, *, force: bool = False) -> ClusterKey:
    """Make the key in ``source`` this state directory's cluster key. A different key already
    there is kept unless ``force``: replacing it cuts off every node that still holds it."""
    key = read(Path(source))
    current = load(state_dir)
    if current is not None and current != key and not force:
        raise KeyFileError(f"{key_path(state_dir)} holds another cluster key (fingerprint {current.fingerprint}); "
                        f"pass --force to replace it, with the cluster down")
    private_dir(Path(state_dir))
    private_dir(Path(state_dir) / KEYS_DIR)
    _write_private(key_path(state_dir), HEADER + key.to_text() + "\n", exclusive=False)
    return key
