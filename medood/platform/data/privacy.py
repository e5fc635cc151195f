"""Pseudonymisation for ingest: salted patient hashes and the whitelist of DICOM tags kept in ``meta``.

Salt handling (the choice users must know about):

- A salt given by the user (``ingest(salt=...)``, ``medood ingest --salt``, or the ``MEDOOD_SALT``
  environment variable) is used as is. Share it with collaborators who must produce the same groups.
- Otherwise the salt is a 256-bit secret kept in ``~/.medood/salt`` (``$MEDOOD_HOME/salt`` when
  that variable is set), created with mode 0600 on first use. It never leaves that file: shards
  and ``manifest.json`` hold only the salted hashes and a fingerprint of the salt (a hash of it,
  so a re-ingest with another salt is detected), never the salt itself. Losing the file only
  means new ingests produce different (still consistent among themselves) group hashes.

Splits do not depend on the salt: they are drawn from the patient key and the seed, so two sites
with different salts get the same split for the same data and seed.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DICOM_META_WHITELIST = (
    "Modality",
    "PixelSpacing",
    "SliceThickness",
    "ImageOrientationPatient",
    "RescaleSlope",
    "RescaleIntercept",
    "PhotometricInterpretation",
    "BitsAllocated",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "TransferSyntaxUID",
    "BodyPartExamined",
)

GROUP_HEX_CHARS = 16
SALT_ENV = "MEDOOD_SALT"
HOME_ENV = "MEDOOD_HOME"


@dataclass(frozen=True)
class Salt:
    """A salt and where it came from; ``fingerprint`` may be stored, ``value`` never."""

    value: str
    source: str  # "argument", "MEDOOD_SALT" or the path of the secret file

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(b"medood-salt-fingerprint\x00" + self.value.encode()).hexdigest()[:12]


def medood_home() -> Path:
    """Where medood keeps per-user state (``$MEDOOD_HOME`` or ``~/.medood``)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".medood")


def resolve_salt(salt: str | None = None) -> Salt:
    """The salt to hash patient ids with: the argument, ``$MEDOOD_SALT``, else the user's secret file."""
    if salt is not None:
        if not salt:
            raise ValueError("salt must be a non-empty string")
        return Salt(salt, "argument")
    from_env = os.environ.get(SALT_ENV)
    if from_env:
        return Salt(from_env, SALT_ENV)
    path = medood_home() / "salt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"the salt file {path} is empty; delete it to have a new one created")
    return Salt(value, str(path))


def pseudonymize(key: str, salt: Salt) -> str:
    """Salted SHA-256 of a patient key, truncated to ``GROUP_HEX_CHARS`` hex characters."""
    digest = hashlib.sha256(salt.value.encode() + b"\x00" + key.encode())
    return digest.hexdigest()[:GROUP_HEX_CHARS]


def dicom_meta(dataset: Any) -> dict[str, Any]:
    """The whitelisted technical tags of a pydicom dataset as JSON-ready values.

    Nothing outside ``DICOM_META_WHITELIST`` is copied, so names, ids, dates, institutions and
    free text never reach a shard. A whitelisted value that does not parse is left out.
    """
    meta: dict[str, Any] = {}
    for keyword in DICOM_META_WHITELIST:
        try:
            if keyword == "TransferSyntaxUID":
                file_meta = getattr(dataset, "file_meta", None)
                value = None if file_meta is None else file_meta.get("TransferSyntaxUID")
            else:
                value = dataset.get(keyword)
            if value is None or value == "":
                continue
            meta[keyword] = _json_value(value)
        except Exception:  # a malformed value of a tag only kept for information: left out
            continue
    return meta


def _json_value(value: Any) -> Any:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_json_value(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)
