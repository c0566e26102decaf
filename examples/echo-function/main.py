"""A minimal Switchyard function: receives CloudEvents in binary mode over HTTP.

Run it with `python3 examples/echo-function/main.py` (port 9000, or $PORT) and point an
`http` function at http://127.0.0.1:9000/. It prints each event and answers:
  - 200 for ordinary events (delivered);
  - 503 with Retry-After: 5 when the event's data contains "busy" (retried later);
  - 422 when the data contains "poison" (dead-lettered at once).
"""

import http.server
import json
import os


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        attributes = {k[3:]: v for k, v in self.headers.items() if k.lower().startswith("ce-")}
        print(json.dumps({"attributes": attributes, "data": body.decode("utf-8", "replace")}), flush=True)
        if b"poison" in body:
            self.send_response(422)
        elif b"busy" in body:
            self.send_response(503)
            self.send_header("Retry-After", "5")
        else:
            self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "9000"))
    http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
