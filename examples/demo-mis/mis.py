#!/usr/bin/env python3
"""A stand-in logistics MIS/GPS service for the demo tenant.

Run with: python3 examples/demo-mis/mis.py 8090

GET /waybills/<number> -> {"status", "location", "lat", "lon", "truck"} or 404;
                          "location" is worked out from the truck's GPS fix:
                          the distance and direction to the nearest city.
GET /orders/<number>   -> {"status": ...} or 404 (the order-hotline example).
The cargo-lookup and order-hotline flows call it through their `http` grant
and speak the answer.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import math

CITIES = {
    "Vilnius": (54.6872, 25.2797),
    "Kaunas": (54.8985, 23.9036),
    "Riga": (56.9496, 24.1052),
    "Klaipeda": (55.7033, 21.1443),
    "Tallinn": (59.4370, 24.7536),
}

# The GPS tracker's last fix of each truck, and what it carries.
TRUCKS = {
    "LT-401": (54.80, 24.55),   # on the A1 between Vilnius and Kaunas
    "LV-220": (56.9496, 24.1052),  # parked in Riga
    "LT-117": (55.70, 21.16),   # at Klaipeda port
}
WAYBILLS = {
    "123": {"status": "in transit", "truck": "LT-401"},
    "456": {"status": "delivered", "truck": "LV-220"},
    "789": {"status": "waiting for customs", "truck": "LT-117"},
}


def where(lat, lon):
    """Distance and direction from the nearest city, in words."""
    def km(a, b):
        dlat = math.radians(b[0] - a[0])
        dlon = math.radians(b[1] - a[1])
        h = math.sin(dlat / 2) ** 2 + math.cos(math.radians(a[0])) * math.cos(math.radians(b[0])) * math.sin(dlon / 2) ** 2
        return 6371 * 2 * math.asin(math.sqrt(h))
    city, pos = min(CITIES.items(), key=lambda c: km((lat, lon), c[1]))
    d = km(pos, (lat, lon))
    if d < 5:
        return f"in {city}"
    ns = "north" if lat > pos[0] else "south"
    ew = "east" if lon > pos[1] else "west"
    return f"{round(d)} kilometres {ns} {ew} of {city}"


def waybill(number):
    w = WAYBILLS.get(number)
    if w is None:
        return None
    lat, lon = TRUCKS[w["truck"]]
    return dict(w, lat=lat, lon=lon, location=where(lat, lon))

ORDERS = {
    "1234": {"status": "out for delivery"},
    "5678": {"status": "packed and waiting for pickup"},
}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        parts = self.path.strip("/").split("/")
        found = None
        if len(parts) == 2 and parts[0] == "waybills":
            found = waybill(parts[1])
        elif len(parts) == 2 and parts[0] == "orders":
            found = ORDERS.get(parts[1])
        if found is not None:
            body = json.dumps(found).encode()
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
