import json

import pytest
from conftest import ROOT

pytestmark = pytest.mark.mpi


def results(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    return json.loads(line[7:])


def test_allreduce_of_known_values_and_broadcast_from_rank0(mpirun):
    out = results(mpirun(2, [f"{ROOT}/tests/mpi_scripts/collectives.py"]))
    assert [d["rank"] for d in out] == [0, 1] and all(d["size"] == 2 for d in out)
    for d in out:
        # rank 0 holds [0,1,2,3], rank 1 holds [10,11,12,13]
        assert d["sum"] == [10.0, 12.0, 14.0, 16.0]
        assert d["mean"] == [5.0, 6.0, 7.0, 8.0]
        assert d["bcast"] == [100.0, 100.0, 100.0]   # rank 0's value everywhere


def test_three_ranks_oversubscribed(mpirun):
    out = results(mpirun(3, [f"{ROOT}/tests/mpi_scripts/collectives.py"]))
    assert len(out) == 3
    for d in out:
        assert d["sum"] == [30.0, 33.0, 36.0, 39.0]
        assert d["bcast"] == [100.0] * 3
