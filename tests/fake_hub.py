"""A minimal Hugging Face Hub stand-in on 127.0.0.1 for upload tests (no network).

Serves the five endpoints `huggingface_hub` uses to create a repo and commit small files (see
TRANSFORMERS_NOTES "Hub push without the Hub") and records what arrives.
"""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.commits: list[dict] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _json(self, payload, status=200, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_HEAD(self):
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                self.do_HEAD()

            def do_POST(self):
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    hub.repos.setdefault(repo, {"private": private, "files": {}})
                    return self._json({"url": f"{hub.url}/{repo}", "name": repo})
                if path == "/api/validate-yaml":
                    return self._json({})
                if path.startswith("/api/models/") and path.endswith("/preupload/main"):
                    files = json.loads(body)["files"]
                    return self._json(
                        {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                    )
                if path.startswith("/api/models/") and path.endswith("/commit/main"):
                    repo = path[len("/api/models/") : -len("/commit/main")]
                    commit = {"repo": repo, "files": {}}
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        if item["key"] == "file":
                            value = item["value"]
                            commit["files"][value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] == "header":
                            commit["summary"] = item["value"].get("summary")
                    hub.commits.append(commit)
                    hub.repos.setdefault(repo, {"private": False, "files": {}})["files"].update(commit["files"])
                    oid = "0" * 40
                    return self._json({"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
                return self._json({"error": f"unexpected POST {path}"}, status=404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
