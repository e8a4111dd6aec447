"""A local stand-in for the Hugging Face hub that the real huggingface_hub (2.4.0) client can download from.

It serves the files of one folder as one model repo at one commit, over plain HTTP on 127.0.0.1:

    GET      /api/models/{repo}[/revision/{rev}]     model_info / repo_info (sizes, hashes with ?blobs=true)
    GET      /api/models/{repo}/tree/{rev}[/{path}]  list_repo_tree (snapshot_download lists files with it)
    POST     /api/models/{repo}/paths-info/{rev}     get_paths_info
    HEAD/GET /{repo}/resolve/{rev}/{filename}        hf_hub_download: HEAD for metadata, GET (with Range) for bytes

Files ending in .safetensors, or over LFS_THRESHOLD bytes, are LFS files (ETag = sha256, `lfs` metadata);
the others are git files (ETag = git blob sha1). No X-Xet-* headers are sent, so the client uses plain
HTTP even with hf_xet installed. Any branch or tag name resolves to the one commit; a 40-hex sha other
than the commit is RevisionNotFound. Anything else (e.g. /api/agent-harnesses, which the client fetches
for its user agent and ignores failing) is a 404.

Pointing the client at it: huggingface_hub copies HF_ENDPOINT into `constants` at import, so setting the
variable afterwards changes nothing in-process. In a pytest test call `hub.patch_client(monkeypatch,
cache_dir)`. It sets `constants.ENDPOINT` (HfApi() reads it when constructed), `constants.
HUGGINGFACE_CO_URL_TEMPLATE` (hf_hub_download builds file URLs from it), the endpoint of the module-level
HfApi behind `huggingface_hub.model_info` & co, a private `constants.HF_HUB_CACHE` (a local_dir download
still writes refs there and copies from there when it can), turns offline mode off, and exports
HF_ENDPOINT / HF_HUB_CACHE so that child processes (scripts/download_weights.py, the Cog server) use it.

Fault hooks:
  interrupt_after(name, nbytes, times)  the next `times` GETs of `name` stop at byte `nbytes` of the file and
                                        drop the connection. huggingface_hub 2.4.0 itself resumes a dropped GET
                                        (`Range: bytes=N-`) up to 5 times within one call, so times=1 is
                                        absorbed; times=HF_GET_ATTEMPTS makes the call fail.
  serve_corrupt(name)                   serve `name` with one byte flipped; the sizes and hashes in the
                                        metadata still describe the original file, as a bad mirror would.
  requests, gets(name)                  every request as (method, path, Range header or None).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_COMMIT = "c0ffee" + "0" * 34
LFS_THRESHOLD = 1_000_000
HF_GET_ATTEMPTS = 6  # huggingface_hub 2.4.0 http_get: the first GET plus 5 resumes after dropped connections
_SHA = re.compile(r"[0-9a-f]{40}")


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob: the hub's `oid`/`blobId`, and the ETag of a git file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubFile:
    def __init__(self, path: str, data: bytes):
        self.path, self.data, self.size = path, data, len(data)
        self.lfs = path.endswith(".safetensors") or self.size > LFS_THRESHOLD
        self.sha256 = hashlib.sha256(data).hexdigest()
        # An LFS file's git blob is its pointer file, as on the real hub.
        self.pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
        self.blob_id = git_blob_sha1(self.pointer.encode() if self.lfs else data)
        self.etag = self.sha256 if self.lfs else self.blob_id

    def lfs_info(self, sha_key: str) -> dict:
        # model_info calls the sha256 "sha256"; the tree and paths-info endpoints call it "oid".
        return {"lfs": {sha_key: self.sha256, "size": self.size, "pointerSize": len(self.pointer)}} if self.lfs else {}

    def tree_entry(self) -> dict:
        return {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path} | self.lfs_info("oid")


class FakeHub:
    def __init__(self, repo_id: str, files_dir: Path, commit: str = DEFAULT_COMMIT):
        assert _SHA.fullmatch(commit), "a commit is 40 lowercase hex digits"
        self.repo_id, self.commit = repo_id, commit
        paths = sorted(p for p in Path(files_dir).rglob("*") if p.is_file())
        names = [p.relative_to(files_dir).as_posix() for p in paths]
        self.files = {name: HubFile(name, p.read_bytes()) for name, p in zip(names, paths)}
        self.requests: list[tuple[str, str, str | None]] = []
        self._interrupts: dict[str, list[int]] = {}  # name -> [byte to stop at, GETs left to cut]
        self._corrupt: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: the OS picks a free one
        self._server.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        # A short poll interval keeps stop() quick.
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def patch_client(self, monkeypatch, cache_dir: Path) -> None:
        """Point huggingface_hub, in this process and in child processes, at this hub (see module docstring)."""
        from huggingface_hub import constants, hf_api

        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        template = self.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_api.api, "endpoint", self.url)
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def interrupt_after(self, filename: str, nbytes: int, times: int = 1) -> None:
        with self._lock:
            self._interrupts[filename] = [nbytes, times]

    def serve_corrupt(self, filename: str, corrupt: bool = True) -> None:
        with self._lock:
            (self._corrupt.add if corrupt else self._corrupt.discard)(filename)

    def gets(self, filename: str) -> list[str | None]:
        """The Range header of each GET of `filename` so far (None: from byte 0 to the end)."""
        prefix = f"/{self.repo_id}/resolve/"
        return [r for m, p, r in self.requests
                if m == "GET" and p.startswith(prefix) and unquote(p[len(prefix):]).partition("/")[2] == filename]

    def _resolves(self, revision: str) -> bool:
        return revision == self.commit or not _SHA.fullmatch(revision)

    def _body(self, f: HubFile) -> bytes:
        if f.path in self._corrupt and f.size:
            mid = f.size // 2  # one flipped byte: same size, different hash
            return f.data[:mid] + bytes([f.data[mid] ^ 0xFF]) + f.data[mid + 1:]
        return f.data

    def _cut(self, filename: str) -> int | None:
        """The byte of the file at which this GET must stop, if an interrupt is pending."""
        with self._lock:
            pending = self._interrupts.get(filename)
            if not pending or pending[1] <= 0:
                return None
            pending[1] -= 1
            return pending[0]

    def _tree(self, under: str, recursive: bool) -> list[dict]:
        prefix, entries, folders = under.strip("/") + "/" if under.strip("/") else "", [], set()
        for name, f in self.files.items():
            if name.startswith(prefix):
                parts = name[len(prefix):].split("/")
                depth = len(parts) if recursive else min(2, len(parts))  # the folders above this file to list
                folders.update(prefix + "/".join(parts[:i]) for i in range(1, depth))
                if recursive or len(parts) == 1:
                    entries.append(f.tree_entry())
        dirs = [{"type": "directory", "oid": git_blob_sha1(d.encode()), "size": 0, "path": d} for d in sorted(folders)]
        return dirs + entries  # (a folder's oid only needs to be stable here)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; so every reply carries Content-Length

    def log_message(self, *args) -> None:  # quiet: FakeHub.requests is the log
        pass

    def do_HEAD(self) -> None:
        self._route()

    do_GET = do_POST = do_HEAD

    def _route(self) -> None:
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        method, url = self.command, urlsplit(self.path)
        hub.requests.append((method, url.path, self.headers.get("Range")))
        # Drain any request body, so that the keep-alive connection stays in step whatever we answer.
        payload = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        query = {k: v[-1].lower() for k, v in parse_qs(url.query).items()}  # httpx sends True as "true"
        api, resolve = f"/api/models/{hub.repo_id}", f"/{hub.repo_id}/resolve/"
        if url.path.startswith(resolve) and method != "POST":
            revision, _, filename = url.path[len(resolve):].partition("/")
            return self._file(hub, unquote(revision), unquote(filename))
        if url.path == api or url.path.startswith(api + "/"):
            kind, _, rest = url.path[len(api) + 1:].partition("/")
            revision, _, under = rest.partition("/")
            if not hub._resolves(unquote(revision) or "main"):
                return self._error(404, "RevisionNotFound", hub)
            if kind in ("", "revision") and method == "GET":
                blobs = query.get("blobs") == "true"  # files_metadata=True: sizes and hashes too
                siblings = [
                    {"rfilename": f.path}
                    | ({"size": f.size, "blobId": f.blob_id} | f.lfs_info("sha256") if blobs else {})
                    for f in hub.files.values()
                ]
                info = {"id": hub.repo_id, "modelId": hub.repo_id, "sha": hub.commit, "private": False}
                return self._json(info | {"siblings": siblings})
            if kind == "tree" and method == "GET":
                return self._json(hub._tree(unquote(under), query.get("recursive") == "true"))
            if kind == "paths-info" and method == "POST":
                wanted = set(parse_qs(payload).get("paths", []))
                return self._json([e for e in hub._tree("", True) if e["path"] in wanted])
        self._error(404, "RepoNotFound", hub)

    def _file(self, hub: FakeHub, revision: str, filename: str) -> None:
        f, head = hub.files.get(filename), self.command == "HEAD"
        if not hub._resolves(revision) or f is None:
            return self._error(404, "EntryNotFound" if hub._resolves(revision) else "RevisionNotFound", hub)
        rng = None if head else re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        start, end = (int(rng[1]), min(int(rng[2] or f.size - 1), f.size - 1)) if rng else (0, f.size - 1)
        if start >= f.size > 0:
            return self._error(416, None, hub, {"Content-Range": f"bytes */{f.size}"})
        self.send_response(206 if rng else 200)
        # What get_hf_file_metadata reads. X-Linked-* are what the real hub puts on its LFS redirects.
        headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "Content-Length": str(end - start + 1)}
        if f.lfs:
            headers |= {"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)}
        if rng:
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if head:
            return
        body, cut = hub._body(f)[start:end + 1], hub._cut(filename)
        if cut is not None:
            # Send what got through before the line died, then drop it. Content-Length promised more,
            # so the client sees a truncated body (httpx RemoteProtocolError).
            body, self.close_connection = body[:max(0, cut - start)], True
        self.wfile.write(body)

    def _json(self, payload) -> None:
        self._reply(200, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _error(self, status: int, code: str | None, hub: FakeHub, headers: dict | None = None) -> None:
        # hf_raise_for_status maps X-Error-Code to RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError
        extra = ({"X-Error-Code": code} if code else {}) | {"X-Repo-Commit": hub.commit} | (headers or {})
        self._reply(status, json.dumps({"error": code or "error"}).encode(), extra)

    def _reply(self, status: int, body: bytes, headers: dict) -> None:
        self.send_response(status)
        for key, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":  # a body after a HEAD reply would desync the keep-alive connection
            self.wfile.write(body)
