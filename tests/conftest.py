import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def cluster_env() -> Dict[str, str]:
    """Environment for SLURM clients of the local one-node cluster (tests/slurm/start_cluster.sh).

    The tests that use it skip only where starting it is impossible: not root and SLURM not
    already running. As root (CI) a failed start fails them, as does MEGATRON_QWEN_REQUIRE_SLURM=1.
    """
    from tests.slurm_support import slurm_env, start_cluster

    try:
        conf = start_cluster()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
        if os.geteuid() == 0 or os.environ.get("MEGATRON_QWEN_REQUIRE_SLURM") == "1":
            pytest.fail(f"could not start the local SLURM cluster: {err}")
        pytest.skip(f"no SLURM cluster: not root, so tests/slurm/start_cluster.sh cannot install/start it ({err})")
    return slurm_env(conf, {"PYTHON": sys.executable})
