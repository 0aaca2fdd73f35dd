from unet.distributed import threads_for_rank


def test_rank_bound_to_a_socket_gets_its_cores():
    s0, s1 = frozenset(range(0, 28)), frozenset(range(28, 56))
    peers = [("n1", s0), ("n1", s1), ("n2", s0), ("n2", s1)]
    assert threads_for_rank("n1", s0, peers) == 28


def test_ranks_sharing_the_same_cpus_split_them():
    allc = frozenset({0, 1})
    assert threads_for_rank("vm", allc, [("vm", allc), ("vm", allc)]) == 1
    knl = frozenset(range(272))
    assert threads_for_rank("knl", knl, [("knl", knl)] * 4) == 68


def test_ranks_on_other_hosts_do_not_count():
    c = frozenset({0, 1})
    assert threads_for_rank("a", c, [("a", c), ("b", c)]) == 2
    assert threads_for_rank("a", frozenset({0}), [("a", frozenset({0}))]) == 1
