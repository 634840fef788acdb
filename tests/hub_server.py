"""A small in-memory Hugging Face Hub for the tests, served over real HTTP on 127.0.0.1.

The real Hub cannot be reached from the test machines, so this server speaks the part of the Hub's
HTTP API that ``huggingface_hub`` (and through it transformers, timm and ``pipeline()``) uses to
create a repo, upload a folder, read repo metadata and download files:

- ``POST /api/repos/create``
- ``POST /api/models/{repo}/preupload/{revision}``  (always answers ``uploadMode: regular``, so files
  travel inline, base64-encoded, in the commit; no LFS and no Xet)
- ``POST /api/models/{repo}/commit/{revision}``  (NDJSON: a header line, then file / deletedFile /
  deletedFolder lines)
- ``GET /api/models/{repo}``, ``/api/models/{repo}/revision/{revision}``  (sha, siblings, and the
  ``pipeline_tag``/``library_name``/``tags``/``cardData`` the real Hub derives from README.md)
- ``GET /api/models/{repo}/tree/{revision}[/{path}]``, ``/api/models/{repo}/refs``,
  ``POST /api/models/{repo}/paths-info/{revision}``, ``GET /api/whoami-v2``
- ``GET``/``HEAD /{repo}/resolve/{revision}/{path}``  (``X-Repo-Commit``, ``ETag``, byte ranges;
  no ``X-Xet-*`` headers, so clients download over plain HTTP)

Like the real Hub, an anonymous request for a private or missing repo gets ``401`` with
``X-Error-Code: RepoNotFound`` (the two cannot be told apart without a token), an authenticated one
``404``; a token that is not known gets ``401 Invalid credentials in Authorization header``.

Safety: it binds to 127.0.0.1 only, answers at most ``max_requests`` requests (then ``503``, so a
client retry loop cannot spin forever) and shuts itself down after ``lifetime_s`` seconds.
Every request is recorded in ``FakeHub.log``; requests it does not understand in ``FakeHub.unhandled``.

Run ``python tests/hub_server.py`` to try it by hand (token ``hf_user_token`` for user ``user``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
REPO_ACTIONS = {"preupload", "commit", "revision", "tree", "refs", "commits", "paths-info", "branch"}
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha(content: bytes) -> str:
    """The git object id of a file, which the Hub uses as the ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)

    @property
    def owner(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if SHA_RE.match(revision) and revision in self.commits:
            return self.commits[revision]
        return None


class HubHTTPError(Exception):
    """An error answer: status, JSON error message and the Hub's X-Error-* headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})
        if code:
            self.headers["X-Error-Code"] = code
        self.headers.setdefault("X-Error-Message", message)


class FakeHub:
    """The in-memory Hub state plus the HTTP server thread serving it.

    Args:
        tokens: ``{token: user name}``; tokens listed in ``read_only_tokens`` cannot write.
        max_requests: requests answered before the server only returns 503.
        lifetime_s: seconds after which the server shuts itself down.
    """

    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        read_only_tokens: set[str] | None = None,
        max_requests: int = 20000,
        lifetime_s: float = 1800.0,
    ):
        self.tokens = dict(tokens or {"hf_user_token": "user"})
        self.read_only_tokens = set(read_only_tokens or ())
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, int]] = []
        self.unhandled: list[str] = []
        self.lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ------------------------------------------------------------ life cycle
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake Hub is not running; call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._timer is not None:
            self._timer.cancel()

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ state
    def create_repo(self, repo_id: str, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """Create a repo directly (test set-up), with an initial commit like the Hub's."""
        with self.lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            self._commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES}, [])
            if files:
                self._commit(repo, "main", "add files", files, [])
            return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a revision (for assertions)."""
        with self.lock:
            commit = self.repos[repo_id].resolve(revision)
            return dict(commit.files) if commit else {}

    def _commit(self, repo: Repo, branch: str, message: str, add: dict[str, bytes], delete: list[str]) -> Commit:
        parent = repo.branches.get(branch)
        files = dict(repo.commits[parent].files) if parent else {}
        for path in delete:
            if path.endswith("/"):
                files = {p: c for p, c in files.items() if not p.startswith(path)}
            else:
                files.pop(path, None)
        files.update(add)
        self._counter += 1
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}".encode())
        for path in sorted(files):
            digest.update(path.encode() + git_blob_sha(files[path]).encode())
        commit = Commit(digest.hexdigest(), parent, message, files)
        repo.commits[commit.sha] = commit
        repo.branches[branch] = commit.sha
        return commit


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    # ------------------------------------------------------------ plumbing
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        path = split.path
        body = self._body()
        with hub.lock:
            over_budget = len(hub.log) >= hub.max_requests
        status = 503
        try:
            if over_budget:
                raise HubHTTPError(503, "fake Hub request budget exhausted")
            status = self._route(method, path, body)
        except HubHTTPError as err:
            status = err.status
            self._json(err.status, {"error": err.message}, err.headers)
        except Exception as err:  # a bug in this server: answer 500 and record it
            status = 500
            with hub.lock:
                hub.unhandled.append(f"{method} {self.path}: {type(err).__name__}: {err}")
            self._json(500, {"error": f"fake Hub error: {err}"})
        with hub.lock:
            hub.log.append((method, self.path, status))

    # ------------------------------------------------------------ auth
    def _user(self) -> str | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        user = self.hub.tokens.get(token)
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self) -> bool:
        header = self.headers.get("Authorization", "")
        return header.removeprefix("Bearer ").strip() not in self.hub.read_only_tokens

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        visible = repo is not None and (not repo.private or user == repo.owner)
        if not visible:
            # The Hub does not reveal whether a repo exists to someone who cannot see it.
            raise HubHTTPError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            if user is None:
                raise HubHTTPError(401, "You must be authenticated to write to a repo")
            if user != repo.owner or not self._can_write():
                raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------ routes
    def _route(self, method: str, path: str, body: bytes) -> int:
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if path == "/api/repos/create" and method == "POST":
            return self._create(json.loads(body or b"{}"))
        if path == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if path == "/api/agent-harnesses" and method == "GET":
            self._json(200, {"standardEnvVars": [], "harnesses": {}})  # client telemetry registry: empty
            return 200
        if path.startswith("/api/models/"):
            return self._api_model(method, path[len("/api/models/"):], body)
        if "/resolve/" in path and method in ("GET", "HEAD"):
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, _, filename = rest.partition("/")
            return self._resolve(unquote(repo_id), unquote(revision), unquote(filename))
        with self.hub.lock:
            self.hub.unhandled.append(f"{method} {self.path}")
        raise HubHTTPError(404, f"fake Hub: no route for {method} {path}")

    def _whoami(self) -> int:
        user = self._user()
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        role = "write" if self._can_write() else "read"
        self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}})
        return 200

    def _create(self, payload: dict) -> int:
        user = self._user()
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        if payload.get("type", "model") != "model":
            raise HubHTTPError(400, "this fake Hub only hosts models")
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        if namespace != user or not self._can_write():
            raise HubHTTPError(403, f"You don't have the rights to create a model under the namespace {namespace!r}")
        with self.hub.lock:
            if repo_id in self.hub.repos:
                self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"})
                return 409
            self.hub.create_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
        return 200

    def _validate_yaml(self, payload: dict) -> int:
        """Check README.md metadata as the Hub does before a commit: YAML, types, and model-index shape."""
        errors = validate_card_metadata(payload.get("content", ""))
        if errors:
            self._json(400, {"errors": [{"message": e} for e in errors]}, {"X-Error-Message": errors[0]})
            return 400
        self._json(200, {"warnings": []})
        return 200

    def _split_repo(self, rest: str) -> tuple[str, list[str]]:
        parts = rest.split("/")
        if len(parts) >= 2 and (len(parts) == 2 or parts[2] in REPO_ACTIONS):
            return unquote("/".join(parts[:2])), parts[2:]
        return unquote(parts[0]), parts[1:]

    def _api_model(self, method: str, rest: str, body: bytes) -> int:
        repo_id, parts = self._split_repo(rest)
        action = parts[0] if parts else None
        with self.hub.lock:
            if action is None and method == "GET":
                return self._info(repo_id, "main")
            if action == "revision" and method == "GET":
                return self._info(repo_id, unquote("/".join(parts[1:])))
            if action == "preupload" and method == "POST":
                return self._preupload(repo_id, unquote("/".join(parts[1:])), json.loads(body))
            if action == "commit" and method == "POST":
                return self._commit(repo_id, unquote("/".join(parts[1:])), body)
            if action == "tree" and method == "GET":
                return self._tree(repo_id, unquote(parts[1]), unquote("/".join(parts[2:])))
            if action == "paths-info" and method == "POST":
                return self._paths_info(repo_id, unquote("/".join(parts[1:])), body)
            if action == "branch" and method == "POST":
                return self._branch(repo_id, unquote("/".join(parts[1:])), json.loads(body or b"{}"))
            if action == "refs" and method == "GET":
                repo = self._repo(repo_id)
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
                self._json(200, {"branches": branches, "tags": [], "converts": []})
                return 200
        with self.hub.lock:
            self.hub.unhandled.append(f"{method} {self.path}")
        raise HubHTTPError(404, f"fake Hub: no route for {method} /api/models/{rest}")

    def _branch(self, repo_id: str, branch: str, payload: dict) -> int:
        repo = self._repo(repo_id, write=True)
        if branch in repo.branches:
            raise HubHTTPError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_of(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.sha
        self._json(200, {})
        return 200

    def _card_metadata(self, commit: Commit) -> dict:
        # The Hub fills pipeline_tag, library_name and tags of a model from its README.md metadata.
        try:
            data = card_metadata(commit.files.get("README.md", b"").decode("utf-8", errors="replace"))
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    def _info(self, repo_id: str, revision: str) -> int:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        card = self._card_metadata(commit)
        config = commit.files.get("config.json")
        tags = list(card.get("tags") or [])
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo.owner,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "tags": tags,
            "cardData": card or None,
            "config": json.loads(config) if config else None,
            "siblings": [
                {"rfilename": p, "size": len(c), "blobId": git_blob_sha(c)} for p, c in sorted(commit.files.items())
            ],
        }
        self._json(200, info)
        return 200

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> int:
        repo = self._repo(repo_id, write=True)
        commit = repo.resolve(revision)
        existing = commit.files if commit else {}
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",  # small files inline in the commit: no LFS, no Xet
                "shouldIgnore": False,
                "oid": git_blob_sha(existing[f["path"]]) if f["path"] in existing else None,
            }
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": commit.sha if commit else None})
        return 200

    def _commit(self, repo_id: str, revision: str, body: bytes) -> int:
        repo = self._repo(repo_id, write=True)
        if revision not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {revision} (this fake Hub commits to branches only)",
                               "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the commit payload must start with a header line")
        header = lines[0]["value"]
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[revision]:
            raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
        add: dict[str, bytes] = {}
        delete: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubHTTPError(400, f"unsupported encoding {value.get('encoding')!r}")
                add[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                delete.append(value["path"])
            elif key == "deletedFolder":
                delete.append(value["path"].rstrip("/") + "/")
            else:
                raise HubHTTPError(400, f"this fake Hub does not support {key!r} operations (LFS/Xet/copies)")
        commit = self.hub._commit(repo, revision, header.get("summary") or "commit", add, delete)
        self._json(200, {"success": True, "commitOid": commit.sha,
                         "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.sha}", "hookOutput": ""})
        return 200

    def _entry(self, path: str, content: bytes) -> dict:
        return {"type": "file", "oid": git_blob_sha(content), "size": len(content), "path": path}

    def _tree(self, repo_id: str, revision: str, folder: str) -> int:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, content in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries.append(self._entry(path, content))
        if folder and not entries and not folders:
            raise HubHTTPError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
        self._json(200, entries)
        return 200

    def _paths_info(self, repo_id: str, revision: str, body: bytes) -> int:
        repo = self._repo(repo_id)
        commit = self._commit_of(repo, revision)
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        out = []
        for path in paths:
            if path in commit.files:
                out.append(self._entry(path, commit.files[path]))
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                out.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0,
                            "path": path})
        self._json(200, out)
        return 200

    def _resolve(self, repo_id: str, revision: str, filename: str) -> int:
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit = self._commit_of(repo, revision)
            content = commit.files.get(filename)
        if content is None:
            raise HubHTTPError(404, f"{filename} does not exist on {revision}", "EntryNotFound",
                               {"X-Repo-Commit": commit.sha})
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_sha(content)}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{quote(filename.split("/")[-1])}"',
        }
        status, payload = 200, content
        match = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(content) - 1
            if start >= len(content) and len(content) > 0:
                raise HubHTTPError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{len(content)}"})
            status, payload = 206, content[start: end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(status, payload, {**headers, "Content-Length": len(payload)}, "application/octet-stream")
        return status


def card_metadata(readme: str) -> dict | None:
    """The YAML block at the top of a README.md, or None when there is none."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, flags=re.S)
    if not match:
        return None
    return yaml.safe_load(match.group(1))


def validate_card_metadata(readme: str) -> list[str]:
    """What the Hub would reject in a model card's metadata (a subset of its checks)."""
    try:
        data = card_metadata(readme)
    except yaml.YAMLError as err:
        return [f"Invalid YAML in README.md metadata: {err}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["README.md metadata must be a YAML mapping"]
    errors = []
    for key in ("license", "library_name", "pipeline_tag", "model_name"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "language", "base_model", "metrics"):
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            errors.append(f'"{key}" must be a string or a list of strings')
    index = data.get("model-index")
    if index is not None:
        if not isinstance(index, list):
            return errors + ['"model-index" must be a list']
        for i, model in enumerate(index):
            if not isinstance(model, dict) or not isinstance(model.get("name"), str):
                errors.append(f'"model-index[{i}].name" must be a string')
                continue
            for j, result in enumerate(model.get("results") or []):
                where = f"model-index[{i}].results[{j}]"
                if not isinstance(result.get("task", {}).get("type"), str):
                    errors.append(f'"{where}.task.type" is required')
                dataset = result.get("dataset", {})
                if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                    errors.append(f'"{where}.dataset" needs "type" and "name"')
                for k, metric in enumerate(result.get("metrics") or []):
                    if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), (int, float, str)):
                        errors.append(f'"{where}.metrics[{k}]" needs a "type" and a "value"')
    return errors


def matching(files: dict[str, bytes], pattern: str) -> list[str]:
    """Paths of ``files`` matching a glob (test helper)."""
    return [p for p in files if fnmatch.fnmatch(p, pattern)]


if __name__ == "__main__":  # pragma: no cover - manual use
    hub = FakeHub(lifetime_s=3600).start()
    print(f"fake Hub at {hub.url} (token hf_user_token, user 'user'); Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        hub.stop()
