"""The secrets a deployment may leave to the service: read from the data dir, generated there (mode 0600, in a 0700
directory) on first use when the setting is empty. Settings only holds settings; this writes the files."""

from __future__ import annotations

import os
import secrets

from cpis_bridge.config import Settings


def secret_file(settings: Settings, name: str, nbytes: int) -> str:
    """Read a generated secret from the data dir, creating it on first use."""
    path = settings.data_dir / name
    if path.exists():
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)  # written by an earlier release with the default mode
        return path.read_text().strip()
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    value = secrets.token_urlsafe(nbytes)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(value)
    tmp.replace(path)
    return value


def dev_secret(settings: Settings) -> str:
    """The dev tokens' signing secret: CPIS_AUTH_DEV_SECRET, else the data dir's generated one."""
    return settings.auth_dev_secret or secret_file(settings, "dev-secret", 32)


def hash_key(settings: Settings) -> bytes:
    """The key of the hash standing in for NHS numbers: CPIS_LOG_HASH_KEY, else the data dir's generated one."""
    return (settings.log_hash_key or secret_file(settings, "log-hash-key", 32)).encode()
