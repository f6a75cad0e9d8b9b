r"""A loopback stand-in for the Hugging Face Hub endpoints that `create_repo` and `create_commit` call.

It answers, on 127.0.0.1 and a free port:

```
POST /api/repos/create                          create a repo (409 if it exists)
POST /api/validate-yaml                         accept any README metadata
POST /api/models/{repo}/preupload/{revision}    "regular" for every file, or "lfs" for the suffixes in `lfs_suffixes`
POST /{repo}.git/info/lfs/objects/batch         LFS "basic" transfer: upload by PUT to /lfs/{oid}
PUT  /lfs/{oid}                                 store an LFS object (sha256 checked)
POST /api/models/{repo}/commit/{revision}       apply an ndjson commit: regular files inline, LFS files by oid
GET  /api/models/{repo}/revision/{revision}     repo info: the last commit and the file list
GET  /api/models/{repo}/tree/{revision}         the file list with sizes and blob ids
HEAD /{repo}/resolve/{revision}/{path}          file metadata (commit, etag, size); GET: the file
```

`fail` maps an endpoint name (`"create"`, `"preupload"`, `"lfs_batch"`, `"lfs_upload"`, `"commit"`) to the HTTP
status it answers instead. Every request is recorded in `requests` as `(method, path, authorization header)`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, lfs_suffixes: tuple[str, ...] = ()):
        self.lfs_suffixes = lfs_suffixes
        self.repos: dict[str, dict[str, bytes]] = {}
        self.heads: dict[str, str] = {}
        self.private: dict[str, bool] = {}
        self.commits: list[dict] = []
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.fail: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # --- endpoints -------------------------------------------------------------------------------------------------

    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict | list | bytes | None, dict]:
        r"""`(status, JSON payload or raw bytes, extra headers)` for one request."""
        match = re.fullmatch(r"/api/models/(.+)/revision/([^/]+)", path)
        if method == "GET" and match:
            return self._repo_info(match.group(1))
        match = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)(/.*)?", path)
        if method == "GET" and match:
            return self._tree(match.group(1))
        match = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", path)
        if method in ("GET", "HEAD") and match:
            return self._resolve(match.group(1), match.group(3))
        status, payload = self._route_upload(method, path, body)
        return status, payload, {}

    def _route_upload(self, method: str, path: str, body: bytes) -> tuple[int, dict | None]:
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        match = re.fullmatch(r"/api/models/(.+)/preupload/([^/]+)", path)
        if method == "POST" and match:
            return self._preupload(match.group(1), json.loads(body))
        match = re.fullmatch(r"/(.+)\.git/info/lfs/objects/batch", path)
        if method == "POST" and match:
            return self._lfs_batch(json.loads(body))
        match = re.fullmatch(r"/lfs/([0-9a-f]{64})", path)
        if method == "PUT" and match:
            return self._lfs_upload(match.group(1), body)
        match = re.fullmatch(r"/api/models/(.+)/commit/([^/]+)", path)
        if method == "POST" and match:
            return self._commit(match.group(1), body)
        return 404, {"error": f"no route for {method} {path}"}

    def _create(self, payload: dict) -> tuple[int, dict]:
        if "create" in self.fail:
            return self.fail["create"], {"error": "injected failure"}
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        self.repos[repo_id] = {}
        self.private[repo_id] = payload.get("visibility") == "private"
        return 200, {"url": url, "name": repo_id}

    def _preupload(self, repo_id: str, payload: dict) -> tuple[int, dict]:
        if "preupload" in self.fail:
            return self.fail["preupload"], {"error": "injected failure"}
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(self.lfs_suffixes) else "regular",
                "shouldIgnore": False,
            }
            for f in payload["files"]
        ]
        return 200, {"files": files}

    def _lfs_batch(self, payload: dict) -> tuple[int, dict]:
        if "lfs_batch" in self.fail:
            return self.fail["lfs_batch"], {"error": "injected failure"}
        objects = [
            {
                "oid": obj["oid"],
                "size": obj["size"],
                "authenticated": True,
                "actions": {"upload": {"href": f"{self.endpoint}/lfs/{obj['oid']}"}},
            }
            for obj in payload["objects"]
        ]
        return 200, {"transfer": "basic", "objects": objects}

    def _lfs_upload(self, oid: str, body: bytes) -> tuple[int, None]:
        if "lfs_upload" in self.fail:
            return self.fail["lfs_upload"], None
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, None
        self.lfs_objects[oid] = body
        return 200, None

    def _commit(self, repo_id: str, body: bytes) -> tuple[int, dict]:
        if "commit" in self.fail:
            return self.fail["commit"], {"error": "injected failure"}
        if repo_id not in self.repos:
            return 404, {"error": "Repository not found"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header, files = lines[0], {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}
                files[value["path"]] = self.lfs_objects[value["oid"]]
            else:
                return 400, {"error": f"unexpected commit line {line['key']}"}
        self.repos[repo_id].update(files)  # a commit is applied whole or not at all
        oid = hashlib.sha1(body).hexdigest()
        self.heads[repo_id] = oid
        self.commits.append({"repo_id": repo_id, "summary": header["value"]["summary"], "files": sorted(files)})
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid}

    def _repo_info(self, repo_id: str) -> tuple[int, dict, dict]:
        if repo_id not in self.heads:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        siblings = [{"rfilename": name} for name in sorted(self.repos[repo_id])]
        return 200, {"id": repo_id, "sha": self.heads[repo_id], "siblings": siblings}, {}

    def _tree(self, repo_id: str) -> tuple[int, list, dict]:
        files = self.repos.get(repo_id, {})
        entries = [
            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for name, data in sorted(files.items())
        ]
        return 200, entries, {}

    def _resolve(self, repo_id: str, name: str) -> tuple[int, bytes | dict, dict]:
        data = self.repos.get(repo_id, {}).get(name)
        if data is None:
            return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        return 200, data, {"X-Repo-Commit": self.heads[repo_id], "ETag": etag}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self):
                body = self._read_body()
                path = self.path.split("?", 1)[0]
                with hub._lock:
                    hub.requests.append((self.command, path, self.headers.get("Authorization")))
                    status, payload, headers = hub.route(self.command, path, body)
                if isinstance(payload, bytes):
                    data, content_type = payload, "application/octet-stream"
                else:
                    data, content_type = (
                        (json.dumps(payload).encode() if payload is not None else b""),
                        "application/json",
                    )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    length = int(self.headers.get("Content-Length") or 0)
                    return self.rfile.read(length) if length else b""
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    chunk = self.rfile.read(size)
                    self.rfile.readline()  # the CRLF after each chunk
                    if size == 0:
                        return b"".join(chunks)
                    chunks.append(chunk)

            do_GET = do_HEAD = do_POST = do_PUT = _serve

            def log_message(self, *args):  # keep test output quiet
                pass

        return Handler
