import os
import signal

import pytest

from tests.cluster.helpers import Cli, alive


@pytest.fixture
def cli(tmp_path):
    cli = Cli(tmp_path)
    seen: set[int] = set()
    yield cli
    seen.update(cli.pids())
    cli("down", check=False, timeout=90)
    for pid in seen:  # whatever down missed is still ours to stop
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
