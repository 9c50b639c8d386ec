"""Check what `python -m build` made, before anyone installs it (run by .ci/run):

    python scripts/check_dist.py dist/

The wheel holds the evtchn package and its metadata only (no stress/, bench/, tests/, no
generated C) and carries its type information and licence; the sdist holds sources only (no
compiled or generated files); both declare the version written in evtchn/_version.py.
Prints the metadata's header fields; exit 1 with a list of problems otherwise.
"""

from __future__ import annotations

import email.parser
import re
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_IN_WHEEL = ("evtchn/__init__.py", "evtchn/py.typed", "evtchn/_core.pyi")
REQUIRED_IN_SDIST = ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml", "setup.py")
REQUIRED_METADATA = {
    "License-Expression": "MIT",
    "Description-Content-Type": "text/markdown",
    "Requires-Python": ">=3.10",
}


def source_version() -> str:
    text = (ROOT / "evtchn" / "_version.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.M)
    assert match, "evtchn/_version.py has no __version__ line"
    return match.group(1)


def check_wheel(path: Path, version: str) -> list[str]:
    problems = []
    names = zipfile.ZipFile(path).namelist()
    info = f"evtchn-{version}.dist-info/"
    for name in names:
        if not (name.startswith("evtchn/") or name.startswith(info)):
            problems.append(f"wheel: {name} is outside evtchn/ and its metadata")
        if name.endswith((".c", ".cpp", ".o")):
            problems.append(f"wheel: generated or object file {name}")
    for name in REQUIRED_IN_WHEEL + (f"{info}licenses/LICENSE",):
        if name not in names:
            problems.append(f"wheel: {name} is missing")
    if not any(re.fullmatch(r"evtchn/_core\..*\.so", n) for n in names):
        problems.append("wheel: the compiled evtchn/_core extension is missing")
    metadata = zipfile.ZipFile(path).read(f"{info}METADATA").decode()
    return problems + check_metadata(metadata, version)


def check_metadata(text: str, version: str) -> list[str]:
    msg = email.parser.Parser().parsestr(text)
    problems = []
    if msg["Version"] != version:
        problems.append(f"metadata: Version {msg['Version']}, evtchn/_version.py {version}")
    for field, want in REQUIRED_METADATA.items():
        if msg[field] != want:
            problems.append(f"metadata: {field} is {msg[field]!r}, not {want!r}")
    classifiers = msg.get_all("Classifier") or []
    if not any(c.startswith("Programming Language :: Python :: 3.") for c in classifiers):
        problems.append("metadata: no Python version classifier")
    if "# evtchn" not in (msg.get_payload() or ""):
        problems.append("metadata: the README is not the long description")
    return problems


def check_sdist(path: Path, version: str) -> list[str]:
    problems = []
    top = f"evtchn-{version}/"
    names = [n.removeprefix(top) for n in tarfile.open(path).getnames()]
    for name in names:
        if name.endswith((".so", ".o", ".pyc")) or name in ("evtchn/_core.c",):
            problems.append(f"sdist: built file {name}")
        if name.startswith("build/"):
            problems.append(f"sdist: build directory entry {name}")
    for name in REQUIRED_IN_SDIST:
        if name not in names:
            problems.append(f"sdist: {name} is missing")
    return problems


def main(dist: Path) -> int:
    version = source_version()
    wheels = sorted(dist.glob(f"evtchn-{version}-*.whl"))
    sdists = sorted(dist.glob(f"evtchn-{version}.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        print(f"expected one wheel and one sdist of {version} in {dist}: {wheels} {sdists}")
        return 1
    problems = check_wheel(wheels[0], version) + check_sdist(sdists[0], version)
    metadata = zipfile.ZipFile(wheels[0]).read(f"evtchn-{version}.dist-info/METADATA").decode()
    print(metadata.split("\n\n", 1)[0])
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(f"{wheels[0].name}, {sdists[0].name}: {'OK' if not problems else 'FAILED'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "dist")))
