"""A plain HTTP function for the `process` kind: serves $PORT with Python's standard
library. It reports ready on GET /healthz only half a second after it started (a
request before that is written to $EARLY_FILE), counts the requests it is handling at
once, and answers each event (CloudEvents binary mode) with its pid and that count."""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STARTED = time.monotonic()
LOCK = threading.Lock()
IN_FLIGHT = 0

if os.environ.get("STARTS_FILE"):
    with open(os.environ["STARTS_FILE"], "a") as starts:
        starts.write(f"{os.getpid()}\n")


def ready():
    return time.monotonic() - STARTED >= 0.5


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def answer(self, status, body):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        if self.path == "/healthz" and ready():
            self.answer(200, {"ready": True})
        else:
            self.answer(503, {"ready": False})

    def do_POST(self):
        global IN_FLIGHT
        length = int(self.headers.get("content-length", "0"))
        data = json.loads(self.rfile.read(length) or b"{}")
        if not ready():
            with open(os.environ["EARLY_FILE"], "a") as early:
                early.write(self.headers.get("ce-id", "?") + "\n")
            self.answer(503, {"error": "not ready"})
            return
        with LOCK:
            IN_FLIGHT += 1
            concurrent = IN_FLIGHT
        try:
            time.sleep(float(data.get("seconds", 0)))
        finally:
            with LOCK:
                IN_FLIGHT -= 1
        self.answer(200, {"pid": os.getpid(), "concurrent": concurrent, "id": self.headers.get("ce-id")})


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
