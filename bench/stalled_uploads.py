"""Memory a router process holds for uploads that stall, and when it lets go.

``--uploads`` connections each declare a body of ``--declared-mb`` MiB, send ``--sent-mb`` MiB
and stop sending, against ``imagefleet router`` (its own process, default settings, no backend
needed: the body is read before a pod is chosen). Printed: the router's RSS idle, with the
uploads stalled, how many were refused at once (503 ``server_busy``: ``max_buffered_mb`` reached),
how many got 408 once ``body_timeout_s`` had passed, and the RSS then (which the allocator may or
may not have handed back to the system).

    python -m bench.stalled_uploads
    python -m bench.stalled_uploads --uploads 20 --declared-mb 31 --sent-mb 30

Not a test: nothing here asserts a size or a time.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import time

from bench import common
from imagefleet.settings import RouterSettings
from imagefleet.testing.servers import free_port, get_json, wait_until

MIB = 1024 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--uploads", type=int, default=10)
    parser.add_argument("--declared-mb", type=int, default=31)
    parser.add_argument("--sent-mb", type=int, default=30)
    args = parser.parse_args()
    port = free_port()
    cmd = common.router_command(port, ["http://127.0.0.1:9"])
    log = common.run_log_dir("stalled_uploads") / "router.log"
    socks: list[socket.socket] = []
    with common.process(cmd, log) as proc:
        try:
            wait_until(lambda: get_json(f"http://127.0.0.1:{port}/healthz")[0] == 200, 60, "the router")
            idle = common.proc_status_mib(proc.pid, "VmRSS")
            head = (
                b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (args.declared_mb * MIB)
            )
            chunk = b"x" * MIB
            for _ in range(args.uploads):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(head)
                sock.settimeout(0.2)
                try:
                    for _ in range(args.sent_mb):
                        sock.sendall(chunk)
                except OSError:  # refused at once: the server stopped reading
                    pass
                socks.append(sock)
            time.sleep(3)
            stalled = common.proc_status_mib(proc.pid, "VmRSS")
            refused = 0
            for sock in socks:
                sock.settimeout(0.5)
                with contextlib.suppress(OSError):
                    refused += sock.recv(200).startswith(b"HTTP/1.1 503")
            time.sleep(RouterSettings().body_timeout_s + 5)
            after = common.proc_status_mib(proc.pid, "VmRSS")
            timed_out = 0
            for sock in socks:
                with contextlib.suppress(OSError):
                    timed_out += b"HTTP/1.1 408" in sock.recv(65536)
        finally:
            for sock in socks:
                sock.close()
    common.Results("stalled_uploads").emit(
        {
            "uploads": args.uploads,
            "declared_mb": args.declared_mb,
            "sent_mb": args.sent_mb,
            "rss_idle_mib": idle,
            "rss_stalled_mib": stalled,
            "refused_at_once": refused,
            "timed_out_408": timed_out,
            "rss_after_body_timeout_mib": after,
        }
    )


if __name__ == "__main__":
    main()
