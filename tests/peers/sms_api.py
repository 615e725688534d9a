"""An SMS carrier's HTTP API for the tests (a stand-in for Twilio's
Messages API and for a JSON provider; the real ones are not reachable
from here). Every request is printed as a JSON line on stdout:
{"path", "headers", "body"}.

    sms_api.py PORT

POST …/Messages.json answers 201 {"sid": "SM<n>", "status": "queued"}
(Twilio); any other POST answers 200 {"id": "J<n>"}.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

count = 0
lock = threading.Lock()


class Api(BaseHTTPRequestHandler):
    def do_POST(self):
        global count
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length).decode("utf-8")
        with lock:
            count += 1
            n = count
            print(json.dumps({"path": self.path,
                              "headers": {k.lower(): v for k, v in self.headers.items()},
                              "body": body}), flush=True)
        if self.path.endswith("/Messages.json"):
            code, answer = 201, {"sid": "SM%d" % n, "status": "queued"}
        else:
            code, answer = 200, {"id": "J%d" % n}
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Api)
print(json.dumps({"listening": server.server_address[1]}), flush=True)
server.serve_forever()
