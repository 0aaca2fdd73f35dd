"""Two hosts on one machine: a rank in each of two network namespaces, the allreduce over TCP."""
import contextlib
import os
import shutil
import subprocess
import sys

import pytest
from conftest import HANG, IN_CI, ROOT, mpi_env, train_args

pytestmark = pytest.mark.mpi
PREFIX = "unethvd"
BRIDGE = "br-unethvd"
SUBNET = "10.213.77"          # only inside the namespaces (and the bridge) this test creates


def ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def teardown():
    for i in (1, 2):
        # the veth pair first: the kernel removes a deleted namespace's devices later, in the background
        ip("link", "del", f"veth-uh{i}", check=False)
        ip("netns", "del", f"{PREFIX}{i}", check=False)
    ip("link", "del", BRIDGE, check=False)


def leftovers() -> list[str]:
    """This test's namespaces and links still present on the machine."""
    names = [f"{PREFIX}{i}" for i in (1, 2)]
    netns = [l.split()[0] for l in ip("netns", "list").stdout.splitlines() if l.strip()]
    links = [l.split(": ")[1].split("@")[0] for l in ip("-o", "link", "show").stdout.splitlines()]
    return [n for n in names if n in netns] + [l for l in (BRIDGE, "veth-uh1", "veth-uh2") if l in links]


def need_netns():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("unshare"):
        if IN_CI:
            pytest.fail("network namespaces need root, iproute2 and unshare under CI=true")
        pytest.skip("network namespaces need root, iproute2 and unshare")


@contextlib.contextmanager
def two_hosts():
    """Two network namespaces on a bridge, SUBNET.1 and SUBNET.2; removed on the way out however
    the body (or the set-up itself) ends."""
    teardown()
    try:
        ip("link", "add", BRIDGE, "type", "bridge")
        ip("addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        for i in (1, 2):
            ns = f"{PREFIX}{i}"
            ip("netns", "add", ns)
            ip("link", "add", f"veth-uh{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", f"veth-uh{i}", "master", BRIDGE)
            ip("link", "set", f"veth-uh{i}", "up")
            ip("netns", "exec", ns, "ip", "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            ip("netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield [f"{SUBNET}.1", f"{SUBNET}.2"]
    finally:
        teardown()


def test_namespaces_are_removed_when_the_body_fails():
    need_netns()
    with pytest.raises(RuntimeError, match="body failed"):
        with two_hosts() as hosts:
            assert sorted(leftovers()) == sorted([f"{PREFIX}1", f"{PREFIX}2", BRIDGE, "veth-uh1", "veth-uh2"])
            addr = ip("netns", "exec", f"{PREFIX}2", "ip", "-o", "-4", "addr", "show", "eth0").stdout
            assert f"{hosts[1]}/24" in addr
            raise RuntimeError("body failed")
    assert leftovers() == []


def test_one_rank_per_host_trains_over_tcp(tmp_path):
    need_netns()
    with two_hosts() as hosts:
        p = train_on(hosts, tmp_path)
        assert sorted(leftovers()) == sorted([f"{PREFIX}1", f"{PREFIX}2", BRIDGE, "veth-uh1", "veth-uh2"])
    assert leftovers() == []                                             # nothing left behind
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    ranks = sorted(l for l in p.stdout.splitlines() if l.startswith("rank "))
    assert [l.split()[1] for l in ranks] == ["0/2", "1/2"]
    assert {l.split()[3] for l in ranks} == {"node1", "node2"}      # each rank on its own host
    assert "weights: identical on 2 ranks" in p.stdout
    assert (tmp_path / "logs" / "model.keras").is_file()


def train_on(hosts, tmp_path):
    """mpirun with one rank on each host: the agent enters the host's namespace instead of ssh."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in hosts))
    agent = os.path.join(ROOT, "tests", "mpi_scripts", "netns_agent.sh")
    net = f"{SUBNET}.0/24"
    cmd = ["mpirun", "-np", "2", "-hostfile", str(hostfile), "--mca", "plm_rsh_agent", agent,
           "--mca", "oob_tcp_if_include", net, "--mca", "btl_tcp_if_include", net, "--mca", "btl", "self,tcp",
           "-x", "PATH", "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL", "-x", "UNET_NETNS_PREFIX",
           "-x", "OMPI_ALLOW_RUN_AS_ROOT", "-x", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
           sys.executable, *train_args(str(tmp_path / "logs"))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG, env=mpi_env(UNET_NETNS_PREFIX=PREFIX),
                          cwd=ROOT)
