"""Open MPI hostfiles: parse and check before launching (pure functions).

Syntax, one host per line: ``host [slots=N] [max_slots=M]``; ``#`` starts a comment.
"""
from __future__ import annotations

import os
import re
import sys

from unet.cli import USAGE, command
from unet.errors import UsageError

HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-_]*[A-Za-z0-9])?$")


class HostfileError(UsageError):
    """A one-line message naming the hostfile (and line) that is wrong."""


def parse(text: str, name: str = "hostfile") -> list[tuple[str, int]]:
    """[(host, slots)] in file order; slots default to 1."""
    hosts, seen = [], {}
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        host, slots = parts[0], 1
        if not HOST_RE.match(host):
            raise HostfileError(f"{name}:{no}: bad host name {host!r}")
        for opt in parts[1:]:
            key, eq, val = opt.partition("=")
            if not eq or key not in ("slots", "max_slots", "max-slots") or not val.isdigit() or int(val) < 1:
                raise HostfileError(f"{name}:{no}: cannot parse {opt!r} (expected slots=N)")
            if key == "slots":
                slots = int(val)
        if host in seen:
            raise HostfileError(f"{name}:{no}: host {host} already listed on line {seen[host]}")
        seen[host] = no
        hosts.append((host, slots))
    if not hosts:
        raise HostfileError(f"{name}: no hosts")
    return hosts


def check(path: str, ranks: int) -> list[tuple[str, int]]:
    """Read ``path`` and make sure it offers at least ``ranks`` slots."""
    if not os.path.isfile(path):
        raise HostfileError(f"{path}: no such hostfile")
    hosts = parse(_read(path), path)
    total = sum(s for _, s in hosts)
    if total < ranks:
        raise HostfileError(f"{path}: {total} slots on {len(hosts)} host(s), fewer than the {ranks} ranks asked for")
    return hosts


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(f"{path}: cannot read ({e.strerror if isinstance(e, OSError) else e})") from None


def discover(path: str) -> str:
    """Elastic Horovod host discovery: ``host:slots`` lines for the hosts ``path`` lists now."""
    return "\n".join(f"{h}:{n}" for h, n in parse(_read(path), path))


@command("hostfile")
def main(argv=None) -> int:
    """``python -m unet.launch.hostfile FILE [RANKS]``: print the hosts, or one error line (exit 2).
    ``python -m unet.launch.hostfile --discover FILE``: print ``host:slots`` lines (discovery script)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m unet.launch.hostfile HOSTFILE [RANKS] | --discover HOSTFILE")
        return 0 if argv else USAGE
    if argv[0] == "--discover":
        if len(argv) != 2:
            raise HostfileError("--discover takes one hostfile")
        print(discover(argv[1]))
        return 0
    if len(argv) > 1 and not argv[1].isdigit():
        raise HostfileError(f"RANKS must be a whole number (got {argv[1]!r})")
    hosts = check(argv[0], int(argv[1]) if len(argv) > 1 else 1)
    print("\n".join(h for h, _ in hosts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
