#!/usr/bin/python3
"""Stand-in for immich-server where gatekeeper depends on it (see README.md): the share-link
check `GET /api/shared-links/me?key=|slug=`, and a web app that answers 200 to every other path."""
import argparse
import http.server
import json
import os
import urllib.parse


def keys(name):
    return {k for k in os.environ.get(name, "").split(",") if k}


LIVE, EXPIRED = keys("IMMICH_SHARE_KEYS"), keys("IMMICH_EXPIRED_KEYS")
SLUGS = keys("IMMICH_SHARE_SLUGS")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status, body, kind):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def unauthorized(self, message):
        body = {"message": message, "error": "Unauthorized", "statusCode": 401}
        self.send(401, json.dumps(body), "application/json; charset=utf-8")

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/api/shared-links/me":
            query = urllib.parse.parse_qs(url.query)
            if "key" in query:
                key = query["key"][0]
                if key in LIVE and key not in EXPIRED:
                    return self.send(200, json.dumps({"key": key, "type": "ALBUM"}), "application/json")
                return self.unauthorized("Invalid share key")
            if "slug" in query:
                slug = query["slug"][0]
                if slug in SLUGS:
                    return self.send(200, json.dumps({"slug": slug, "type": "ALBUM"}), "application/json")
                return self.unauthorized("Invalid share slug")
            return self.unauthorized("Authentication required")
        self.send(200, f"<!doctype html><title>Immich</title>immich {url.path}\n", "text/html; charset=utf-8")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=2283)
http.server.ThreadingHTTPServer(("", parser.parse_args().port), Handler).serve_forever()
