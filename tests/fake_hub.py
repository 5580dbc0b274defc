"""A loopback HTTP server speaking enough of the Hugging Face Hub protocol
for huggingface_hub's snapshot_download and hf_hub_download: repo info, the
file tree, and resolve (HEAD/GET, with ranges) for one repo at one commit.
It logs every file it serves, so tests can see what was fetched when."""

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id, self.folder = repo_id, Path(folder)
        self.files = {
            str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        self.served = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._handle(self, body=False)

            def do_GET(self):
                hub._handle(self, body=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()

    def _json(self, h, data, body=True):
        raw = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        h.end_headers()
        if body:
            h.wfile.write(raw)

    def _handle(self, h, body):
        path = unquote(urlparse(h.path).path)
        api = f"/api/models/{self.repo_id}/"
        resolve = f"/{self.repo_id}/resolve/"
        if path.startswith(api + "revision/"):
            return self._json(
                h,
                {
                    "id": self.repo_id,
                    "sha": COMMIT,
                    "private": False,
                    "siblings": [{"rfilename": f} for f in self.files],
                },
                body,
            )
        if path.startswith(api + "tree/"):
            entries = [
                {
                    "type": "file",
                    "path": f,
                    "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.read_bytes()).hexdigest(),
                }
                for f, p in self.files.items()
            ]
            return self._json(h, entries, body)
        if path.startswith(resolve):
            name = path[len(resolve) :].split("/", 1)[1]
            p = self.files.get(name)
            if p is None:
                h.send_response(404)
                h.send_header("X-Error-Code", "EntryNotFound")
                h.end_headers()
                return
            data = p.read_bytes()
            start = 0
            rng = h.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0] or 0)
            h.send_response(206 if start else 200)
            h.send_header("X-Repo-Commit", COMMIT)
            h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            h.send_header("Content-Length", str(len(data) - start))
            h.end_headers()
            if body:
                self.served.append(name)
                h.wfile.write(data[start:])
            return
        h.send_response(404)
        h.end_headers()
