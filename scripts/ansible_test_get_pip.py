"""Stand-in for the get-pip.py that ansible-test downloads to bootstrap its sanity virtualenvs.

ansible-test fetches get-pip from a host this machine cannot reach and, when the download fails,
says to save the script at ~/.ansible/test/cache/get_pip_<version>.py: scripts/sanity.sh puts this
file there. Like get-pip it installs the requested pip into the running (empty) venv, here from the
interpreter's bundled pip (ensurepip) and then the package index pip is configured with.
"""

from __future__ import annotations

import subprocess
import sys

# get-pip's own flags; pip would reject them.
GET_PIP_ONLY = {"--no-setuptools", "--no-wheel"}


def main() -> None:
    subprocess.run([sys.executable, "-m", "ensurepip", "--default-pip"], check=True, stdout=subprocess.DEVNULL)
    args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *args], check=True)


if __name__ == "__main__":
    main()
