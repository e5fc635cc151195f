"""Where medood reads and writes: local folders and object storage (``s3://bucket/prefix``) alike.

Every data and run location a command takes (``--data``, ``--out``, a sweep's ``best.json``,
``--checkpoint``) goes through ``location``: a local path or a URI becomes a ``Location``, a pyarrow
filesystem plus a path inside it, with the few file operations the platform needs (read, write,
list, remove). Ray uses the same pair: Ray Data reads shards with ``filesystem=``, Ray Train and
Tune keep checkpoints under ``RunConfig(storage_path=..., storage_filesystem=...)``. What must be a
local file (matplotlib's PNGs, a NIfTI written by nibabel, a CSV) is written to ``staged_folder``,
a temporary local folder uploaded to the location when the block ends.

Object storage is configured by the standard AWS environment variables, nothing medood-specific:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``, or ``~/.aws``, or an
instance role), ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``) and, for an S3-compatible store,
``AWS_ENDPOINT_URL`` (``http://host:port``). Credentials are never handed to pyarrow explicitly:
the AWS SDK's default chain reads them in each process, so a pickled filesystem (Ray ships
``storage_filesystem`` to its Train workers and the filesystem to every read task) carries no
secret, and no path, log line, manifest or report can hold one. Every process that touches the
store (the driver and each Ray node) needs the variables in its environment; medood never puts
them into a Ray runtime env, where they would show in the job's metadata. pyarrow 26's
``FileSystem.from_uri`` reads ``AWS_ENDPOINT_URL`` but ``S3FileSystem()`` does not, so it is passed
as ``endpoint_override`` here (the same with every pyarrow version).
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

__all__ = ["Location", "is_uri", "location", "scratch_folder", "staged_folder"]

#: The schemes medood reads and writes (and tests against a real server): S3 and S3-compatible stores.
#: pyarrow knows more (gs://, hdfs://, abfs://); they are refused by name rather than half supported.
URI_SCHEMES = ("s3", "file")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (``s3://bucket/prefix``); a local path never holds ``://`` after a scheme."""
    scheme, sep, _ = str(path).partition("://")
    return bool(sep) and _SCHEME.fullmatch(scheme) is not None


def location(path: str | os.PathLike[str] | Location) -> Location:
    """A local path (made absolute, ``~`` expanded) or a URI -> the ``Location`` it names."""
    if isinstance(path, Location):
        return path
    text = os.fspath(path)
    if not is_uri(text):
        return Location(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()), "")
    scheme, _, rest = text.partition("://")
    scheme = scheme.lower()
    authority = rest.split("/", 1)[0]
    if "@" in authority or "?" in rest:
        # pyarrow would take keys from ``s3://KEY:SECRET@bucket`` or ``?secret_key=``; they would then be
        # written into run.json, reports and logs with the path. The URI is not echoed for that reason.
        raise ValueError(
            f"a {scheme}:// location may not carry credentials or options (no '@' or '?'); set "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_ENDPOINT_URL instead"
        )
    if scheme == "file":
        return location(rest)
    if scheme == "s3":
        return Location(_s3_filesystem(*_s3_settings(rest.split("/", 1)[0])), rest.rstrip("/"), "s3")
    raise ValueError(
        f"{scheme}:// locations are not supported; use a local path (or a shared mount such as NFS) or "
        "s3://bucket/prefix (S3, or an S3-compatible store named by AWS_ENDPOINT_URL)"
    )


@dataclass(frozen=True)
class Location:
    """A file or folder: ``path`` inside ``filesystem`` (absolute for local ones, ``bucket/key`` on S3)."""

    filesystem: Any  # pyarrow.fs.FileSystem
    path: str
    scheme: str = ""  # "" for a local path

    @property
    def is_local(self) -> bool:
        return self.scheme == ""

    @property
    def uri(self) -> str:
        """How a user names it: the local path, or ``s3://bucket/key``."""
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> Location:
        joined = os.path.join(self.path, name) if self.is_local else posixpath.join(self.path, name)
        return Location(self.filesystem, joined, self.scheme)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/")) if not self.is_local else Path(self.path).name

    @property
    def parent(self) -> Location:
        parent = str(Path(self.path).parent) if self.is_local else posixpath.dirname(self.path.rstrip("/"))
        return Location(self.filesystem, parent, self.scheme)

    def at(self, path: str) -> Location:
        """Another path in the same filesystem (a path Ray returned, e.g. a checkpoint's)."""
        if is_uri(path):
            return location(path)
        return Location(self.filesystem, path.rstrip("/") if not self.is_local else path, self.scheme)

    @property
    def ray_filesystem(self) -> Any:
        """What Ray's ``storage_filesystem`` / ``filesystem=`` arguments take: ``None`` (Ray's default)
        for a local path, so local runs behave exactly as without this module, else the filesystem."""
        return None if self.is_local else self.filesystem

    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not a local path")
        return Path(self.path)

    # -- queries ------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def size(self) -> int:
        return int(self.filesystem.get_file_info(self.path).size)

    def listdir(self, pattern: str = "*") -> list[str]:
        """Sorted names (not paths) of the entries directly inside, matching a glob ``pattern``; [] if none."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        try:
            infos = self.filesystem.get_file_info(selector)
        except NotADirectoryError:  # a file, not a folder
            return []
        names = {posixpath.basename(i.path.rstrip("/")) for i in infos}
        return sorted(n for n in names if n and fnmatch(n, pattern))

    # -- reading and writing ------------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Atomic: a local file is written under a temporary name and renamed; an object appears whole."""
        if self.is_local:
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, target)
            return
        with self.filesystem.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def makedirs(self) -> None:
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        # object stores have no folders: a key's prefix exists once an object is under it

    def unlink(self, missing_ok: bool = True) -> None:
        try:
            self.filesystem.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def upload(self, local_file: str | os.PathLike[str]) -> None:
        """Move a local file here (a rename when local, so the file appears whole)."""
        if self.is_local:
            os.replace(local_file, self.path)
            return
        pafs.copy_files(os.fspath(local_file), self.path, pafs.LocalFileSystem(), self.filesystem)
        os.unlink(local_file)

    def _type(self) -> Any:
        return self.filesystem.get_file_info(self.path).type


@contextmanager
def staged_folder(target: Location) -> Iterator[Path]:
    """A local folder to write files into for ``target``: the folder itself when local, else a
    temporary one whose files are uploaded to ``target`` (same relative names) when the block ends
    without an error."""
    if target.is_local:
        folder = target.local_path()
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="medood-stage-") as temporary:
        yield Path(temporary)
        if any(Path(temporary).iterdir()):
            pafs.copy_files(temporary, target.path, pafs.LocalFileSystem(), target.filesystem)


def scratch_folder(target: Location) -> Path:
    """A local folder for files only this machine needs while it works on ``target`` (W&B's offline
    run files): the folder itself when local, else a folder under the system's temporary folder."""
    if target.is_local:
        return target.local_path()
    return Path(tempfile.gettempdir()) / "medood-scratch" / target.path.replace("/", "_")


def _s3_settings(bucket: str) -> tuple[str | None, str | None]:
    """(region, endpoint) from the AWS environment variables; the bucket's region is looked up on AWS
    itself when no region and no endpoint are set (what ``FileSystem.from_uri`` does)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    if region is None and endpoint is None and bucket:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError:
            region = None
    return region, endpoint


@lru_cache(maxsize=8)
def _s3_filesystem(region: str | None, endpoint: str | None) -> pafs.S3FileSystem:
    # No access_key / secret_key: the SDK's default chain reads them (see the module docstring).
    return pafs.S3FileSystem(region=region, endpoint_override=endpoint)
