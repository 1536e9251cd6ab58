"""A real SMTP server (aiosmtpd) for crier's tests.

Each accepted message is written to OUT_DIR as one JSON file holding the envelope and the raw
message. Recipients starting with "reject-" get a permanent 550, those starting with "defer-" a
transient 451. --delay-ms slows every DATA answer down, to stand in for a slow provider.
The chosen port is written to --port-file once the server listens.
"""

import argparse
import asyncio
import json
import os
import signal
import socket
import threading
import uuid

from aiosmtpd.controller import Controller


class Recorder:
    def __init__(self, out_dir, delay):
        self.out_dir = out_dir
        self.delay = delay

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0]
        if local.startswith("reject-"):
            return "550 5.1.1 no such mailbox"
        if local.startswith("defer-"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "data": envelope.original_content.decode("utf-8", "replace"),
        }
        name = uuid.uuid4().hex
        temporary = os.path.join(self.out_dir, f".{name}.tmp")
        with open(temporary, "w") as f:
            json.dump(record, f)
        os.rename(temporary, os.path.join(self.out_dir, f"{name}.json"))
        return "250 2.0.0 accepted"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    controller = Controller(
        Recorder(args.out_dir, args.delay_ms / 1000),
        hostname="127.0.0.1",
        port=free_port(),
        decode_data=False,
    )
    controller.start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(controller.port))
    os.rename(args.port_file + ".tmp", args.port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    controller.stop()


if __name__ == "__main__":
    main()
