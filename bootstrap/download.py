"""Verified, resumable downloads from the hub: <file>.part, Range resume, SHA-256 of every byte, then rename."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from bootstrap.disk import free_bytes, usable_folder
from bootstrap.errors import BootstrapError
from bootstrap.hub import Digest, digest_from_headers, endpoint, file_url, find_token, hub_error, same_origin
from bootstrap.manifest import ModelFile
from bootstrap.progress import ProgressSink, QuietProgress, human_bytes, human_duration
from bootstrap.untrusted import printable
from bootstrap.verified import StreamHash, VerifiedState, hash_file

USER_AGENT = "fluxdeck-bootstrap/0.1"
REDIRECTS = (301, 302, 303, 307, 308)
RETRY_STATUS = (408, 429, 500, 502, 503, 504)


@dataclass
class DownloadOptions:
    endpoint: str = field(default_factory=endpoint)
    token: str | None = field(default_factory=find_token)
    retries: int = 6  # failures in a row that bring no byte beyond the furthest one reached before
    max_attempts: int = 30  # requests for one file in one run, however they fail
    deadline_s: float = 6 * 3600  # one file in one run; what arrived is kept and resumed by the next run
    slow_window_s: float = 120.0  # slower than min_speed over this long: the attempt counts as a failure
    min_speed_bytes_s: float = 1000.0
    backoff_s: float = 1.0  # doubles each retry, up to backoff_max_s
    backoff_max_s: float = 60.0
    timeout_s: float = 30.0
    chunk_bytes: int = 1024 * 1024
    max_redirects: int = 10
    disk_margin_bytes: int = 200 * 1000 * 1000


@dataclass
class Outcome:
    file: ModelFile
    path: Path
    status: str  # "present" (already verified) or "downloaded"
    note: str = ""


class Retry(Exception):
    """A failure worth another try: a dropped connection, a timeout, a 5xx, a trickle."""

    def __init__(self, reason: str, host: str, slow: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.host, self.slow = reason, host, slow


@dataclass
class Transfer:
    """One file's download across retries: the part file and the hash of what it holds."""

    file: ModelFile
    target: Path
    part: Path
    expected: Digest | None  # from the manifest; the hub's answer fills it in otherwise
    total: int | None
    hasher: StreamHash | None = None
    check_existing: bool = (
        False  # a file is in place but was never verified: compare it once the digest is known
    )
    notes: list[str] = field(default_factory=list)
    furthest: int = 0  # the most bytes of the file ever held this run: progress is getting past it
    deadline: float = float("inf")  # on the downloader's clock

    def part_size(self) -> int:
        try:
            return self.part.stat().st_size
        except OSError:
            return 0


def _host(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


def _reason(exc: Exception) -> str:
    if isinstance(exc, requests.Timeout):
        return "the connection timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection dropped in the middle of the file"
    return "the connection failed"


def _content_range_start(header: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000)."""
    if not header or not header.startswith("bytes "):
        return None, None
    span, _, total = header[6:].partition("/")
    start, total = span.partition("-")[0].strip(), total.strip()
    return (
        int(start) if start.isdigit() else None,  # "*" in a 416's "bytes */1000"
        int(total) if total.isdigit() else None,
    )


class Downloader:
    def __init__(
        self,
        models_dir: Path,
        options: DownloadOptions | None = None,
        progress: ProgressSink | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        free_space: Callable[[Path], int] = free_bytes,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.options = options or DownloadOptions()
        self.progress = progress or QuietProgress()
        self.session = session or requests.Session()
        self.sleep = sleep
        self.clock = clock
        self.free_space = free_space
        self.say = say or (lambda text: None)
        self.state = VerifiedState.load(usable_folder(models_dir))

    # ---- many files ----

    def ensure(self, files: list[ModelFile]) -> tuple[list[Outcome], list[BootstrapError]]:
        """Each file present and verified afterwards, or an error for it; the others still go ahead."""
        outcomes: list[Outcome] = []
        errors: list[BootstrapError] = []
        pending = [f for f in files if not self.is_verified(f)]
        for f in files:
            if f not in pending:
                outcomes.append(Outcome(f, f.target(self.models_dir), "present"))
        self.check_space(pending)
        for f in pending:
            try:
                outcomes.append(self.fetch(f))
            except BootstrapError as exc:
                errors.append(exc)
        return outcomes, errors

    def is_verified(self, model_file: ModelFile) -> bool:
        """Present and recorded as verified with the same size and mtime: no hashing, no request."""
        target = model_file.target(self.models_dir)
        if model_file.size is not None and target.is_file() and target.stat().st_size != model_file.size:
            return False
        return self.state.known_good(model_file.relpath, target, _manifest_digest(model_file))

    def check_space(self, files: list[ModelFile]) -> None:
        needed = 0
        for f in files:
            part = f.target(self.models_dir).with_name(f.filename + ".part")
            have = part.stat().st_size if part.is_file() else 0
            needed += max(0, (f.size or 0) - have)
        self._require_space(needed, "these files")

    def _require_space(self, needed: int, what: str) -> None:
        if needed <= 0:
            return
        free = self.free_space(self.models_dir)
        if free < needed + self.options.disk_margin_bytes:
            raise BootstrapError(
                f"Not enough free disk space in {self.models_dir} for {what}: {human_bytes(needed)} needed, "
                f"{human_bytes(free)} free; free some space or choose another --models-dir."
            )

    # ---- one file ----

    def fetch(self, model_file: ModelFile) -> Outcome:
        target = model_file.target(self.models_dir)
        transfer = Transfer(
            model_file,
            target,
            target.with_name(target.name + ".part"),
            _manifest_digest(model_file),
            model_file.size,
        )
        if self.is_verified(model_file):
            return Outcome(model_file, target, "present")
        if target.is_file():
            if transfer.expected is not None:
                if self._existing_matches(transfer):
                    return Outcome(model_file, target, "present", "checked the file already in place")
                self.say(
                    f"{target} does not match the manifest: downloading a fresh copy (it is replaced only once verified)."
                )
            else:
                transfer.check_existing = True
        recorded = self.state.partial.get(model_file.relpath)
        if (
            transfer.part.exists()
            and transfer.expected
            and recorded
            and recorded.get("value") != transfer.expected.value
        ):
            transfer.part.unlink()  # a part of another version of the file
        return self._fetch_bounded(transfer)

    def _fetch_bounded(self, transfer: Transfer) -> Outcome:
        """Attempts until the file is verified, bounded however they fail: `retries` failures in a row that bring
        no byte past the furthest one reached (a server that cuts at the same place and refuses to resume loops
        back to byte 0, so a growing part is not progress), `max_attempts` in all, and an overall deadline."""
        options, name = self.options, transfer.file.name
        transfer.deadline = self.clock() + options.deadline_s
        transfer.furthest = transfer.part_size()
        failures = attempts = 0
        while True:
            before = transfer.furthest
            attempts += 1
            try:
                return self._attempt(transfer)
            except Retry as exc:
                failures = 0 if transfer.furthest > before and not exc.slow else failures + 1
                kept = transfer.part_size()
                resume = f"; the {human_bytes(kept)} already downloaded will be resumed" if kept else ""
                why = f"{exc.reason} ({printable(exc.host)})"
                if failures > options.retries:
                    raise BootstrapError(
                        f"Downloading {name} failed after {options.retries} retries: {why}; check the connection "
                        f"and run the command again{resume}."
                    ) from None
                if attempts >= options.max_attempts:
                    raise BootstrapError(
                        f"Downloading {name} did not complete in {attempts} attempts (the last: {why}); run the "
                        f"command again later{resume}."
                    ) from None
                delay = min(options.backoff_s * 2 ** max(failures - 1, 0), options.backoff_max_s)
                if self.clock() + delay > transfer.deadline:
                    raise self._past_deadline(transfer) from None
                self.say(f"{name}: {why}; retrying in {delay:.0f} s.")
                self.sleep(delay)

    def _past_deadline(self, transfer: Transfer) -> BootstrapError:
        kept = transfer.part_size()
        got = f" ({human_bytes(kept)} of {human_bytes(transfer.total)})" if transfer.total else ""
        return BootstrapError(
            f"Downloading {transfer.file.name} took longer than the {human_duration(self.options.deadline_s)} "
            f"allowed{got}: the server is too slow; run the command again to resume."
        )

    def _existing_matches(self, transfer: Transfer) -> bool:
        size = transfer.target.stat().st_size
        if transfer.total is not None and size != transfer.total:
            return False
        self.progress.start(transfer.file.name, size, 0, "checking")
        git_size = size if transfer.expected and transfer.expected.kind == "git-sha1" else None
        digest = hash_file(transfer.target, git_size, self.progress.advance)
        if transfer.expected is None and transfer.total is None:
            return False  # nothing to compare with: never trusted
        ok = transfer.expected is None or digest.hexdigest(transfer.expected.kind) == transfer.expected.value
        if ok:
            self.state.remember(transfer.file.relpath, transfer.target, digest)
            self.state.save()
            self.progress.finish(f"{transfer.file.name}: already in place and verified")
        return ok

    def _get(self, url: str, start: int, transfer: Transfer) -> tuple[requests.Response, dict[str, str]]:
        """Follow redirects by hand: the token goes to the hub's own host only. The hub's 3xx carries the file's
        hash and size: a stale manifest or a full disk is said there, before the CDN is asked for a byte."""
        hub = self.options.endpoint
        linked: dict[str, str] = {}
        for hop in range(self.options.max_redirects + 1):
            _check_url(url, transfer.file.name, redirected=hop > 0)
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
            if start:
                headers["Range"] = f"bytes={start}-"
            if self.options.token and same_origin(url, hub):
                headers["Authorization"] = f"Bearer {self.options.token}"
            try:
                response = self.session.get(
                    url, headers=headers, stream=True, allow_redirects=False, timeout=self.options.timeout_s
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise Retry(_reason(exc), _host(url)) from None
            except (requests.RequestException, ValueError) as exc:  # an address (or a Location) it cannot use
                raise BootstrapError(
                    f"The address {printable(url)} for {transfer.file.name}, or where it redirects, cannot be "
                    f"used ({printable(exc)}): check HF_ENDPOINT and the manifest."
                ) from None
            if response.status_code not in REDIRECTS:
                response.url_requested = url  # type: ignore[attr-defined]
                return response, linked
            for name in ("X-Linked-Etag", "X-Linked-Size", "X-Repo-Commit"):
                if name in response.headers:
                    linked[name] = response.headers[name]
            location = response.headers.get("Location")
            response.close()
            if linked:
                self._settle_digest(transfer, linked, linked)
                if transfer.total is not None:
                    self._require_space(transfer.total - start, transfer.file.name)
            if not location:
                raise Retry(f"the hub answered {response.status_code} without a Location", _host(url))
            try:
                url = urljoin(url, location)
            except ValueError:  # e.g. "http://[::1/x"
                _check_url(location, transfer.file.name, redirected=True)
        raise BootstrapError(f"The hub redirected {url} more than {self.options.max_redirects} times.")

    def _attempt(self, transfer: Transfer) -> Outcome:
        model_file = transfer.file
        start = transfer.part_size()
        if start and transfer.total is not None and start > transfer.total:
            transfer.part.unlink()
            start = 0
        if (
            start
            and start == transfer.total
            and transfer.expected is not None
            and not transfer.check_existing
        ):
            git_size = start if transfer.expected.kind == "git-sha1" else None
            transfer.hasher = hash_file(
                transfer.part, git_size
            )  # stopped between the last byte and the rename
            return self._finish(transfer)
        url = model_file.url or file_url(self.options.endpoint, model_file)
        response, linked = self._get(url, start, transfer)
        with response:
            requested = response.url_requested  # type: ignore[attr-defined]
            status = response.status_code
            if status in RETRY_STATUS:
                raise Retry(f"the server answered {status}", _host(requested))
            if status == 416 and start:
                server_total = _content_range_start(response.headers.get("Content-Range"))[1]
                transfer.part.unlink()  # the part cannot be continued: start over
                transfer.hasher = None
                self._check_offered_size(transfer, server_total, requested)
                raise Retry("the server could not continue the partial file", _host(requested))
            if status >= 400:
                if same_origin(requested, self.options.endpoint):
                    raise hub_error(
                        status, response.headers, model_file, self.options.endpoint, bool(self.options.token)
                    )
                raise Retry(f"the download server answered {status}", _host(requested))
            if status not in (200, 206):
                raise BootstrapError(
                    f"The hub answered {status} for {model_file.name}, which the downloader does not understand."
                )
            self._settle_digest(transfer, {**response.headers, **linked}, linked)
            if status == 206:
                range_start, range_total = _content_range_start(response.headers.get("Content-Range"))
                if range_start != start:
                    transfer.part.unlink(missing_ok=True)
                    transfer.hasher = None
                    raise Retry("the server sent another part of the file than asked", _host(requested))
                self._check_offered_size(transfer, range_total, requested)
                if transfer.total is None and range_total is not None:
                    transfer.total = range_total
            else:
                start = 0  # a full answer: whatever part there was starts over
                length = response.headers.get("Content-Length")
                offered = int(length) if length and length.isdigit() else None
                self._check_offered_size(transfer, offered, requested)
                if transfer.total is None and offered is not None:
                    transfer.total = offered
            if transfer.expected is None and transfer.total is None:
                raise BootstrapError(
                    f"Neither the manifest nor the server gives a size or a hash for {model_file.name}, so a "
                    "download cut short could not be told from a whole one: add its size and sha256 to the "
                    "manifest."
                )
            if transfer.check_existing and self._existing_matches(transfer):
                return Outcome(model_file, transfer.target, "present", "checked the file already in place")
            transfer.check_existing = False
            if transfer.total is not None:
                self._require_space(transfer.total - start, model_file.name)
            return self._stream(transfer, response, start)

    def _check_offered_size(self, transfer: Transfer, offered: int | None, url: str) -> None:
        """A server that offers another number of bytes than the manifest or the hub said will never give the
        file: said at once, not retried."""
        if offered is not None and transfer.total is not None and offered != transfer.total:
            transfer.part.unlink(missing_ok=True)
            transfer.hasher = None
            raise BootstrapError(
                f"The download server ({printable(_host(url))}) has {offered} bytes for {transfer.file.name} but "
                f"{transfer.total} were expected: it serves another or a damaged file; try again later or "
                "update the manifest."
            )

    def _settle_digest(self, transfer: Transfer, headers: dict[str, str], linked: dict[str, str]) -> None:
        """The manifest's hash wins, but a hub that now serves other bytes is said before a byte is written."""
        hub_digest = digest_from_headers(headers)
        linked_size = linked.get("X-Linked-Size", "")
        name = transfer.file.name
        if transfer.expected is None:
            if hub_digest is not None:
                transfer.expected = hub_digest
                kind = "SHA-256" if hub_digest.kind == "sha256" else "git blob SHA-1"
                note = f"{name}: the manifest has no SHA-256; checking against the hub's {hub_digest.source} ({kind})."
                if note not in transfer.notes:
                    transfer.notes.append(note)
                    self.say(note)
            elif "no hash known" not in " ".join(transfer.notes):
                transfer.notes.append(f"{name}: no hash known; checking its size only.")
                self.say(transfer.notes[-1])
        elif (
            hub_digest is not None
            and hub_digest.kind == transfer.expected.kind
            and hub_digest.value != transfer.expected.value
        ):
            raise BootstrapError(
                f"The hub's copy of {name} ({transfer.file.repo}/{transfer.file.path}) has SHA-256 {hub_digest.value} "
                f"but the manifest expects {transfer.expected.value}: the file changed on the hub; update the "
                "manifest or pin its revision."
            )
        if transfer.total is None and linked_size.isdigit():
            transfer.total = int(linked_size)
        elif transfer.total is not None and linked_size.isdigit() and int(linked_size) != transfer.total:
            raise BootstrapError(
                f"The hub's copy of {name} is {linked_size} bytes but the manifest says {transfer.total}: "
                "the file changed on the hub; update the manifest or pin its revision."
            )

    def _stream(self, transfer: Transfer, response: requests.Response, start: int) -> Outcome:
        model_file = transfer.file
        git_size = transfer.total if transfer.expected and transfer.expected.kind == "git-sha1" else None
        if start == 0 or transfer.hasher is None or transfer.hasher.count != start:
            transfer.hasher = (
                hash_file(transfer.part, git_size) if start else StreamHash(git_size)
            )  # a resumed part is hashed once, then only the new bytes
        transfer.part.parent.mkdir(parents=True, exist_ok=True)
        if transfer.expected is not None:
            self.state.partial[model_file.relpath] = {
                "kind": transfer.expected.kind,
                "value": transfer.expected.value,
            }
            self.state.save()
        self.progress.start(model_file.name, transfer.total, start)
        host = _host(response.url_requested)  # type: ignore[attr-defined]
        window_start, window_bytes = self.clock(), transfer.hasher.count
        with open(transfer.part, "r+b" if start else "wb", buffering=0) as out:
            out.seek(start)
            out.truncate()
            for chunk in self._read(response, host):
                try:
                    out.write(chunk)
                except OSError as exc:  # the disk, not the network: full, removed, no permission
                    raise BootstrapError(
                        f"Could not write {transfer.part} ({exc.strerror or exc}): free some space or choose "
                        "another --models-dir; what was written is kept and resumed next time."
                    ) from None
                transfer.hasher.update(chunk)
                transfer.furthest = max(transfer.furthest, transfer.hasher.count)
                self.progress.advance(len(chunk))
                if transfer.total is not None and transfer.hasher.count > transfer.total:
                    break
                now = self.clock()
                if now > transfer.deadline:
                    raise self._past_deadline(transfer)
                if now - window_start >= self.options.slow_window_s:
                    speed = (transfer.hasher.count - window_bytes) / (now - window_start)
                    if speed < self.options.min_speed_bytes_s:
                        raise Retry(f"the server sends only {human_bytes(int(speed))}/s", host, slow=True)
                    window_start, window_bytes = now, transfer.hasher.count
        got = transfer.hasher.count
        if transfer.total is not None and got < transfer.total:
            raise Retry("the connection ended before the end of the file", host)
        return self._finish(transfer)

    def _read(self, response: requests.Response, host: str) -> Iterator[bytes]:
        """The body as it arrives: read1 returns whatever one read brought (at most a chunk), so the deadline and
        the speed are checked at least once per socket timeout, even when a server trickles a byte at a time."""
        raw = response.raw
        while True:
            try:
                chunk = raw.read1(self.options.chunk_bytes, decode_content=True)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                timed_out = isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError))
                reason = (
                    "the connection timed out"
                    if timed_out
                    else "the connection dropped in the middle of the file"
                )
                raise Retry(reason, host) from None
            if not chunk:
                return
            yield chunk

    def _finish(self, transfer: Transfer) -> Outcome:
        model_file, hasher = transfer.file, transfer.hasher
        assert hasher is not None
        problem = None
        if transfer.total is None and transfer.expected is None:
            problem = "neither its size nor a hash is known"
        elif transfer.total is not None and hasher.count != transfer.total:
            problem = f"it is {hasher.count} bytes, not {transfer.total}"
        elif transfer.expected is not None:
            got = hasher.hexdigest(transfer.expected.kind)
            if got != transfer.expected.value:
                kind = "SHA-256" if transfer.expected.kind == "sha256" else "git blob SHA-1"
                problem = f"expected {kind} {transfer.expected.value} ({transfer.expected.source}), got {got}"
        if problem:
            transfer.part.unlink(missing_ok=True)
            transfer.hasher = None
            self.state.partial.pop(model_file.relpath, None)
            self.state.save()
            raise BootstrapError(
                f"{model_file.name} ({transfer.target.name}) failed its check and was deleted: {problem}; "
                "run the command again, and if it repeats, the hub or a mirror is serving damaged data."
            )
        try:
            os.replace(transfer.part, transfer.target)
        except OSError as exc:
            raise BootstrapError(
                f"{model_file.name} was verified but could not be moved into place as {transfer.target} "
                f"({exc.strerror or exc}): close programs using that file and run the command again."
            ) from None
        self.state.remember(model_file.relpath, transfer.target, hasher)
        self.state.save()
        self.progress.finish(f"{model_file.name}: {human_bytes(hasher.count)} downloaded and verified")
        return Outcome(model_file, transfer.target, "downloaded", " ".join(transfer.notes))


def _check_url(url: str, name: str, redirected: bool) -> None:
    """Only http(s) addresses with a host are asked: a redirect to file:// or a malformed address is one
    sentence, not a traceback (and never a read of a local file)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        ok = parts.scheme.lower() in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if ok:
        return
    if redirected:
        raise BootstrapError(
            f"The hub redirected {name} to {printable(url)}, which is not an http(s) address: it is refused."
        )
    raise BootstrapError(
        f"{printable(url)} is not an http(s) address: check HF_ENDPOINT (for example https://huggingface.co)."
    )


def _manifest_digest(model_file: ModelFile) -> Digest | None:
    return Digest("sha256", model_file.sha256, "manifest") if model_file.sha256 else None
