import os

import pytest
from conftest import HANG

from unet.distributed.ranks import physical_cores, threads_for_rank


def test_rank_bound_to_a_socket_gets_its_cores():
    s0, s1 = frozenset(range(0, 28)), frozenset(range(28, 56))
    peers = [("n1", s0), ("n1", s1), ("n2", s0), ("n2", s1)]
    assert threads_for_rank("n1", s0, peers) == 28


def test_ranks_sharing_the_same_cpus_split_them():
    allc = frozenset({0, 1})
    assert threads_for_rank("vm", allc, [("vm", allc), ("vm", allc)]) == 1
    knl = frozenset(range(272))   # 68 cores x 4 hardware threads
    assert threads_for_rank("knl", knl, [("knl", knl)], cores=68) == 68
    assert threads_for_rank("knl", knl, [("knl", knl)] * 4, cores=68) == 17


def test_ranks_on_other_hosts_do_not_count():
    c = frozenset({0, 1})
    assert threads_for_rank("a", c, [("a", c), ("b", c)]) == 2
    assert threads_for_rank("a", frozenset({0}), [("a", frozenset({0}))]) == 1


def fake_sysfs(root, cores, threads_per_core, sockets=1):
    """A /sys/devices/system/cpu tree numbered the way Linux numbers SMT siblings
    (cpu c + k*ncores is hardware thread k of core c)."""
    ncores = cores * sockets
    for t in range(threads_per_core):
        for i in range(ncores):
            topo = os.path.join(root, f"cpu{t * ncores + i}", "topology")
            os.makedirs(topo)
            with open(os.path.join(topo, "physical_package_id"), "w") as f:
                f.write(f"{i // cores}\n")
            with open(os.path.join(topo, "core_id"), "w") as f:
                f.write(f"{i % cores}\n")   # core ids repeat on each socket
    return str(root)


def test_hardware_threads_of_one_core_count_once(tmp_path):
    knl = fake_sysfs(tmp_path / "knl", 68, 4)
    assert physical_cores(frozenset(range(272)), knl) == 68
    assert physical_cores(frozenset({0, 68, 136, 204}), knl) == 1   # one core's 4 threads
    skx = fake_sysfs(tmp_path / "skx", 28, 2, sockets=2)        # 2 x 28 cores, hyper-threaded
    socket0 = frozenset(range(0, 28)) | frozenset(range(56, 84))
    assert physical_cores(socket0, skx) == 28
    assert physical_cores(frozenset(range(112)), skx) == 56      # same core_id on both sockets


def test_unreadable_topology_falls_back_to_one_core_per_cpu(tmp_path):
    assert physical_cores(frozenset({0, 1, 2}), str(tmp_path / "none")) == 3


def test_this_machine_counts_its_cores():
    cpus = frozenset(os.sched_getaffinity(0))
    assert 1 <= physical_cores(cpus) <= len(cpus)


def _run_py(code: str, **env):
    import subprocess
    import sys
    e = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMI", "HOROVOD_", "KMP_", "OMP_"))}
    e.update(TF_CPP_MIN_LOG_LEVEL="3", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG, env=e)


@pytest.mark.needs_stack   # TensorFlow and Horovod (conftest: a failure under CI, a skip elsewhere)
def test_rank_setup_exports_threads_before_tensorflow_and_sizes_its_pools():
    code = """
import json, os
from unet.distributed.ranks import prepare_rank, init_horovod
s = prepare_rank(num_threads=0, num_inter_threads=3, blocktime=30)
env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "KMP_BLOCKTIME", "KMP_AFFINITY", "HOROVOD_CYCLE_TIME")}
hvd = init_horovod(s)
import tensorflow as tf
print(json.dumps(dict(env, line=s.line(), intra=tf.config.threading.get_intra_op_parallelism_threads(),
                      inter=tf.config.threading.get_inter_op_parallelism_threads())))
"""
    p = _run_py(code, HOROVOD_CYCLE_TIME="7")
    assert p.returncode == 0, p.stderr[-2000:]
    import json
    d = json.loads(p.stdout.strip().splitlines()[-1])
    cores = physical_cores(frozenset(os.sched_getaffinity(0)))
    assert d["OMP_NUM_THREADS"] == str(cores) and d["intra"] == cores and d["inter"] == 3
    assert d["KMP_BLOCKTIME"] == "30" and d["KMP_AFFINITY"] == "granularity=fine,compact,1,0"
    assert d["HOROVOD_CYCLE_TIME"] == "7"          # the user's setting wins over the trainer's default
    assert d["line"].startswith("rank 0/1 host ")
    assert f"cores {cores} intra {cores} inter 3 KMP_BLOCKTIME 30" in d["line"]
    late = _run_py("import tensorflow\nfrom unet.distributed.ranks import prepare_rank\nprepare_rank(0, 2, 0)")
    assert late.returncode != 0 and "prepare_rank must run before TensorFlow is imported" in late.stderr


def test_elastic_rank_turns_off_what_breaks_a_reformed_ring():
    """Elastic workers: Horovod's response cache off (a joining worker aborted at its second step
    with it on), the fusion threshold dropped; plain mpirun ranks keep the user's settings."""
    code = """
import json, os
from unet.distributed.ranks import prepare_rank
prepare_rank(num_threads=1, num_inter_threads=1, blocktime=0)
print(json.dumps({k: os.environ.get(k) for k in ("HOROVOD_CACHE_CAPACITY", "HOROVOD_FUSION_THRESHOLD")}))
"""
    user = dict(HOROVOD_CACHE_CAPACITY="1024", HOROVOD_FUSION_THRESHOLD="67108864")
    import json
    p = _run_py(code, HOROVOD_ELASTIC="1", HOROVOD_RANK="0", HOROVOD_SIZE="1", **user)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout.splitlines()[-1]) == {"HOROVOD_CACHE_CAPACITY": "0", "HOROVOD_FUSION_THRESHOLD": None}
    assert "HOROVOD_CACHE_CAPACITY=1024 replaced by 0 in an elastic run" in p.stderr
    p = _run_py(code, **user)
    assert json.loads(p.stdout.splitlines()[-1]) == user


def test_unet_train_is_train_hvd_py():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = os.path.join(os.path.dirname(sys.executable), "unet-train")
    a = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    b = subprocess.run([sys.executable, os.path.join(root, "train_hvd.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and "--use_upsampling" in a.stdout
