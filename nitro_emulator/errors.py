"""nitro-cli's error contract: `[ Exx ] <text>` on stderr and exit code = the E number."""

from __future__ import annotations

import sys

ERRORS_URL = "https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html"

# Templates of the parameterised errors (nitro-cli src/common/document_errors.rs); {n} = info item n.
# A dict chooses the template by the number of info items, as nitro-cli does.
TEMPLATES: dict[int, str | dict[int, str]] = {
    0: "Unspecified error.",
    1: "Missing mandatory argument. User did not provide the `{0}` argument.",
    2: "Conflicting arguments. User provided both `{0}` and `{1}`.",
    3: "Invalid argument provided. The parameter `{0}` is not a valid integer (`{1}`)",
    7: "Read from disk failure. {0}",
    11: "Socket error. {0}",
    17: "Serde error. {0}",
    19: {
        1: "File operation failure. {0}",
        2: "File operation failure.\nFile: '{0}', failing operation: '{1}'.",
    },
    20: "Invalid CPU configuration. User provided `{0}` contains same CPU(s) (CPU(s) {1}) multiple times.",
    21: (
        "No such CPU available in the pool. User provided `{0}` contains CPU {1}, which is not available "
        "in the pool.\nYou can add a specific CPU to the CPU pool by editing the `cpu_pool` value from "
        "'/etc/nitro_enclaves/allocator.yaml' and then enable the nitro-enclaves-allocator.service."
    ),
    22: (
        "Insufficient CPUs available in the pool. User provided `{0}` is {1}, which is more than the "
        "configured CPU pool size.\nYou can increase the CPU pool size by editing the `cpu_count` value "
        "from '/etc/nitro_enclaves/allocator.yaml' and then enable the nitro-enclaves-allocator.service."
    ),
    26: {
        2: "Insufficient memory requested. User provided `{0}` is {1} MB, and memory should be greater than 0 MB.",
        3: (
            "Insufficient memory requested. User provided `{0}` is {1} MB, but based on the EIF file size, "
            "the minimum memory should be {2} MB"
        ),
    },
    27: (
        "Insufficient memory available. User provided `{0}` is {1} MB, which is more than the available "
        "hugepage memory.\nYou can increase the available memory by editing the `memory_mib` value from "
        "'/etc/nitro_enclaves/allocator.yaml' and then enable the nitro-enclaves-allocator.service."
    ),
    29: "Ioctl failure. {0}",
    35: "EIF file parsing error. {0}",
    36: "Enclave boot failure. {0}",
    39: "Enclave process connection failure. {0}",
    44: "Enclave console connection failure. {0}",
    48: "EIF building error. {0}",
    49: "Docker image build error. {0}",
    50: "Docker image pull error. {0}",
    57: "Hasher error. {0}",
    58: "Naming error. {0}",
    59: "EIF signature checker error. {0}",
    60: "Signing error. {0}",
}


class NitroCliError(Exception):
    """A failure reported the way nitro-cli reports it."""

    def __init__(self, code: int, *info: object) -> None:
        self.code = code
        self.info = tuple(str(item) for item in info)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        template = TEMPLATES.get(self.code, "{0}")
        if isinstance(template, dict):
            template = template.get(len(self.info)) or template[max(template)]
        count = template.count("{")
        items = list(self.info) + ["MISSING_INFO"] * max(0, count - len(self.info))
        return template.format(*items).rstrip()

    def render(self) -> str:
        tag = f"E{self.code:02d}"
        return f"[ {tag} ] {self.message}\n\nFor more details, please visit {ERRORS_URL}#{tag}\n"


def report(error: NitroCliError) -> int:
    sys.stderr.write(error.render())
    return error.code
