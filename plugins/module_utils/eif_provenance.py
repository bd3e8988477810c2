"""Placeholder EIFs never reach a Nitro host.

nitro-cli-emulator ships stand-in kernel, init and nsm.ko blobs (nitro_emulator/blobs) so EIFs can be built
anywhere; such an EIF boots only under the emulator. Its build records that fact in the metadata
(BuildMetadata.PlaceholderBlobs, see eif.make_metadata); older builds are recognised by the stand-in
kernel's first bytes. The modules, the supervisor and role enclave_image refuse such an EIF on a host
that has the Nitro Enclaves device. Stdlib only (runs inside Ansible modules on hosts).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .eif import PLACEHOLDER_BLOBS_KEY, EifError, EifImage
from .nitro_cli import device_path, is_emulated

# Every stand-in blob starts with this line (nitro_emulator/blobs/README.md); real blobs never do.
PLACEHOLDER_MARKER = b"NITRO-CLI-EMULATOR STAND-IN"
REAL_BLOBS_DIR = "/usr/share/nitro_enclaves/blobs"


class PlaceholderEifError(EifError):
    """A placeholder EIF was about to run on (or be built for) a host with the Nitro Enclaves device."""


def blob_is_placeholder(path: str | os.PathLike[str]) -> bool:
    """True when the blob file is one of the emulator's stand-ins."""
    with open(path, "rb") as handle:
        return handle.read(len(PLACEHOLDER_MARKER)) == PLACEHOLDER_MARKER


def metadata_says_placeholder(metadata: Mapping[str, Any] | None) -> bool:
    build = (metadata or {}).get("BuildMetadata")
    return isinstance(build, Mapping) and build.get(PLACEHOLDER_BLOBS_KEY) is True


def is_placeholder(image: EifImage) -> bool:
    """The EIF was built from the emulator's stand-in blobs (metadata flag, or the stand-in kernel)."""
    if metadata_says_placeholder(image.metadata):
        return True
    with image.open_section(image.kernel) as handle:
        return handle.read(len(PLACEHOLDER_MARKER)) == PLACEHOLDER_MARKER


def refusal_message(path: str | os.PathLike[str], device: str | None = None) -> str:
    return (
        f"{path} was built from nitro-cli-emulator's placeholder kernel and init, which cannot boot on this "
        f"Nitro host ({device or device_path()} exists). Build the EIF with the real nitro-cli instead: let role "
        "enclave_image build it on a Nitro host (enclave_image_build_host; on a Nitro fleet the default is the "
        "first enclave host, which needs aws-nitro-enclaves-cli-devel), or build it with "
        f"NITRO_CLI_BLOBS={REAL_BLOBS_DIR} (the blobs of aws-nitro-enclaves-cli-devel)."
    )


def require_runnable_here(image: EifImage) -> None:
    """Raise PlaceholderEifError for a placeholder EIF on a host with the device (NITRO_EMULATED=1 aside)."""
    if not is_emulated() and is_placeholder(image):
        raise PlaceholderEifError(refusal_message(image.path))
