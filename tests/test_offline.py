from mfr_sae.offline import wiki_to_text

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
