"""A stand-in for the Hugging Face Hub on 127.0.0.1 for the upload and download tests: it answers the
few endpoints huggingface_hub calls (create a repo, pre-upload, commit; a repo's file list and its
files) and records every request, so tests can check what was sent and how often. The real Hub is
never contacted: tests point HF_ENDPOINT at it, in a subprocess (huggingface_hub reads the endpoint
when it is imported)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MAX_BODY = 256 * 2**20
SHA = "0123456789abcdef0123456789abcdef01234567"  # the one commit every served repo is at


class Recorder(BaseHTTPRequestHandler):
    """Records every request in ``requests``; serves the files of ``repos`` (repo id -> folder)."""

    requests: list[dict] = []
    repos: dict[str, Path] = {}

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, payload: dict | list | bytes, headers: dict | None = None, body: bool = True) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(payload, bytes) else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _record(self, body: bytes) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}  # httpx sends lower-case names
        self.requests.append({"method": self.command, "path": self.path, "headers": headers, "body": body})

    # ---- downloads: GET /api/datasets/<repo>/revision/<rev>, HEAD and GET /datasets/<repo>/resolve/<rev>/<file>
    def _serve(self, body: bool) -> None:
        path = self.path.split("?")[0]
        for repo, folder in self.repos.items():
            if path.startswith(f"/api/datasets/{repo}/revision/"):
                files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                return self._reply(200, {"id": repo, "sha": SHA, "private": False,
                                         "siblings": [{"rfilename": f} for f in files]}, body=body)
            if path.startswith(f"/api/datasets/{repo}/tree/"):
                files = sorted(p for p in folder.rglob("*") if p.is_file())
                return self._reply(200, [{"type": "file", "path": p.relative_to(folder).as_posix(),
                                          "size": p.stat().st_size, "oid": _git_oid(p.read_bytes())} for p in files],
                                   body=body)
            prefix = f"/datasets/{repo}/resolve/"
            if path.startswith(prefix):
                name = path[len(prefix):].split("/", 1)[1]
                file = folder / name
                if not file.is_file():
                    return self._reply(404, {"error": "not found"}, {"X-Error-Code": "EntryNotFound"}, body=body)
                data = file.read_bytes()
                etag = '"' + _git_oid(data) + '"'
                return self._reply(200, data, {"ETag": etag, "X-Repo-Commit": SHA}, body=body)
        self._reply(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"}, body=body)

    def do_HEAD(self) -> None:
        self._record(b"")
        self._serve(body=False)

    def do_GET(self) -> None:
        self._record(b"")
        self._serve(body=True)

    # ---- uploads
    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_BODY))
        self._record(body)
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            self._reply(200, {"url": f"http://127.0.0.1/{payload.get('organization')}/{payload.get('name')}",
                              "name": payload.get("name")})
        elif self.path == "/api/validate-yaml":
            self._reply(200, {"errors": [], "warnings": []})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                        for f in files]})
        elif "/commit/" in self.path:
            # /api/models/me/x/commit/main -> http://host/me/x/commit/<oid> (/datasets/me/x/... for a dataset)
            repo = self.path.split("/api/", 1)[1].split("/commit/")[0].replace("models/", "", 1)
            host = f"http://127.0.0.1:{self.server.server_address[1]}"
            self._reply(200, {"commitUrl": f"{host}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
        else:
            self._reply(404, {"error": "not found"})


def _git_oid(data: bytes) -> str:
    """The git blob id of a file's contents (what the Hub reports as a small file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@contextmanager
def serve(repos: dict[str, Path] | None = None):
    """Run the recorder; yields (endpoint URL, list of recorded requests)."""
    Recorder.requests = []
    Recorder.repos = dict(repos or {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Recorder.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def committed_files(request: dict) -> dict[str, bytes]:
    """Path -> content of every file in a recorded commit request (NDJSON, contents base64)."""
    lines = [json.loads(x) for x in request["body"].decode().splitlines() if x.strip()]
    return {v["value"]["path"]: base64.b64decode(v["value"]["content"]) for v in lines if v["key"] == "file"}
