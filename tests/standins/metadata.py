"""Stand-in for the metadata services a cloud VM reads its UserData from, on 127.0.0.1.

Modes: ``imdsv2`` (EC2 with HttpTokens=required: PUT /latest/api/token, then
GETs with the X-aws-ec2-metadata-token header; a GET without it is 401),
``imdsv1`` (EC2-compatible API without the token endpoint: the PUT is 404),
``openstack`` (Nova's metadata service: /openstack/latest/user_data and
meta_data.json; no EC2 paths). Requests are recorded so a test can say which
path the wrapper took. No test ever reaches 169.254.169.254.
"""

from __future__ import annotations

import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class MetadataServer:
    def __init__(self, mode: str, userdata: bytes, instance_id: str) -> None:
        assert mode in ("imdsv2", "imdsv1", "openstack")
        self.mode, self.userdata, self.instance_id = mode, userdata, instance_id
        self.requests: list[tuple[str, str, bool]] = []  # (method, path, had a session token)
        self.tokens: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"") -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                outer.requests.append(("PUT", self.path, False))
                if outer.mode == "imdsv2" and self.path == "/latest/api/token" \
                        and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    token = secrets.token_urlsafe(16)
                    outer.tokens.add(token)
                    return self._send(200, token.encode())
                self._send(404)

            def do_GET(self):
                token = self.headers.get("X-aws-ec2-metadata-token")
                outer.requests.append(("GET", self.path, token in outer.tokens))
                ec2 = {"/latest/user-data": outer.userdata,
                       "/latest/meta-data/instance-id": outer.instance_id.encode()}
                nova = {"/openstack/latest/user_data": outer.userdata,
                        "/openstack/latest/meta_data.json": json.dumps(
                            {"uuid": outer.instance_id, "name": "glidein", "availability_zone": "nova"}).encode()}
                if outer.mode == "openstack":
                    return self._send(200, nova[self.path]) if self.path in nova else self._send(404)
                if self.path not in ec2:
                    return self._send(404)
                if outer.mode == "imdsv2" and token not in outer.tokens:
                    return self._send(401)
                self._send(200, ec2[self.path])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MetadataServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
