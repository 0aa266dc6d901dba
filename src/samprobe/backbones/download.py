"""Downloading the official SAM-family checkpoints: resumable, checksummed, atomic.

Used by ``samprobe weights list`` and ``samprobe weights download NAME --dir DIR``. The file is
written to ``<name>.part`` first; an interrupted download resumes from there with an HTTP Range
request; the checksum is checked before the file is fsynced and renamed into place, so a
half-written or corrupt checkpoint is never visible under its final name.

SAM 1 files have published MD5s. SAM 2.1, SAM-HQ, MobileSAM and EfficientViT-SAM publish none (their READMEs and
download scripts give URLs only), so the first download records the file's sha256 beside it
(``<file>.sha256``) and says so; every later download or check of that folder must match it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import urlparse
from urllib.request import Request, urlopen

from samprobe.errors import ConfigError, DownloadError
from samprobe.io import atomic_write_text, fsync_dir, hash_file, sha256_file

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


@dataclass(frozen=True)
class WeightsEntry:
    """One downloadable checkpoint: where from, which family, and what vouches for its bytes."""

    url: str
    family: str
    md5: str | None
    """Published MD5, or None: the sha256 is recorded on first download."""
    source: str
    """Where the URL (and the checksum, if any) comes from."""


_SAM2 = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_HQ = "https://huggingface.co/lkeab/hq-sam/resolve/main/"
_SAM1_SOURCE = (
    "facebookresearch/segment-anything README; MD5: the file name's six digits start it, the full "
    "value as independent public projects verify it"
)
CATALOGUE: dict[str, WeightsEntry] = {
    **{
        name: WeightsEntry(url, "sam1", md5, _SAM1_SOURCE)
        for name, (url, md5) in OFFICIAL_WEIGHTS.items()
    },
    **{
        f"sam2.1_hiera_{size}": WeightsEntry(
            f"{_SAM2}sam2.1_hiera_{size}.pt",
            "sam2",
            None,
            "facebookresearch/sam2 checkpoints/download_ckpts.sh",
        )
        for size in ("tiny", "small", "base_plus", "large")
    },
    **{
        f"sam_hq_vit_{v}": WeightsEntry(
            f"{_HQ}sam_hq_vit_{v}.pth",
            "sam_hq",
            None,
            "SysCV/sam-hq README (Hugging Face lkeab/hq-sam)",
        )
        for v in ("b", "l", "h")
    },
    "mobile_sam": WeightsEntry(
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
        "mobile_sam",
        None,
        "ChaoningZhang/MobileSAM README (weights/ in the repo)",
    ),
    **{
        f"efficientvit_sam_{size}": WeightsEntry(
            f"https://huggingface.co/mit-han-lab/efficientvit-sam/resolve/main/efficientvit_sam_{size}.pt",
            "efficientvit_sam",
            None,
            "mit-han-lab/efficientvit applications/efficientvit_sam/README.md (Hugging Face "
            "mit-han-lab/efficientvit-sam)",
        )
        for size in ("l0", "l1", "l2", "xl0", "xl1")
    },
}
"""Every checkpoint ``samprobe weights download`` knows, by name."""


def file_md5(path: Path) -> str:
    return hash_file(path, hashlib.md5(usedforsecurity=False)).hexdigest()


def _fetch(url: str, part: Path, md5: str, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (resuming from its size), fsync it."""
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    fix = (
        f"download {url} by hand (MD5 {md5}) and set backbone.checkpoint to the file; "
        f"or run the command again to resume from {part.name}"
    )
    try:
        with urlopen(Request(url, headers=headers), timeout=timeout) as resp:
            if offset and resp.status != 206:
                offset = 0  # server ignored the Range header: start over
            length = resp.headers.get("Content-Length")
            total = offset + int(length) if length is not None else None
            with (
                open(part, "ab" if offset else "wb") as f,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=part.name[: -len(".part")],
                    disable=not progress,
                ) as bar,
            ):
                while block := resp.read(_CHUNK):
                    f.write(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
    except HTTPError as exc:
        if exc.code == 416 and offset:  # range starts at the end: the .part is already complete
            return
        raise DownloadError(
            f"downloading {url} failed: HTTP {exc.code} {exc.reason}", fix=fix
        ) from None
    except (URLError, OSError) as exc:  # URLError, timeouts, connection resets
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"downloading {url} failed: {reason}", fix=fix) from None
    if total is not None and part.stat().st_size < total:
        raise DownloadError(
            f"downloading {url} stopped at {part.stat().st_size} of {total} bytes", fix=fix
        )


def download_weights(
    name: str,
    dest_dir: Path,
    url: str | None = None,
    *,
    expected_md5: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download checkpoint ``name`` (a ``CATALOGUE`` key) into ``dest_dir`` -> file path.

    ``url`` overrides the source (a mirror); ``expected_md5`` overrides the checksum (tests).
    A file already there with the right checksum is returned as is.
    """
    if name not in CATALOGUE:
        raise ConfigError(
            f"unknown weights name {name!r}", fix=f"choose from {', '.join(CATALOGUE)}"
        )
    entry = CATALOGUE[name]
    url = url or entry.url
    md5 = (expected_md5 or entry.md5 or "").lower() or None
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / Path(urlparse(entry.url).path).name
    # the first download's sha256 (no published checksum)
    record = final.with_name(final.name + ".sha256")
    if final.is_file() and (file_md5(final) == md5 if md5 else _matches_record(final, record)):
        return final
    part = final.with_name(final.name + ".part")
    _fetch(url, part, md5 or "unpublished", timeout, progress)
    retry = (
        f"run the command again; if it keeps failing, download {url} by hand and "
        "set backbone.checkpoint to the file"
    )
    if md5:
        actual = file_md5(part)
        if actual != md5:
            part.unlink()  # a resumed download would only extend the bad bytes
            raise DownloadError(
                f"{url} downloaded with MD5 {actual}, expected {md5}; the partial file was removed",
                fix=retry,
            )
    else:
        actual = sha256_file(part)
        recorded = record.read_text().split()[0] if record.is_file() else None
        if recorded is not None and actual != recorded:
            part.unlink()
            raise DownloadError(
                f"{url} downloaded with sha256 {actual}, but the first download into {dest_dir} "
                f"recorded {recorded} ({record.name}); the partial file was removed",
                fix=f"{retry}; if the file changed upstream on purpose, delete {record}",
            )
        if recorded is None:
            atomic_write_text(record, f"{actual}  {final.name}\n")
    os.replace(part, final)
    fsync_dir(dest_dir)
    return final


def _matches_record(path: Path, record: Path) -> bool:
    return record.is_file() and sha256_file(path) == record.read_text().split()[0]


def checksum_note(name: str, dest_dir: Path) -> str:
    """What vouches for a downloaded file, for the command's closing line."""
    entry = CATALOGUE[name]
    if entry.md5:
        return "MD5 verified"
    record = Path(dest_dir) / (Path(urlparse(entry.url).path).name + ".sha256")
    return (
        f"no checksum is published for it: sha256 {record.read_text().split()[0]} recorded in "
        f"{record}, checked on every later download"
    )
