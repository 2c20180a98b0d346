#!/usr/bin/env python3
"""Runs one shell command in the emulated KVM host's control shell (sh on its ttyS1, a Unix
socket on this side): prints the command's output and exits with its status.

Usage: ctl.py SOCKET COMMAND [TIMEOUT_SECS]
The command runs as `{ COMMAND ; } </dev/null 2>&1`, then the shell prints a marker with a
nonce and the status, which ends the read (the control shell has no prompt and no echo)."""
import os
import socket
import sys
import time


def main() -> int:
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    path, command = sys.argv[1], sys.argv[2]
    timeout = float(sys.argv[3]) if len(sys.argv) == 4 else 600.0
    nonce = os.urandom(8).hex()
    marker = f"@@hive-rc-{nonce}@@"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    # Split in the command text, so an echo of the input is never taken for the answer.
    s.sendall(f"{{ {command}\n}} </dev/null 2>&1; echo \"@@hive-rc-\"{nonce}\"@@ $?\"\n".encode())
    buf = b""
    deadline = time.monotonic() + timeout
    key = marker.encode() + b" "
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"ctl: no answer within {timeout:.0f}s", file=sys.stderr)
            return 124
        s.settimeout(left)
        chunk = s.recv(65536)
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
