"""A stand-in for the Hugging Face Hub's HTTP API, for tests that must not reach the network.

`FakeHub` serves, from a `ThreadingHTTPServer` on 127.0.0.1 (a free port, in a daemon thread), the part
of the Hub API that huggingface_hub 2.x uses to download repos and to upload a folder:

    GET       /api/{models|datasets}/{repo}[/revision/{rev}]     repo info: id, sha, siblings, private, gated
    GET       /api/{models|datasets}/{repo}/tree/{rev}[/{dir}]   file listing (snapshot_download uses it)
    HEAD, GET /{repo}/resolve/{rev}/{file}                       file metadata (X-Repo-Commit, ETag,
              /datasets/{repo}/resolve/{rev}/{file}              Content-Length) and contents; no Xet headers,
                                                                 so huggingface_hub downloads over plain HTTP
    POST      /api/repos/create                                  create_repo (409 if the repo exists)
    POST      /api/{models|datasets}/{repo}/preupload/{rev}      every file "regular": no LFS, no Xet
    POST      /api/{models|datasets}/{repo}/commit/{rev}         create_commit's NDJSON (base64 contents)
    GET       /api/whoami-v2, /api/agent-harnesses;              small answers huggingface_hub may ask for
    POST      /api/validate-yaml

Failures carry the headers that huggingface_hub's `hf_raise_for_status` turns into its exceptions:
`X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) and `X-Error-Message`.
Anything else gets a plain 404, so a request the fake does not know shows up as an HfHubHTTPError.

A revision is a branch name or a full 40-hex commit sha. Repos are public and uploads need no token. A
gated repo, like on the Hub, shows its info and file listing to anyone, but its file contents only to
requests with `Authorization: Bearer <token>`: none gives 401, a wrong one 403, both `GatedRepo`.

The `fake_hub` pytest fixture starts one and points huggingface_hub at it, in this process and (through
the environment) in subprocesses, with HF_HOME in a temporary directory, no token and online mode;
`set_offline` turns HF_HUB_OFFLINE on or off the same way.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import threading
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

URL_PREFIX = {"model": "", "dataset": "datasets/"}  # of a repo's web and resolve URLs
API_TYPES = {"models": "model", "datasets": "dataset"}  # /api/{models|datasets}/...
DATE = "2024-01-01T00:00:00.000Z"  # every repo's createdAt and lastModified
EMPTY_AGENT_REGISTRY = {"standardEnvVars": [], "harnesses": {}}  # huggingface_hub detects no AI agent


def git_blob_sha(content: bytes) -> str:
    """The git object id of a file, as the Hub gives for a regular (non-LFS) file (`git hash-object`)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubError(Exception):
    """An error answer: status, the Hub's X-Error-Code (if any), a message, and extra headers and
    JSON fields."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None,
                 fields: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.fields = headers or {}, fields or {}


def repo_not_found() -> HubError:
    return HubError(404, "RepoNotFound", "Repository not found")


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    gated: bool = False
    token: str | None = None  # the token that opens a gated repo (None: any token does)
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}

    def resolve(self, revision: str) -> str:
        """The commit sha of a branch name or of a sha itself."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.commits:
            return revision
        raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")


class FakeHub:
    """The fake Hub server. Attributes for assertions:

    url       "http://127.0.0.1:PORT", the value for HF_ENDPOINT
    requests  (method, path) of every request served, path as sent (percent-encoded) without the query
    uploads   repo_id -> {path: content} of the files committed through the commit API
    created   repo_id -> the JSON body of its create-repo request (create_repo(private=True) sends
              {"name": ..., "organization": ..., "visibility": "private"})
    """

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.uploads: dict[str, dict[str, bytes]] = {}
        self.created: dict[str, dict] = {}
        self._repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> Repo
        self._lock = threading.Lock()
        self._commit_numbers = itertools.count(1)
        handler = type("FakeHubHandler", (Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-hub", daemon=True)
        self._thread.start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # ---- setting up repos

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, repo_type: str = "model",
                 revision: str = "main", gated: bool = False, token: str | None = None) -> str:
        """Makes `files` (all of them: nothing is kept from before) the new head commit of branch
        `revision` of the repo, creating the repo if needed; returns the commit's sha (40 hex).
        gated=True (it stays gated) asks for `token` (or any token, if None) to read file contents."""
        if repo_type not in URL_PREFIX:
            raise ValueError(f"FakeHub serves model and dataset repos, not {repo_type!r}")
        files = {path: content.encode() if isinstance(content, str) else bytes(content)
                 for path, content in files.items()}
        with self._lock:
            repo = self._repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id))
            repo.gated = repo.gated or gated
            if token is not None:
                repo.token = token
            return self._new_commit(repo, revision, files)

    def _new_commit(self, repo: Repo, branch: str, files: dict[str, bytes]) -> str:
        seed = f"{repo.repo_type}/{repo.repo_id}@{branch}#{next(self._commit_numbers)}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        repo.commits[sha] = files
        repo.branches[branch] = sha
        return sha

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise repo_not_found()
        return repo

    def _web_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    # ---- routing: (method, path segments, query, headers, body) -> (status, headers, body)

    def handle(self, method: str, segments: list[str], query: dict, headers, body: bytes):
        if segments[:1] == ["api"]:
            return self._handle_api(method, segments[1:], query, headers, body)
        repo_type, rest = ("dataset", segments[1:]) if segments[:1] == ["datasets"] else ("model", segments)
        split = split_repo_id(rest, {"resolve"})
        if method in ("GET", "HEAD") and split is not None and len(split[1]) >= 3:
            repo_id, (_, revision, *file_parts) = split
            return self._resolve(method, repo_type, repo_id, revision, "/".join(file_parts), headers)
        raise HubError(404, None, f"FakeHub does not serve {method} {'/'.join(segments)}")

    def _handle_api(self, method: str, segments: list[str], query: dict, headers, body: bytes):
        route = (method, "/".join(segments))
        if route == ("GET", "whoami-v2"):
            return self._whoami(headers)
        if route == ("GET", "agent-harnesses"):
            return json_answer(EMPTY_AGENT_REGISTRY)
        if route == ("POST", "validate-yaml"):
            return json_answer({"errors": [], "warnings": []})
        if route == ("POST", "repos/create"):
            return self._create_repo(json.loads(body or b"{}"))
        split = split_repo_id(segments[1:], {"revision", "tree", "preupload", "commit"})
        if segments[:1] not in (["models"], ["datasets"]) or split is None:
            raise HubError(404, None, f"FakeHub does not serve {method} /api/{'/'.join(segments)}")
        repo_type, (repo_id, tail) = API_TYPES[segments[0]], split
        action = (method, tail[0] if tail else "")
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            if action == ("GET", "") or (action == ("GET", "revision") and len(tail) == 2):
                return json_answer(self._info(repo, repo.resolve(tail[1] if tail else "main")))
            if action == ("GET", "tree") and len(tail) >= 2:
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return json_answer(tree(repo.commits[repo.resolve(tail[1])], "/".join(tail[2:]), recursive))
            if "create_pr" in query and action[1] in ("preupload", "commit"):
                raise HubError(400, None, "FakeHub does not do pull requests (create_pr)")
            if action == ("POST", "preupload") and len(tail) == 2:
                return json_answer(self._preupload(repo, tail[1], json.loads(body)))
            if action == ("POST", "commit") and len(tail) == 2:
                return json_answer(self._commit(repo, tail[1], body))
        raise HubError(404, None, f"FakeHub does not serve {method} /api/{'/'.join(segments)}")

    # ---- downloads

    def _info(self, repo: Repo, sha: str) -> dict:
        files = repo.commits[sha]
        info = {
            "_id": sha[:24], "id": repo.repo_id, "author": repo.repo_id.partition("/")[0], "sha": sha,
            "createdAt": DATE, "lastModified": DATE, "private": repo.private,
            "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "usedStorage": sum(len(content) for content in files.values()),
            "siblings": [{"rfilename": path, "size": len(content), "blobId": git_blob_sha(content)}
                         for path, content in sorted(files.items())],
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return info

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str, headers):
        with self._lock:
            repo = self._repo(repo_type, repo_id)
            if repo.gated:
                self._check_access(repo, headers)
            sha = repo.resolve(revision)
            content = repo.commits[sha].get(path)
        if content is None:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": sha})
        answer = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha(content)}"',
                  "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        byte_range = parse_range(headers.get("Range"), len(content)) if method == "GET" else None
        if byte_range is None:
            return 200, answer, content
        start, end = byte_range
        answer["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return 206, answer, content[start:end + 1]

    def _check_access(self, repo: Repo, headers):
        authorization = headers.get("Authorization") or ""
        token = authorization[len("Bearer "):].strip() if authorization.startswith("Bearer ") else ""
        if not token:
            raise HubError(401, "GatedRepo", f"Access to {repo.repo_type} {repo.repo_id} is restricted. You must "
                                             "have access to it and be authenticated to access it. Please log in.")
        if repo.token is not None and token != repo.token:
            raise HubError(403, "GatedRepo", f"Access to {repo.repo_type} {repo.repo_id} is restricted and you are "
                                             f"not in the authorized list. Visit {self._web_url(repo)} to ask for "
                                             "access.")

    # ---- uploads

    def _whoami(self, headers):
        if not (headers.get("Authorization") or "").startswith("Bearer "):
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return json_answer({"type": "user", "id": "0" * 24, "name": "fake-user", "fullname": "Fake User",
                            "orgs": [], "auth": {"type": "access_token",
                                                 "accessToken": {"displayName": "fake", "role": "write"}}})

    def _create_repo(self, request: dict):
        repo_type = request.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, None, f"FakeHub serves model and dataset repos, not {repo_type!r}")
        name, organization = request.get("name"), request.get("organization")
        repo_id = f"{organization}/{name}" if organization else name
        url = f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                # with the url, which create_repo(exist_ok=True) reads
                raise HubError(409, None, f"You already created this {repo_type} repo", fields={"url": url})
            repo = self._repos[(repo_type, repo_id)] = Repo(repo_type, repo_id)
            repo.private = request.get("visibility") == "private" or bool(request.get("private"))
            self._new_commit(repo, "main", {})  # a new repo: branch main, no files
            self.created[repo_id] = request
        return json_answer({"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def _preupload(self, repo: Repo, revision: str, request: dict) -> dict:
        files = repo.commits[repo.resolve(revision)]
        return {"files": [{"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": git_blob_sha(files[entry["path"]]) if entry["path"] in files else None}
                          for entry in request.get("files", [])]}

    def _commit(self, repo: Repo, branch: str, body: bytes) -> dict:
        if branch not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {branch}")
        head = repo.branches[branch]
        files, added = dict(repo.commits[head]), {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                parent = value.get("parentCommit")
                if parent and not head.startswith(parent):
                    raise HubError(412, None, f"Parent commit {parent} is not the head of {branch} ({head})")
            elif key == "file":
                content = value["content"]
                content = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                files[value["path"]] = added[value["path"]] = content
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "EntryNotFound", "A file with this name doesn't exist")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: content for path, content in files.items() if not path.startswith(folder)}
            else:  # lfsFile: never asked for, as preupload answers "regular" for every file
                raise HubError(400, None, f"FakeHub cannot commit a {key!r} operation")
        sha = self._new_commit(repo, branch, files)
        self.uploads.setdefault(repo.repo_id, {}).update(added)
        return {"success": True, "commitOid": sha, "commitUrl": f"{self._web_url(repo)}/commit/{sha}",
                "hookOutput": "", "pullRequestUrl": None}


def split_repo_id(segments: list[str], actions: set[str]) -> tuple[str, list[str]] | None:
    """('org/name', rest) from path segments that go on with one of `actions` (or end); also a
    one-segment id ('gpt2') where the second segment is the action. None if neither fits."""
    for width in (2, 1):
        if len(segments) >= width and all(segments[:width]) and (
                len(segments) == width or segments[width] in actions):
            return "/".join(segments[:width]), segments[width:]
    return None


def tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict]:
    """The Hub's tree listing of `folder` ('' for the root): its files and folders, with everything
    below them if `recursive`."""
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    entries = {}
    for path, content in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        parts = path[len(prefix):].split("/")
        for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
            directory = prefix + "/".join(parts[:depth])
            entries[directory] = {"type": "directory", "path": directory, "size": 0,
                                  "oid": hashlib.sha1(f"tree {directory}".encode()).hexdigest()}
        if recursive or len(parts) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(content), "oid": git_blob_sha(content)}
    if prefix and not entries:
        raise HubError(404, "EntryNotFound", f"{folder} does not exist")
    return [entries[path] for path in sorted(entries)]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a simple `Range: bytes=first-[last]` header, or None to send everything."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[len("bytes="):].partition("-")
    if not first.isdigit() or int(first) >= size:
        return None
    return int(first), min(int(last), size - 1) if last.isdigit() else size - 1


def json_answer(data) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()


class Handler(BaseHTTPRequestHandler):
    """HTTP plumbing: reads the request, lets `hub.handle` answer it, writes the answer."""

    hub: FakeHub  # set on the subclass each FakeHub makes
    protocol_version = "HTTP/1.0"  # one request per connection: nothing is left open at close()
    server_version = "FakeHub/1.0"

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_DELETE(self):
        self._serve("DELETE")

    def log_message(self, format, *args):  # quiet: `hub.requests` has them
        pass

    def _serve(self, method: str):
        url = urlsplit(self.path)
        self.hub.requests.append((method, url.path))
        try:
            body = self._read_body()
            segments = [unquote(segment) for segment in url.path.split("/")[1:]]
            status, headers, content = self.hub.handle(method, segments, parse_qs(url.query), self.headers, body)
        except HubError as error:
            status, content = error.status, json.dumps({"error": error.message, **error.fields}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
        except Exception as error:  # a bug in the fake: 501, which huggingface_hub does not retry
            traceback.print_exc()
            status, content = 501, json.dumps({"error": f"FakeHub failed: {error!r}"}).encode()
            headers = {"Content-Type": "application/json"}
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(content)

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk
            while self.rfile.readline().strip():  # trailers, up to the empty line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


# ---- pointing huggingface_hub at a FakeHub

def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True):
    """Turns HF_HUB_OFFLINE on or off: in the environment (for subprocesses) and in
    `huggingface_hub.constants`, which read it once at import and which huggingface_hub (and
    transformers, through `huggingface_hub.is_offline_mode()`) consult at each request."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


def point_huggingface_hub_at(monkeypatch: pytest.MonkeyPatch, url: str, hf_home: str):
    """Sends huggingface_hub's requests to `url`, keeps its cache and token files in `hf_home`, with no
    token and online mode. huggingface_hub reads these environment variables once, at import, into
    `huggingface_hub.constants` (and a few copies), so those are set as well as the environment."""
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager, _detect_agent

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HOME", hf_home)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE",
                 "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE",
                 "HUGGINGFACE_ASSETS_CACHE", "HUGGINGFACE_CO_STAGING"):
        monkeypatch.delenv(name, raising=False)

    hub_cache, assets_cache = os.path.join(hf_home, "hub"), os.path.join(hf_home, "assets")
    for name, value in {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",  # hf_hub_url
        "HF_URL_HOSTS": constants.HF_URL_HOSTS | {"127.0.0.1"},
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": assets_cache,
        "HUGGINGFACE_ASSETS_CACHE": assets_cache,
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
        "AGENT_HARNESSES_PATH": os.path.join(hf_home, ".agent_harnesses.json"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
    }.items():
        monkeypatch.setattr(constants, name, value)
    # the module-level HfApi behind huggingface_hub.model_info, list_repo_tree, upload_folder, ... took
    # its endpoint at import
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    # private copies (raising=False: a later huggingface_hub may not have them)
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", hub_cache, raising=False)  # scan_cache_dir()
    # the AI-agent registry for the User-Agent, otherwise fetched from the Hub once per process
    monkeypatch.setattr(_detect_agent, "_registry", EMPTY_AGENT_REGISTRY, raising=False)


@pytest.fixture
def fake_hub(tmp_path):
    """A running FakeHub with huggingface_hub pointed at it (HF_ENDPOINT), HF_HOME in tmp_path/hf_home,
    HF_TOKEN unset and HF_HUB_OFFLINE off; all restored, and the server closed, afterwards."""
    with FakeHub() as hub, pytest.MonkeyPatch.context() as monkeypatch:
        point_huggingface_hub_at(monkeypatch, hub.url, str(tmp_path / "hf_home"))
        yield hub
