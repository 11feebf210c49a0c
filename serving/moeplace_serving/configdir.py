"""Write a directory the way the kubelet writes a ConfigMap volume (its AtomicWriter).

Used where no kubelet runs (tests, the local closed loop): a new version goes to a fresh
``..YYYY_MM_DD_HH_MM_SS.<random>`` directory, ``..data_tmp`` is pointed at it and renamed over
``..data`` (one atomic rename), each key gets a ``KEY -> ..data/KEY`` symlink, and the old
version's directory and links of removed keys are deleted.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from moeplace_serving.watcher import DATA_LINK


def write_atomic(directory: Path, files: Mapping[str, str]) -> Path:
    """Publish ``files`` (key -> content) as the new version of ``directory``; returns the new
    timestamped directory."""
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / DATA_LINK
    old = str(link.readlink()) if link.is_symlink() else None
    stamp = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    version_dir = Path(tempfile.mkdtemp(prefix=stamp, dir=directory))
    for key, content in files.items():
        (version_dir / key).write_text(content)
    version_dir.chmod(0o755)
    tmp = directory / (DATA_LINK + "_tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(version_dir.name)
    tmp.rename(link)
    for key in files:
        key_link = directory / key
        if not key_link.is_symlink():
            key_link.symlink_to(f"{DATA_LINK}/{key}")
    for entry in directory.iterdir():
        stale_key = entry.is_symlink() and not entry.name.startswith("..") and not entry.exists()
        if stale_key:
            entry.unlink()
    if old is not None:
        shutil.rmtree(directory / old, ignore_errors=True)
    return version_dir
