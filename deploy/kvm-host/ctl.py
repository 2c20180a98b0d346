#!/usr/bin/env python3
"""Runs one shell command in the emulated KVM host's control shell (a line reader on its ttyS1,
a Unix socket on this side): prints the command's output and exits with its status.

Usage: ctl.py SOCKET COMMAND [TIMEOUT_SECS]
The command travels base64-encoded on one line, runs as a script with stdin /dev/null and its
output in a file, which is printed when it ends, followed by a marker with a nonce and the
status (the same protocol as tests/src/kvmhost.rs)."""
import base64
import os
import socket
import sys
import time


def line_for(command: str, nonce: str) -> bytes:
    b64 = base64.b64encode(command.encode()).decode()
    f = f"/tmp/hive-ctl-{nonce}"
    # The marker is split in the line, so an echo of the line is never taken for the answer.
    return (
        f"printf %s {b64} | base64 -d >{f} && sh {f} >{f}.out 2>&1; s=$?; "
        f"cat {f}.out; rm -f {f} {f}.out; echo \"@@hive-rc-\"{nonce}\"@@ $s\"\n"
    ).encode()


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    path, command = sys.argv[1], sys.argv[2]
    timeout = float(sys.argv[3]) if len(sys.argv) == 4 else 600.0
    nonce = os.urandom(8).hex()
    key = f"@@hive-rc-{nonce}@@ ".encode()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(line_for(command, nonce))
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"ctl: no answer within {timeout:.0f}s", file=sys.stderr)
            return 124
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            print("ctl: the control shell closed the connection", file=sys.stderr)
            return 125
        buf += chunk
        at = buf.find(key)
        if at >= 0 and buf.find(b"\n", at) >= 0:
            end = buf.find(b"\n", at)
            sys.stdout.buffer.write(buf[:at])
            sys.stdout.flush()
            return int(buf[at + len(key):end].strip() or b"1")


if __name__ == "__main__":
    sys.exit(main())
