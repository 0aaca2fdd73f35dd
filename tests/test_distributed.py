import os

from unet.distributed import physical_cores, threads_for_rank


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
