"""The salt of the patient and series hashes: given, or generated once per data dir.

Without `--salt` or $IAP_PREP_SALT, a random salt is generated on the first run and kept
in <data_dir>/prep_salt (owner-only permissions, beside the dataset dirs, never inside
one), and reused by every later run into that data dir, so that splits stay stable when
patients are added. Anyone holding the salt can link hashes back to PatientIDs: keep the
file private, and keep it to add patients later.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets

SALT_FILE = "prep_salt"
SALT_ENV = "IAP_PREP_SALT"


def salted_hash(salt: str, kind: str, value: str, hex_chars: int = 16) -> str:
    """Keyed hash of one identifier; `kind` keeps patient and series hashes apart."""
    digest = hmac.new(salt.encode(), f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return digest[:hex_chars]


def salt_path(data_dir: str) -> str:
    return os.path.join(os.fspath(data_dir), SALT_FILE)


def kept_salt(data_dir: str) -> str | None:
    """The salt kept in a data dir (None when there is none)."""
    path = salt_path(data_dir)
    return _read(path) if os.path.exists(path) else None


def _read(path: str) -> str:
    with open(path) as f:
        salt = f.read().strip()
    if not salt:
        raise ValueError(f"{path}: salt file is empty; restore it from a backup, or pass --salt")
    return salt


def _create(path: str) -> str:
    """A new random salt in a file only the owner can read; an existing file wins."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    salt = secrets.token_hex(16)
    # Written whole into a private temporary file, then linked into place: a kill leaves no
    # empty salt file, and a concurrent run either links first or reads the complete one.
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(salt + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # another run created it meanwhile
            return _read(path)
    finally:
        os.unlink(tmp)
    return salt


def resolve_salt(data_dir: str, salt: str | None = None, announce=print) -> str:
    """The salt to use: `salt`, else $IAP_PREP_SALT, else the data dir's kept salt (made
    on first use). A given salt that differs from a kept one is refused: the datasets
    already in the data dir were hashed with the kept one."""
    given = salt if salt is not None else os.environ.get(SALT_ENV)
    path = salt_path(data_dir)
    if "://" in os.fspath(data_dir):
        if not given:
            raise ValueError(f"{data_dir}: pass --salt or ${SALT_ENV} when the data dir is not local")
        return given
    if given is not None:
        if not given:
            raise ValueError("the salt is empty")
        if os.path.exists(path) and _read(path) != given:
            raise ValueError(f"{data_dir} was prepared with the salt kept in {path}, not the one "
                             f"given: use that salt (or none), or another data dir")
        return given
    if os.path.exists(path):
        salt = _read(path)
        announce(f"salt: {path} (keep it private; it is reused to add patients later)")
    else:
        salt = _create(path)
        announce(f"salt: generated and kept in {path}: keep it private, and keep it to add "
                 f"patients to this dataset later (or pass it with --salt)")
    return salt
