"""A partner's webhook endpoint for the demo: checks the Standard Webhooks signature of each
POST and prints what arrived. Standard library only.

    CRIER_WEBHOOK_SECRET=whsec_... python3 scripts/webhook_receiver.py [PORT]
"""

import base64
import hashlib
import hmac
import http.server
import json
import os
import sys

SECRET = base64.b64decode(os.environ["CRIER_WEBHOOK_SECRET"].removeprefix("whsec_"))


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        msg_id = self.headers.get("webhook-id", "")
        timestamp = self.headers.get("webhook-timestamp", "")
        signed = f"{msg_id}.{timestamp}.".encode() + body
        expected = "v1," + base64.b64encode(hmac.new(SECRET, signed, hashlib.sha256).digest()).decode()
        valid = any(hmac.compare_digest(expected, s) for s in self.headers.get("webhook-signature", "").split())
        update = json.loads(body).get("data", {}).get("update", {})
        print(f"webhook {msg_id}: signature {'valid' if valid else 'INVALID'}: {update.get('headline')!r}", flush=True)
        self.send_response(204 if valid else 401)
        self.end_headers()

    def log_message(self, *args):
        pass


port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
http.server.HTTPServer(("127.0.0.1", port), Receiver).serve_forever()
