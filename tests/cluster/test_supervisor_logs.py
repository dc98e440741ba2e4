"""Node logs are rotated at a size limit, a few kept, and the writer goes on writing."""

from __future__ import annotations

from dmlsys.cluster.supervisor import rotate_log


def test_a_log_over_the_limit_is_rotated_and_its_writer_goes_on_at_the_start(tmp_path):
    path = tmp_path / "n.log"
    with open(path, "ab", buffering=0) as writer:  # as a node's stderr: opened for appending
        for generation in range(6):
            writer.write(f"generation {generation}\n".encode() + b"x" * 1000 + b"\n")
            assert rotate_log(path, max_bytes=500, keep=3)
            assert path.stat().st_size == 0
        writer.write(b"after\n")
    assert path.read_bytes() == b"after\n", "the writer continues at the start of the truncated file"
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["n.log", "n.log.1", "n.log.2", "n.log.3"]
    assert (tmp_path / "n.log.1").read_text().startswith("generation 5")
    assert (tmp_path / "n.log.3").read_text().startswith("generation 3")


def test_a_log_under_the_limit_or_missing_is_left_alone(tmp_path):
    path = tmp_path / "n.log"
    assert not rotate_log(path, max_bytes=10)
    path.write_bytes(b"small\n")
    assert not rotate_log(path, max_bytes=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.log"]
