"""CurveZMQ keys and the worker's allow-list of enrolled devices.

A keys folder of a cloud worker (`edgesplit keys init-cloud DIR`):

    DIR/cloud.key          the worker's public certificate (pyzmq's format, z85)
    DIR/cloud.key_secret   its secret certificate, mode 0600
    DIR/devices/NAME.key   the allow-list: one enrolled device's public certificate each

A device holds NAME.key / NAME.key_secret (`edgesplit keys new-device NAME --out DIR`) and the
worker's cloud.key. Certificates are written with pyzmq's `zmq.auth` (the files its
`load_certificate` reads), each through a temporary file renamed into place; a secret file that is
group or world readable is refused, as is a missing, unreadable or malformed file, naming it.

`Authenticator` runs pyzmq's ZAP handler on the worker's context and admits only the keys of
the allow-list, which `reload` re-reads (SIGHUP or a changed folder) without a restart. libzmq
admits ANY client key on a CURVE server when no ZAP handler runs, so `check_running` is called
before the worker binds: it fails closed.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edgesplit.runtime.errors import ConfigError
from edgesplit.transport.channel import CurveClientKeys

log = logging.getLogger(__name__)

CLOUD = "cloud"
DEVICES = "devices"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_Z85 = re.compile(rb"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name == CLOUD:
        raise ConfigError(f"device name {name!r}: use 1-64 letters, digits, '.', '_' or '-' (not {CLOUD!r})")
    return name


def _write_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """A new key pair NAME.key / NAME.key_secret in `folder` (secret 0600), written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise ConfigError(f"{p}: already exists; remove it first to make a new key pair")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".keys-") as tmp:
        pub_tmp, sec_tmp = zmq.auth.create_certificates(tmp, name)
        os.chmod(sec_tmp, 0o600)
        os.replace(pub_tmp, public)
        os.replace(sec_tmp, secret)
    return public, secret


def init_cloud(folder: str | os.PathLike) -> Path:
    """A worker's keys folder: its key pair and an empty allow-list. Returns the public key file."""
    folder = Path(folder)
    public, _ = _write_pair(folder, CLOUD)
    (folder / DEVICES).mkdir(exist_ok=True)
    return public


def new_device(name: str, out: str | os.PathLike) -> tuple[Path, Path]:
    """A device key pair `out/NAME.key` (give it to the worker's operator) and `NAME.key_secret`."""
    return _write_pair(Path(out), _check_name(name))


def enrol(keys: str | os.PathLike, name: str, public_key_file: str | os.PathLike) -> Path:
    """Add a device's public key to the worker's allow-list (takes effect without a restart)."""
    _check_name(name)
    load_public(public_key_file)  # a malformed or secret file is refused here, not at the handshake
    devices = _devices_dir(keys)
    target = devices / f"{name}.key"
    fd, tmp = tempfile.mkstemp(dir=devices, prefix=".enrol-")
    os.close(fd)
    shutil.copyfile(public_key_file, tmp)
    os.replace(tmp, target)
    return target


def revoke(keys: str | os.PathLike, name: str) -> Path:
    """Remove a device from the allow-list: new handshakes are refused and its open sessions closed."""
    target = _devices_dir(keys) / f"{_check_name(name)}.key"
    if not target.is_file():
        raise ConfigError(f"{target}: device {name!r} is not enrolled")
    target.unlink()
    return target


def _devices_dir(keys: str | os.PathLike) -> Path:
    devices = Path(keys) / DEVICES
    if not devices.is_dir():
        raise ConfigError(f"{devices}: not a keys folder's allow-list (make one with `edgesplit keys init-cloud`)")
    return devices


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: key file not found")
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not a readable CurveZMQ certificate ({exc})") from None
    for what, key in (("public", public), ("secret", secret)):
        if key is not None and not _Z85.match(key):
            raise ConfigError(f"{p}: {what} key is not 40 z85 characters: {key[:60]!r}")
    if public is None or not public:
        raise ConfigError(f"{p}: no public key in the certificate")
    return public, secret


def load_public(path: str | os.PathLike) -> bytes:
    """The z85 public key of a certificate file."""
    return _load(path)[0]


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys of a secret certificate; refused if group or world readable."""
    mode = Path(path).stat().st_mode if Path(path).exists() else 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: secret key file is readable by others (mode {stat.filemode(mode)}); "
                          f"chmod 600 {path}")
    public, secret = _load(path)
    if secret is None:
        raise ConfigError(f"{path}: holds no secret key (give the .key_secret file)")
    return public, secret


def device_keys(device_key: str | os.PathLike, cloud_key: str | os.PathLike) -> CurveClientKeys:
    """A device's keys for its channel: its secret certificate and the worker's public one."""
    public, secret = load_secret(device_key)
    return CurveClientKeys(public, secret, load_public(cloud_key))


@dataclass(frozen=True)
class ServerKeys:
    """A worker's key pair and where its allow-list lives."""

    public: bytes
    secret: bytes
    devices: Path

    @classmethod
    def load(cls, keys: str | os.PathLike) -> "ServerKeys":
        folder = Path(keys)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: keys folder not found (make one with `edgesplit keys init-cloud`)")
        devices = _devices_dir(folder)
        public, secret = load_secret(folder / f"{CLOUD}.key_secret")
        return cls(public, secret, devices)


class Authenticator:
    """pyzmq's ZAP handler on `context`, admitting the z85 keys of the allow-list folder."""

    def __init__(self, context: zmq.Context, devices: Path):
        self.devices = devices
        self.allowed: frozenset[bytes] = frozenset()
        self._stamp: tuple = ()
        self.reload()
        self._auth = ThreadAuthenticator(context, log=logging.getLogger("edgesplit.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """ZAP: admit an enrolled key (called by pyzmq at each handshake)."""
        ok = z85_key in self.allowed
        if not ok:
            log.warning("refused a device key at the handshake (not enrolled): %s", z85_key.decode(errors="replace"))
        return ok

    def _scan(self) -> tuple:
        """What identifies the folder's content: (name, mtime, size) of each key file."""
        return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in self.devices.glob("*.key")))

    def reload(self, force: bool = True) -> bool:
        """Re-read the allow-list when it changed (or always with `force`); returns whether it changed.
        A malformed file is skipped with a warning naming it, never admitted."""
        stamp = self._scan()
        if not force and stamp == self._stamp:
            return False
        keys = set()
        for p in sorted(self.devices.glob("*.key")):
            try:
                keys.add(load_public(p))
            except ConfigError as exc:
                log.warning("allow-list: skipping %s", exc)
        changed = frozenset(keys) != self.allowed
        self.allowed, self._stamp = frozenset(keys), stamp
        if changed:
            log.info("allow-list %s: %d device key(s) enrolled", self.devices, len(keys))
        return changed

    def check_running(self) -> None:
        """Fail closed: without a running ZAP handler libzmq would admit any key."""
        if not self._auth.is_alive():
            raise ConfigError("the CurveZMQ authenticator is not running: refusing to serve (libzmq would admit "
                              "any client key)")

    def stop(self) -> None:
        self._auth.stop()
