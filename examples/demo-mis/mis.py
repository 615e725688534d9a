#!/usr/bin/env python3
"""A stand-in logistics MIS/GPS service for the demo tenant.

Run with: python3 examples/demo-mis/mis.py 8090

GET /waybills/<number> -> {"status": ..., "location": ...} or 404.
GET /orders/<number>   -> {"status": ...} or 404 (the order-hotline example).
The cargo-lookup and order-hotline flows call it through their `http` grant
and speak the answer.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WAYBILLS = {
    "123": {"status": "in transit", "location": "Vilnius"},
    "456": {"status": "delivered", "location": "Riga"},
    "789": {"status": "waiting for customs", "location": "Klaipeda port"},
}

ORDERS = {
    "1234": {"status": "out for delivery"},
    "5678": {"status": "packed and waiting for pickup"},
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        parts = self.path.strip("/").split("/")
        tables = {"waybills": WAYBILLS, "orders": ORDERS}
        if len(parts) == 2 and parts[1] in tables.get(parts[0], {}):
            body = json.dumps(tables[parts[0]][parts[1]]).encode()
            self.send_response(200)
        else:
            body = b'{"error":"not found"}'
            self.send_response(404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8090
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
