"""Where image files live: local paths, or object-storage URIs (s3://bucket/prefix/...) read through pyarrow.fs.

Both ingest engines take the same sources. A URI names a file or a prefix ("folder"); a prefix is listed
recursively and, as for local folders, only names with image extensions are taken. Credentials and the
endpoint come from the usual environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_ENDPOINT_URL for S3-compatible servers such as MinIO or moto), exactly as for
LanceDB and Ray: one configuration for the whole tool.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence
from urllib.parse import urlparse

from embedstore.arrowutil import bytes_hash, content_hash

AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
           "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP", "AWS_PROFILE")


def is_uri(p) -> bool:
    """True for an object-storage URI (s3://..., gs://...); local paths and file:// are not."""
    return isinstance(p, str) and "://" in p and not p.startswith("file://")


@functools.lru_cache(maxsize=16)
def _filesystem(scheme: str, bucket: str):
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}")[0]


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI; one cached filesystem per bucket."""
    u = urlparse(uri)
    return _filesystem(u.scheme, u.netloc), f"{u.netloc}{u.path}".rstrip("/")


def read_bytes(path: str) -> bytes:
    """The whole file, local or remote."""
    if not is_uri(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def hash_and_size(path: str) -> tuple[str, int]:
    """(content hash, size in bytes): the image's identity, the same for a local copy and a remote one."""
    if not is_uri(path):
        return content_hash(path), os.path.getsize(path)
    data = read_bytes(path)
    return bytes_hash(data), len(data)


def list_uri(uri: str, extensions) -> tuple[list[str], list[str]]:
    """([image files], [missing]) of a URI: itself when a file, else its prefix listed recursively."""
    from pyarrow import fs as pafs

    scheme = urlparse(uri).scheme
    try:
        fs, p = filesystem(uri)
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.File:
            return [uri], []
        if info.type != pafs.FileType.Directory:
            return [], [uri]
        infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    except OSError:  # no such bucket, no access: reported like a missing folder
        return [], [uri]
    out = []
    for i in infos:
        rel = i.path[len(p):].lstrip("/")
        if (i.type == pafs.FileType.File and os.path.splitext(i.path)[1].lower() in extensions
                and not any(part.startswith(".") for part in rel.split("/"))):
            out.append(f"{scheme}://{i.path}")
    return sorted(out), []


def aws_env() -> dict[str, str]:
    """The object-storage settings of this process, to hand to Ray workers."""
    return {k: os.environ[k] for k in AWS_ENV if k in os.environ}
