"""A plain HTTP server for the `process` kind behind a function URL: answers every
request with what it received (method, path with query, headers, body in base64),
with the status asked for in `?status=`, and `/sleep?seconds=` waits first."""

import base64
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def handle_any(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path.endswith("/sleep"):
            time.sleep(float(query["seconds"][0]))
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": [[name.lower(), value] for name, value in self.headers.items()],
                "body": base64.b64encode(body).decode(),
                "pid": os.getpid(),
            }
        ).encode()
        self.send_response(int(query.get("status", ["200"])[0]))
        self.send_header("content-type", "application/json")
        self.send_header("x-echo", "1")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any


# Started by Switchyard, on $PORT; started by a test, on a free port it prints.
server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "0"))), Handler)
if "PORT" not in os.environ:
    print(server.server_address[1], flush=True)
server.serve_forever()
