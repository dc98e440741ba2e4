"""API keys: stored hashed, atomic 0600 file, 401 for unknown/revoked, anonymous keyed by address."""

import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from dmlsys.events.errors import Unauthorized
from dmlsys.events.keys import KeyFile, KeyFileError, KeyRing, Principal, anonymous_id, identify, main


def test_add_ls_revoke_round_trip_stores_only_the_hash_in_a_0600_file(tmp_path, capsys):
    path = tmp_path / "sub" / "keys.json"
    kf = KeyFile(path)
    key = kf.add("alice", "authenticated")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key not in path.read_text() and key.startswith("dmk_")
    assert identify(f"Bearer {key}", "10.0.0.1", kf.current()) == Principal("key:alice", "authenticated", "alice")
    assert [k.name for k in kf.ls()] == ["alice"] and kf.ls()[0].revoked is None
    kf.revoke("alice")
    with pytest.raises(Unauthorized, match="revoked"):
        identify(f"Bearer {key}", "10.0.0.1", kf.current())
    assert sorted(os.listdir(path.parent)) == ["keys.json", "keys.json.lock"]  # no temp file left behind
    with pytest.raises(KeyFileError, match="exists"):
        kf.add("alice", "authenticated")


def test_the_front_door_sees_a_revocation_without_restarting(tmp_path):
    kf, door = KeyFile(tmp_path / "k.json"), KeyFile(tmp_path / "k.json", recheck=1.0)
    key = kf.add("bob", "gold")
    assert identify(f"Bearer {key}", None, door.current(now=0.0)).tier == "gold"
    kf.revoke("bob")
    assert identify(f"Bearer {key}", None, door.current(now=0.5)).tier == "gold"  # not re-checked yet
    with pytest.raises(Unauthorized):
        identify(f"Bearer {key}", None, door.current(now=1.5))


@pytest.mark.parametrize("header", ["Bearer dmk_" + "A" * 43, "Basic dXNlcjpwYXNz", "Bearer", "Bearer short",
                                    "Bearer " + "x" * 600, "dmk_" + "A" * 43])
def test_a_bad_or_unknown_key_is_401_never_anonymous(header):
    with pytest.raises(Unauthorized):
        identify(header, "10.0.0.1", KeyRing())


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=700)), st.one_of(st.none(), st.text(max_size=50)))
def test_any_header_gives_a_principal_or_unauthorized(header, client):
    try:
        p = identify(header, client, KeyRing())
    except Unauthorized:
        return
    assert p.tier == "anonymous" and p.id.startswith("anon:") and len(p.id) < 80


def test_anonymous_clients_are_keyed_by_address_and_ipv6_by_its_64():
    assert anonymous_id("10.1.2.3") == "anon:10.1.2.3"
    assert anonymous_id("2001:db8:1:2:aaaa::1") == anonymous_id("2001:db8:1:2:bbbb::9") == "anon:2001:db8:1:2::/64"
    assert anonymous_id("::ffff:10.1.2.3") == "anon:10.1.2.3"
    assert anonymous_id(None) == "anon:unknown"


def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path):
    kf = KeyFile(tmp_path / "k.json")
    kf.add("carol", "t")
    os.chmod(kf.path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        kf.load()


def test_a_malformed_file_names_itself(tmp_path):
    p = tmp_path / "k.json"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b'{"format": "dmlsys-keys", "version": 1, "keys": {"x": {"tier": "t"}}}')
    os.close(fd)
    with pytest.raises(KeyFileError, match=r"k\.json.*'x' lacks field"):
        KeyFile(p).load()


def test_the_command_line_adds_lists_and_revokes(tmp_path, capsys):
    f = str(tmp_path / "k.json")
    assert main(["--file", f, "add", "dave", "--tier", "authenticated"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("dmk_")
    assert main(["--file", f, "ls"]) == 0 and "dave\tauthenticated" in capsys.readouterr().out
    assert main(["--file", f, "revoke", "dave"]) == 0
    assert main(["--file", f, "revoke", "nobody"]) == 2 and "no key named 'nobody'" in capsys.readouterr().err
