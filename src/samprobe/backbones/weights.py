"""Downloading the official SAM checkpoints: resumable, checksummed, atomic.

Used by ``samprobe weights download NAME --dir DIR``. The file is written to ``<name>.part``
first; an interrupted download resumes from there with an HTTP Range request; the MD5 is
checked before the file is fsynced and renamed into place, so a half-written or corrupt
checkpoint is never visible under its final name.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from samprobe.errors import ConfigError, DownloadError
from samprobe.io import fsync_dir, hash_file

_BASE = "https://dl.fbaipublicfiles.com/segment_anything/"
# name -> (official URL, MD5). The six hex digits in each official file name are the start of
# the file's MD5; the full MD5s are the ones several independent public projects verify
# against.
OFFICIAL_WEIGHTS: dict[str, tuple[str, str]] = {
    "sam_vit_b": (_BASE + "sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8"),
    "sam_vit_l": (_BASE + "sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c"),
    "sam_vit_h": (_BASE + "sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6"),
}
_CHUNK = 1 << 20


def file_md5(path: Path) -> str:
    return hash_file(path, hashlib.md5(usedforsecurity=False)).hexdigest()


def _fetch(url: str, part: Path, md5: str, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (resuming from its size), fsync it."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    fix = (f"download {url} by hand (MD5 {md5}) and set backbone.checkpoint to the file; "
           f"or run the command again to resume from {part.name}")
    try:
        with urlopen(Request(url, headers=headers), timeout=timeout) as resp:
            if offset and resp.status != 206:
                offset = 0  # server ignored the Range header: start over
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            with open(part, "ab" if offset else "wb") as f, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=part.name[: -len(".part")], disable=not progress) as bar:
                while block := resp.read(_CHUNK):
                    f.write(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
    except HTTPError as exc:
        if exc.code == 416 and offset:  # range starts at the end: the .part is already complete
            return
        raise DownloadError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}", fix=fix) from None
    except (URLError, OSError) as exc:  # URLError, timeouts, connection resets
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"downloading {url} failed: {reason}", fix=fix) from None
    if total is not None and part.stat().st_size < total:
        raise DownloadError(f"downloading {url} stopped at {part.stat().st_size} of {total} bytes", fix=fix)


def download_weights(name: str, dest_dir: Path, url: str | None = None, *, expected_md5: str | None = None,
                     timeout: float = 60.0, progress: bool = True) -> Path:
    """Download official SAM weights ``name`` (sam_vit_b|sam_vit_l|sam_vit_h) into ``dest_dir`` -> file path.

    ``url`` overrides the source (a mirror); ``expected_md5`` overrides the checksum (tests).
    A file already there with the right MD5 is returned as is.
    """
    if name not in OFFICIAL_WEIGHTS:
        raise ConfigError(f"unknown weights name {name!r}", fix=f"choose from {', '.join(OFFICIAL_WEIGHTS)}")
    official_url, md5 = OFFICIAL_WEIGHTS[name]
    url = url or official_url
    md5 = (expected_md5 or md5).lower()
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / Path(urlparse(official_url).path).name
    if final.is_file() and file_md5(final) == md5:
        return final
    part = final.with_name(final.name + ".part")
    _fetch(url, part, md5, timeout, progress)
    actual = file_md5(part)
    if actual != md5:
        part.unlink()  # a resumed download would only extend the bad bytes
        raise DownloadError(f"{url} downloaded with MD5 {actual}, expected {md5}; the partial file was removed",
                            fix=f"run the command again; if it keeps failing, download {url} by hand and "
                                "set backbone.checkpoint to the file")
    os.replace(part, final)
    fsync_dir(dest_dir)
    return final
