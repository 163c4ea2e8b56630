"""The salt of the patient and series hashes: given, or generated once per data dir.

Without `--salt` or $IAP_PREP_SALT, a random salt is generated on the first run and kept
in <data_dir>/prep_salt (owner-only permissions, beside the dataset dirs, never inside
one), and reused by every later run into that data dir, so that splits stay stable when
patients are added. Anyone holding the salt can link hashes back to PatientIDs: keep the
file private, and keep it to add patients later. A data dir in a bucket (gs://...) keeps
its salt the same way; an object has no permission bits, so who can read it is whoever the
bucket's IAM lets read the data dir.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from etils import epath

from iap_jax.io.storage import is_remote, makedirs, write_text_atomic

SALT_FILE = "prep_salt"
SALT_ENV = "IAP_PREP_SALT"
# tensorstore's storage generation of a key that has no value: a write conditioned on it
# creates the key only if it does not exist (on GCS: ifGenerationMatch=0).
_NO_VALUE = b"\x02"


def salted_hash(salt: str, kind: str, value: str, hex_chars: int = 16) -> str:
    """Keyed hash of one identifier; `kind` keeps patient and series hashes apart."""
    digest = hmac.new(salt.encode(), f"{kind}\0{value}".encode(), hashlib.sha256).hexdigest()
    return digest[:hex_chars]


def salt_path(data_dir: str) -> str:
    return os.path.join(os.fspath(data_dir), SALT_FILE)


def kept_salt(data_dir: str) -> str | None:
    """The salt kept in a data dir (None when there is none)."""
    path = salt_path(data_dir)
    return _read(path) if epath.Path(path).exists() else None


def _read(path: str) -> str:
    salt = epath.Path(path).read_text().strip()
    if not salt:
        raise ValueError(f"{path}: salt file is empty; restore it from a backup, or pass --salt")
    return salt


def _create(path: str) -> str:
    """A new random salt in a file only the owner can read; an existing file wins."""
    if is_remote(path):
        return _create_remote(path)
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
        except OSError:  # no hard links here (some FUSE and SMB mounts)
            return _create_exclusive(path, salt)
    finally:
        os.unlink(tmp)
    return salt


def _create_exclusive(path: str, salt: str) -> str:
    """The salt written straight into a file that must not exist yet (O_EXCL): still one
    winner among concurrent runs, but a kill in mid-write can leave an empty file, which
    _read refuses with the way out (restore it, or pass --salt)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
        f.flush()
        os.fsync(f.fileno())
    return salt


def create_if_absent(store, key: str, data: bytes) -> bool:
    """Writes `data` under `key` of a tensorstore KvStore unless the key exists; True when
    this call created it. On GCS this is one upload with ifGenerationMatch=0, which the
    service applies atomically: of concurrent first runs exactly one creates the object."""
    return bool(store.write(key, data, if_equal=_NO_VALUE).result().generation)


def _create_remote(path: str) -> str:
    """A new random salt in an object of a bucket; an existing one wins.

    gs://: created with create_if_absent through tensorstore (Orbax's array store, so no
    other client and the same credentials). The returned salt is read back from the bucket,
    so a run that lost a race uses the winner's. Other URI schemes have no create-if-absent
    here: the salt is written only when none is found, and two first runs started at the
    same moment could each write one (the later rename wins; the earlier run's datasets
    would then be hashed with a salt that is no longer kept). Start the first run alone.
    """
    salt = secrets.token_hex(16)
    if path.startswith("gs://"):
        import tensorstore as ts

        parent, name = path.rsplit("/", 1)
        create_if_absent(ts.KvStore.open(parent + "/").result(), name, (salt + "\n").encode())
    elif not epath.Path(path).exists():
        makedirs(os.path.dirname(path))
        write_text_atomic(path, salt + "\n")
    return _read(path)


def resolve_salt(data_dir: str, salt: str | None = None, announce=print) -> str:
    """The salt to use: `salt`, else $IAP_PREP_SALT, else the data dir's kept salt (made
    on first use). A given salt that differs from a kept one is refused: the datasets
    already in the data dir were hashed with the kept one."""
    given = salt if salt is not None else os.environ.get(SALT_ENV)
    path = salt_path(data_dir)
    if given is not None:
        if not given:
            raise ValueError("the salt is empty")
        if epath.Path(path).exists() and _read(path) != given:
            raise ValueError(f"{data_dir} was prepared with the salt kept in {path}, not the one "
                             f"given: use that salt (or none), or another data dir")
        return given
    if epath.Path(path).exists():
        salt = _read(path)
        announce(f"salt: {path} (keep it private; it is reused to add patients later)")
    else:
        salt = _create(path)
        announce(f"salt: generated and kept in {path}: keep it private, and keep it to add "
                 f"patients to this dataset later (or pass it with --salt)")
    return salt
