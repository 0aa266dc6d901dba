"""samprobe.io file hashes: streamed in blocks, equal to the digest of the whole file at once."""

from __future__ import annotations

import hashlib
import io
import zlib

from PIL import Image
from skimage import data

from samprobe.backbones.download import file_md5
from samprobe.io import file_crc32, hash_file, sha256_file


def test_streamed_hashes_equal_one_shot_digests(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    raw = buf.getvalue()
    path = tmp_path / "astronaut.png"
    path.write_bytes(raw)
    block = 4096
    assert len(raw) % block  # many full blocks and a partial last one

    assert sha256_file(path) == hashlib.sha256(raw).hexdigest()
    assert (
        hash_file(path, hashlib.sha256(), block=block).hexdigest()
        == hashlib.sha256(raw).hexdigest()
    )
    assert file_md5(path) == hashlib.md5(raw).hexdigest()
    assert file_crc32(path) == zlib.crc32(raw)
    with open(path, "rb") as f:  # an open file is hashed from its position on, and left open
        f.seek(1000)
        assert (
            hash_file(f, hashlib.sha256(), block=block).hexdigest()
            == hashlib.sha256(raw[1000:]).hexdigest()
        )
        assert not f.closed
