"""Half-open connections against a running node (issue 23, item 4).

Opens N silent connections to the registry from five loopback addresses, asks for the catalog
as an honest client every 5 s for 60 s, then counts the silent connections the node still
holds. Run the node under the common soft limit of 1,024 open files:

    (ulimit -n 1024; shoal node --data-dir /tmp/d --listen 127.0.0.1:15123 --no-mdns) &
    python3 tests/bench/half_open_connections.py 15123 1100
"""
import socket, sys, time, resource, urllib.request, urllib.error
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = []
for i in range(n):
    s = socket.socket()
    s.bind((f"127.0.0.{2 + i % 5}", 0))
    s.settimeout(5)
    try:
        s.connect(("127.0.0.1", port))
        conns.append(s)
    except OSError as e:
        print("connect failed", e)
print(f"opened {len(conns)} connections")
def honest():
    t = time.time()
    try:
        r = urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/_catalog", timeout=10)
        return r.status, round(time.time() - t, 2)
    except urllib.error.HTTPError as e:
        return e.code, round(time.time() - t, 2)
    except Exception as e:
        return repr(e), round(time.time() - t, 2)
start = time.time()
results = []
while time.time() - start < 60:
    results.append((round(time.time() - start), honest()))
    time.sleep(5)
print("honest client (seconds in, (status, latency)):", results)
held = 0
for s in conns:
    s.setblocking(False)
    try:
        while True:
            d = s.recv(65536)
            if d == b"":
                break  # closed by the node (after a 503, or without answer)
    except BlockingIOError:
        held += 1  # still open, nothing more to read
    except OSError:
        pass  # reset by the node
print(f"after 60 s: {held} of {len(conns)} connections held")
