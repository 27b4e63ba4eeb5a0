#!/usr/bin/env python3
"""A tiny service that asks its Vigie sidecar before answering.

GET /records/<id> with `X-User: <name>`: the service asks the sidecar at
VIGIE_URL (its own loopback: the sidecar shares the service's network
namespace) whether that user may read that record, and answers 200 with the
record or 403. The caller's `traceparent` is passed on, so the decision's
span joins the caller's trace. Standard library only.
"""

import json
import os
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VIGIE = os.environ.get("VIGIE_URL", "http://127.0.0.1:8190")
PORT = int(os.environ.get("PORT", "8080"))


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200, {"status": "ok"})
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "records":
            return self.reply(404, {"error": "no such route"})
        user = self.headers.get("X-User", "")
        question = json.dumps({
            "principal": {"type": "Agency::User", "id": user},
            "action": {"type": "Agency::Action", "id": "read"},
            "resource": {"type": "Agency::Record", "id": parts[1]},
            "context": {"ip": self.client_address[0]},
        }).encode()
        headers = {"content-type": "application/json"}
        if self.headers.get("traceparent"):
            headers["traceparent"] = self.headers["traceparent"]
        req = urllib.request.Request(VIGIE + "/v1/is_authorized", question, headers)
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                answer = json.load(r)
        except Exception as e:  # the sidecar is down or refused: fail closed
            return self.reply(503, {"error": f"authorization unavailable: {e}"})
        if answer.get("decision") != "Allow":
            return self.reply(403, {"error": "forbidden", "decision_id": answer.get("decision_id")})
        return self.reply(200, {"record": parts[1], "decision_id": answer["decision_id"]})

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
