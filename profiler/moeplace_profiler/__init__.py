"""GPU profiler for moeplace: measures each GPU's expert-FFN latency curve and speed factor,
writes the versioned GPU-profile document, and publishes it on the node.

The pure parts (:mod:`.plan`, :mod:`.stats`) need only numpy and are imported by the scripts
in ``gpu/`` on the GPU machine; when to re-profile is decided from drift
(``placement.drift``, shared with the operator) and by :mod:`.publish`'s
:func:`~moeplace_profiler.publish.reprofile_requested`. :mod:`.document` (pydantic, via the
placement library), :mod:`.publish` (kubernetes) and :mod:`.runner` (torch, imported lazily)
are imported on demand; this package's import pulls none of them.
"""

from __future__ import annotations

PROFILE_API_VERSION = "moeplace.io/v1alpha1"
PROFILE_KIND = "GPUProfile"

__all__ = ["PROFILE_API_VERSION", "PROFILE_KIND"]
