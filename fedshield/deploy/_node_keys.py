"""``python -m fedshield.deploy._node_keys CONNECTION``: print every node the SuperLink stores, with its public key.

``flwr supernode list`` (1.39) prints node IDs and status but not the public key, and revocation must match stored
nodes against ``authorized-nodes.txt`` by key. The Control API's ListNodes does return the key, so this asks it
through Flower's own client, reading the connection from ``$FLWR_HOME`` exactly as ``flwr`` does. It runs as a
child process with the connection's private ``FLWR_HOME`` (see :meth:`fedshield.deploy.superlink.SuperLink.stored_nodes`),
so the caller's environment and the user's ``~/.flwr`` are never used.

Output: one JSON object ``{"nodes": [{"node-id": int, "status": str, "public-key": PEM}, ...]}`` on stdout.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from fedshield.flower_internals.entry_points import list_nodes

    nodes = [{"node-id": int(n.node_id), "status": str(n.status), "public-key": bytes(n.public_key).decode("ascii")}
             for n in list_nodes(argv[0])]
    print(json.dumps({"nodes": nodes}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
