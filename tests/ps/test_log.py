"""The shard's write-ahead log and checkpoint files: torn tails, corruption, atomic replace; and
the ``ps`` role's config validation."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.node import ConfigError
from dmlsys.ps.log import LogError, WriteAheadLog, read_checkpoint, write_checkpoint
from dmlsys.ps.roles import build_ps, ps_config
from dmlsys.ps.server import PsService


def record(i: int) -> dict:
    return {"seq": i, "w": "w0", "c": i, "g": {"a[0:2]": np.arange(6, dtype=np.float32).reshape(2, 3) + i}}


def test_records_come_back_in_order_with_their_arrays(tmp_path):
    wal = WriteAheadLog(tmp_path / "wal.log")
    for i in range(5):
        wal.append(record(i))
    wal.close()
    got = list(WriteAheadLog(tmp_path / "wal.log").replay())
    assert [r["seq"] for r in got] == list(range(5))
    np.testing.assert_array_equal(got[3]["g"]["a[0:2]"], record(3)["g"]["a[0:2]"])
    assert got[3]["g"]["a[0:2]"].dtype == np.float32


@settings(max_examples=50, deadline=None)
@given(cut=st.integers(1, 200), records=st.integers(1, 6))
def test_a_torn_tail_is_cut_off_and_every_whole_record_survives(cut, records):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wal.log")
        wal = WriteAheadLog(path, fsync=False)
        for i in range(records):
            wal.append(record(i))
        wal.close()
        with open(path, "rb") as f:
            data = f.read()
        size = len(data)
        keep = max(0, size - cut)
        with open(path, "r+b") as f:
            f.truncate(keep)
        got = list(WriteAheadLog(path).replay())
        # every record that is whole in the kept bytes comes back; the file ends after the last one
        per = size // records
        assert len(got) == keep // per
        assert os.path.getsize(path) == len(got) * per


def test_a_flipped_byte_ends_the_replay_at_that_record(tmp_path):
    wal = WriteAheadLog(tmp_path / "wal.log")
    for i in range(3):
        wal.append(record(i))
    wal.close()
    data = bytearray((tmp_path / "wal.log").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "wal.log").write_bytes(bytes(data))
    assert [r["seq"] for r in WriteAheadLog(tmp_path / "wal.log").replay()] == [0]


def test_a_checkpoint_is_replaced_whole_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "shard.npz"
    write_checkpoint(path, {"v/a": np.ones(3)}, {"seq": 1})
    write_checkpoint(path, {"v/a": np.zeros(4)}, {"seq": 2})
    arrays, meta = read_checkpoint(path)
    assert meta == {"seq": 2} and arrays["v/a"].shape == (4,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.npz"]


def test_an_unreadable_checkpoint_names_the_file(tmp_path):
    (tmp_path / "shard.npz").write_bytes(b"not a zip")
    with pytest.raises(LogError, match="shard.npz: unreadable shard checkpoint"):
        read_checkpoint(tmp_path / "shard.npz")


def test_the_ps_role_builds_a_shard_with_its_state_under_the_node_name(tmp_path):
    ctx = types.SimpleNamespace(name="ps1", config={"checkpoint_every": 5}, state_dir=tmp_path)
    (service,) = build_ps(ctx)
    assert isinstance(service, PsService)
    assert service.config.state_dir == str(tmp_path / "ps" / "ps1") and service.config.checkpoint_every == 5


@pytest.mark.parametrize("config, key", [({"checkpoint_every": 0}, "checkpoint_every"),
                                         ({"drop_timeout": -1}, "drop_timeout"),
                                         ({"fsync": "yes"}, "fsync"), ({"shards": 2}, "shards")])
def test_a_bad_ps_config_names_the_key(config, key):
    with pytest.raises(ConfigError) as e:
        ps_config(config, "/tmp")
    assert e.value.key == key
