"""The cluster key on disk and the keys derived from it (pure; no sockets)."""

from __future__ import annotations

import os
import stat

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from dmlsys.cluster import keys
from dmlsys.cluster.errors import ClusterError, SpecError
from dmlsys.cluster.spec import parse
from dmlsys.wire.curve import ClusterKey, principal_of

names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(names, names)
def test_each_principal_has_its_own_keypair_and_only_the_cluster_key_makes_it(a, b):
    key, other = ClusterKey(b"k" * 32), ClusterKey(b"o" * 32)
    public, secret = key.keypair(a)
    assert zmq.curve_public(secret) == public and key.keypair(a) == (public, secret)
    assert (key.keypair(b) == key.keypair(a)) == (principal_of(a) == principal_of(b))
    assert other.keypair(a) != key.keypair(a) and other.token(a) != key.token(a)
    assert (key.token(a) == key.token(b)) == (principal_of(a) == principal_of(b))


def test_every_cli_process_acts_as_the_cli_and_nothing_else_does():
    assert {principal_of(n) for n in ("cli", "cli-1", "cli-test")} == {"cli"}
    assert [principal_of(n) for n in ("client", "clip", "supervisor", "replica-0")] == \
        ["client", "clip", "supervisor", "replica-0"]


def test_the_key_text_round_trips_and_garbage_is_refused():
    key = ClusterKey.generate()
    assert ClusterKey.from_text(key.to_text()) == key and key.fingerprint != ClusterKey.generate().fingerprint
    assert key.to_text() not in repr(key)  # the secret never shows in a repr or a log line
    for bad in ("", "short", "x" * 40 + "y"):
        with pytest.raises(ValueError):
            ClusterKey.from_text(bad)


def test_ensure_makes_the_key_once_private_and_load_refuses_one_others_can_read(tmp_path):
    state = tmp_path / ".dmlsys"
    key, made = keys.ensure(state)
    again, made_again = keys.ensure(state)
    assert made and not made_again and again == key
    path = keys.key_path(state)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    os.chmod(path, 0o640)
    with pytest.raises(ClusterError, match="readable by other users.*chmod 600"):
        keys.load(state)
    assert keys.load(tmp_path / "none") is None  # no key made: no authentication, as before


def test_import_keeps_a_different_key_unless_forced(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    key, _ = keys.ensure(here)
    other, _ = keys.ensure(there)
    keys.export(here, tmp_path / "key.txt")
    with pytest.raises(ClusterError, match="exists"):
        keys.export(here, tmp_path / "key.txt")
    with pytest.raises(ClusterError, match="another cluster key.*--force"):
        keys.import_(there, tmp_path / "key.txt")
    assert keys.load(there) == other
    assert keys.import_(there, tmp_path / "key.txt", force=True) == key == keys.load(there)


@pytest.mark.parametrize("name", ["cli", "cli-7", "supervisor"])
def test_a_spec_cannot_name_a_node_after_the_supervisor_or_the_cli(name):
    with pytest.raises(SpecError, match="reserved"):
        parse({"nodes": [{"name": name, "role": "echo"}]})
