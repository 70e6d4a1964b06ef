#!/usr/bin/python3
"""Stand-in for traefik/whoami: every path answers 200 with the request echoed."""
import argparse
import http.server
import os
import socket


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self):
        lines = [f"Hostname: {socket.gethostname()}", f"RemoteAddr: {self.client_address[0]}:{self.client_address[1]}",
                 f"{self.command} {self.path} {self.request_version}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = answer

    def log_message(self, *args):
        pass


parser = argparse.ArgumentParser()
parser.add_argument("--port", "-port", type=int, default=int(os.environ.get("WHOAMI_PORT_NUMBER", "80")))
port = parser.parse_args().port
http.server.ThreadingHTTPServer(("", port), Handler).serve_forever()
