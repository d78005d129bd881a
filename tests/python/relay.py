"""A byte relay in front of the agent's Workload API socket, for the attestation tests (standard library only).

Usage: relay.py LISTEN_SOCKET AGENT_SOCKET HANDOVER_FILE

Listens on LISTEN_SOCKET, prints `listening` once it does, and relays one client connection to AGENT_SOCKET, so the
agent sees this process as the caller (SO_PEERCRED on its connection). Once HANDOVER_FILE exists the process hands
the connection over: it forks, the child goes on relaying the open connection, and the parent (the caller the
agent attested) execs `sleep`, keeping its pid. Stops when either side closes, or after 600 s.
"""

import os
import select
import shutil
import socket
import sys
import time


def main() -> int:
    listen_path, agent_path, handover = sys.argv[1:4]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen_path)
    server.listen(1)
    print("listening", flush=True)
    client, _ = server.accept()
    server.close()
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    upstream.connect(agent_path)
    peer = {client: upstream, upstream: client}
    handed_over = False
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        readable, _, _ = select.select(list(peer), [], [], 0.05)
        for s in readable:
            data = s.recv(65536)
            if not data:
                return 0
            peer[s].sendall(data)
        if not handed_over and os.path.exists(handover):
            handed_over = True
            if os.fork() != 0:
                # Python's sockets are close-on-exec: after this only the child holds the connection.
                sleep = shutil.which("sleep") or "/bin/sleep"
                os.execv(sleep, ["sleep", "600"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
