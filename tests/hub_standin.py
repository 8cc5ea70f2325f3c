"""A local STAND-IN for the Hugging Face Hub's HTTP endpoints, for the `--push-to-hub` tests.

No hub is reachable from here, so the tests start this server on 127.0.0.1 themselves and point
huggingface_hub at it with HF_ENDPOINT. It implements the part of the hub's protocol that
`HfApi.create_repo` + `upload_folder` use over plain HTTP (HF_HUB_DISABLE_XET=1: the Xet CAS storage
protocol is a separate binary service that cannot be stood in for honestly here), and enforces what the
real hub does on that path:

* every call carries `Authorization: Bearer <token>` equal to the one the test set (else 401);
* POST /api/repos/create                       -> the repo is created (409 when it exists, as the hub answers)
* POST /api/validate-yaml                      -> the README's YAML metadata block must parse to a mapping, base_model
                                                  an id, not a local path (else 400)
* POST /api/models/{repo}/preupload/{rev}      -> each file's upload mode: safetensors/large files `lfs`
* POST /{repo}.git/info/lfs/objects/batch      -> a `basic` transfer with an upload href per object
* PUT  /lfs/{oid}                              -> the bytes, whose sha256 must equal oid (else 400)
* POST /api/models/{repo}/commit/{rev}         -> ndjson header + files (base64) + lfsFiles; an lfsFile
                                                  whose object was never uploaded is refused (400)

What was committed is kept in memory (`repos[repo_id]["files"]: path -> bytes`) for the tests to compare
with the local export, and every request (method, path, headers) is logged so a test can check that the
token never travels anywhere but the Authorization header.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LFS_SUFFIXES = (".safetensors", ".bin", ".png")


class HubStandIn:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict[str, Any]] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[dict[str, Any]] = []
        self.model_card_yaml: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _send(self, code: int, obj: Any = None) -> None:
                data = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                hub.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers)})
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._send(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_PUT(self) -> None:  # noqa: N802
                body = self._body()
                hub.requests.append({"method": "PUT", "path": self.path, "headers": dict(self.headers)})
                oid = self.path.rsplit("/", 1)[-1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._send(400, {"error": "sha256 mismatch"})
                hub.lfs[oid] = body
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                if not self._authorized():
                    return
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo_id in hub.repos:  # as the hub answers; create_repo(exist_ok=True) accepts it
                        return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    private = bool(req.get("private")) or req.get("visibility") == "private"
                    hub.repos[repo_id] = {"private": private, "files": {}, "commits": []}
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":  # the README's metadata block, checked before a commit
                    return self._validate_yaml(json.loads(body)["content"])
                if path.endswith(".git/info/lfs/objects/batch"):
                    req = json.loads(body)
                    objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                                "actions": {"upload": {"href": f"{hub.url}/lfs/{o['oid']}"}}}
                               for o in req["objects"]]
                    return self._send(200, {"transfer": "basic", "objects": objects})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    repo_id = path[len("/api/models/"):].split("/preupload/")[0]
                    if repo_id not in hub.repos:
                        return self._send(404, {"error": "Repository not found"})
                    files = [{"path": f["path"], "shouldIgnore": False,
                              "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) or f["size"] > 10 * 2**20
                              else "regular"} for f in json.loads(body)["files"]]
                    return self._send(200, {"files": files})
                if path.startswith("/api/models/") and "/commit/" in path:
                    return self._commit(path[len("/api/models/"):].split("/commit/")[0], body)
                self._send(404, {"error": f"stand-in has no {path}"})

            def _validate_yaml(self, content: str) -> None:
                import yaml
                hub.model_card_yaml.append(content)
                parts = content.split("---\n")  # the README: its metadata is the leading --- block
                if not content.startswith("---\n") or len(parts) < 3:
                    return self._send(400, {"errors": [{"message": "no YAML metadata block"}]})
                try:
                    meta = yaml.safe_load(parts[1])
                except yaml.YAMLError as exc:
                    return self._send(400, {"errors": [{"message": str(exc)}]})
                if not isinstance(meta, dict):
                    return self._send(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
                if str(meta.get("base_model", "x/y")).startswith(("/", ".")):
                    return self._send(400, {"errors": [{"message": "base_model must be a model id, not a path"}]})
                self._send(200, {"warnings": []})

            def _commit(self, repo_id: str, body: bytes) -> None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return self._send(404, {"error": "Repository not found"})
                staged: dict[str, bytes] = {}
                header = None
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    v = item["value"]
                    if item["key"] == "header":
                        header = v
                    elif item["key"] == "file":
                        staged[v["path"]] = base64.b64decode(v["content"])
                    elif item["key"] == "lfsFile":
                        if v["oid"] not in hub.lfs:
                            return self._send(400, {"error": f"lfs object {v['oid']} was never uploaded"})
                        staged[v["path"]] = hub.lfs[v["oid"]]
                if header is None:
                    return self._send(400, {"error": "no commit header"})
                repo["files"].update(staged)
                oid = hashlib.sha1(json.dumps(sorted(staged)).encode() + str(len(repo["commits"])).encode()).hexdigest()
                repo["commits"].append({"oid": oid, "summary": header.get("summary"), "files": sorted(staged)})
                self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

        return Handler
