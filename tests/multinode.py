"""A multi-node Ray cluster on this machine: `ray.cluster_utils.Cluster`, a head and worker nodes, each its own
raylet (own object store, own node id, own loopback address: the head on 127.0.0.1, worker nodes on 127.0.0.2,
.3, ...). It runs as a process of its own, so the test session's embedded Ray is untouched, and is driven over
stdin, one command a line, one JSON answer a line on stdout:

    (at start)          -> {"address": "127.0.0.1:PORT", "nodes": [node id, ...]}
    add                 -> {"node": id}            a worker node joins (a replacement, as an autoscaler adds)
    remove ID-PREFIX    -> {"removed": id}         that node's raylet and workers are killed: a lost host
    quit (or EOF)          every node is stopped, and the process exits

    python tests/multinode.py WORKER_NODES CPUS_PER_NODE

Used by tests/integration/test_multinode.py. Token auth as the rest of this machine's Ray (launch/ray-env.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    workers, cpus = int(sys.argv[1]), int(sys.argv[2])
    from distune.cluster.auth import token_auth_if_available

    token_auth_if_available()
    from ray.cluster_utils import Cluster

    # A short temp dir (Ray's unix socket paths have a length limit) and a free dashboard-agent port (its
    # default 52365 is held by any other Ray on the machine, e.g. the test session's).
    tmp = tempfile.mkdtemp(prefix="dm-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.1", "temp_dir": tmp, "num_cpus": 1, "include_dashboard": False,
        "dashboard_agent_listen_port": _free_port()})
    # Each worker node on an address of its own (all of 127.0.0.0/8 is loopback): a driver started here joins
    # the head's raylet, never a worker node's, so losing a worker node never takes the driver with it.
    addresses = (f"127.0.0.{i}" for i in range(2, 255))
    nodes = {}

    def add():
        node = cluster.add_node(node_ip_address=next(addresses), temp_dir=tmp, num_cpus=cpus)
        nodes[node.node_id] = node
        return node

    try:
        for _ in range(workers):
            add()
        cluster.wait_for_nodes()
        _say({"address": cluster.address, "nodes": list(nodes)})
        for line in sys.stdin:
            words = line.split()
            if not words:
                continue
            if words[0] == "quit":
                break
            if words[0] == "add":
                _say({"node": add().node_id})
            elif words[0] == "remove":
                [victim] = [n for n in nodes if n.startswith(words[1])]
                cluster.remove_node(nodes.pop(victim), allow_graceful=False)
                _say({"removed": victim})
            else:
                _say({"error": f"unknown command {words[0]!r}"})
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
