"""roundtrips.py PORT [N]: N (default 200) 64-byte round trips over one TCP
connection between a server and a client in this process, on 127.0.0.1:PORT.

validate.sh runs it inside a scratch cgroup where the node agent accelerates
PORT, then reads the agent's redirect counters. Every socket operation times
out, so a fast path that lost data fails here instead of hanging.
"""

import socket
import sys
import threading

port = int(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
socket.setdefaulttimeout(10)
srv = socket.socket()
srv.bind(("127.0.0.1", port))
srv.listen(1)


def echo():
    conn, _ = srv.accept()
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.close()


t = threading.Thread(target=echo)
t.start()
client = socket.create_connection(("127.0.0.1", port))
for _ in range(n):
    client.sendall(b"x" * 64)
    got = 0
    while got < 64:
        chunk = client.recv(64 - got)
        if not chunk:
            sys.exit("roundtrips: connection closed early")
        got += len(chunk)
client.close()
t.join()
