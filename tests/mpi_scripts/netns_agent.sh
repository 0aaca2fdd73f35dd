#!/bin/sh
# Open MPI rsh agent for the test hosts of test_multihost.py: called as
# "<host address> <command...>", it runs the command inside that host's network
# namespace (UNET_NETNS_PREFIX + last octet) under its own host name (node + last octet).
host="$1"; shift
octet="${host##*.}"
ns="${UNET_NETNS_PREFIX:?}${octet}"
exec ip netns exec "$ns" unshare --uts /bin/sh -c "hostname node${octet} && $*"
