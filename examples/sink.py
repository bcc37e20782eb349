"""A destination to watch deliveries arrive: `python examples/sink.py 9000 [STATUS]`.

Prints one line per POST (Idempotency-Key, Content-Type, first bytes of the
body) and answers STATUS (default 200). Stop it to see Courier retry and the
circuit open; run it with 400 to make dead letters; start it again to see the
backlog drain.
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        print(f"{self.path} key={self.headers.get('Idempotency-Key')} type={self.headers.get('Content-Type')} "
              f"{body[:60]!r}", flush=True)
        self.send_response(STATUS)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


STATUS = int(sys.argv[2]) if len(sys.argv) > 2 else 200

if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    print(f"sink listening on http://127.0.0.1:{port}/", flush=True)
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
