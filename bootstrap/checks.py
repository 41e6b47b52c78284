"""`python -m bootstrap verify`: hash the files in place again and compare them with the manifest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bootstrap.disk import usable_folder
from bootstrap.manifest import ModelFile
from bootstrap.progress import ProgressSink, QuietProgress
from bootstrap.verified import VerifiedState, hash_file


@dataclass
class CheckResult:
    file: ModelFile
    path: Path
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok' if self.ok else 'FAILED'}  {self.file.name}: {self.detail}"


def verify_files(
    models_dir: Path, files: list[ModelFile], report_missing: bool, progress: ProgressSink | None = None
) -> list[CheckResult]:
    """Every byte is read again (this is the explicit check); a file that passes is recorded as verified."""
    progress = progress or QuietProgress()
    state = VerifiedState.load(usable_folder(models_dir))
    results: list[CheckResult] = []
    for f in files:
        target = f.target(models_dir)
        if not target.is_file():
            if report_missing:
                results.append(CheckResult(f, target, False, f"missing ({target})"))
            continue
        size = target.stat().st_size
        if f.size is not None and size != f.size:
            state.forget(f.relpath)
            results.append(
                CheckResult(f, target, False, f"{size} bytes, the manifest says {f.size}: download it again")
            )
            continue
        record = state.files.get(f.relpath)
        if f.sha256:
            kind, expected, source = "sha256", f.sha256, "the manifest"
        elif record is not None and record.size == size:
            kind, expected, source = (
                ("git-sha1", record.git_sha1, "the download")
                if record.git_sha1
                else ("sha256", record.sha256, "the download")
            )
        else:
            results.append(
                CheckResult(
                    f, target, True, "present; no hash known (the hub's is taken when it is downloaded)"
                )
            )
            continue
        progress.start(f.name, size, 0, "checking")
        digest = hash_file(target, size if kind == "git-sha1" else None, progress.advance)
        got = digest.hexdigest(kind)
        progress.finish(f"{f.name}: checked")
        if got == expected:
            state.remember(f.relpath, target, digest)
            results.append(CheckResult(f, target, True, f"{kind} matches {source}"))
        else:
            state.forget(f.relpath)
            results.append(
                CheckResult(
                    f,
                    target,
                    False,
                    f"{kind} is {got}, {source} expects {expected}: delete it and download it again",
                )
            )
    if results:
        state.save()
    return results
