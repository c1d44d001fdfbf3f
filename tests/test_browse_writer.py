import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mfr_sae.browse import CONTEXTS, HISTOGRAM_BINS
from mfr_sae.cli import main


def _tiny_runs(tiny_gpt2, tmp_path: Path) -> tuple[Path, Path, Path]:
    model_dir, corpus = tiny_gpt2
    cache = tmp_path / "cache"
    args = ["cache", "--model", str(model_dir), "--hook", "blocks.0.hook_mlp_out", "--text", str(corpus)]
    assert main([*args, "--out", str(cache), "--tokens", "3000", "--context", "16", "--no-progress"]) == 0
    base = [
        "data.kind=activations",
        f"data.path={cache}",
        "data.holdout=300",
        "sae.d_sae=48",
        "sae.n_members=3",
        "sae.k=4",
        "train.batch_size=100",
        "train.n_samples=6000",
        "train.lr=3e-3",
        "eval.n_samples=300",
        "eval.lm_sequences=0",
        "train.checkpoint_every=0",
    ]
    for name, extra in [("baseline", []), ("mfr", ["mfr.enabled=true"])]:
        sets = [a for o in base + extra for a in ("--set", o)]
        assert main(["train", "--out", str(tmp_path / name), "--no-progress", *sets]) == 0
    return cache, tmp_path / "mfr", tmp_path / "baseline"


@pytest.fixture(scope="module")
def site(tiny_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("browse")
    cache, run, baseline = _tiny_runs(tiny_gpt2, root)
    out = root / "site"
    assert main(["browse", str(run), "--out", str(out), "--baseline", str(baseline), "--no-progress"]) == 0
    return out, cache, run


def _script_data(path: Path) -> object:
    return json.loads(re.sub(r"^[^=]*= ", "", path.read_text()).rstrip().rstrip(";"))


def test_browse_writes_a_site_whose_contexts_are_the_caches_tokens(site, tiny_gpt2):
    from transformers import AutoTokenizer

    out, _, _ = site
    for name in ("index.html", "app.js", "style.css", "summary.png", "data/run.js", "data/member0.js"):
        assert (out / name).is_file(), name
    run = _script_data(out / "data/run.js")
    assert [m["k"] for m in run["members"]] == [4, 4, 4] and len(run["baseline"]["shared"]) == 3
    tokens = {int(i): t for i, t in _script_data(out / "data/tokens.js").items()}
    member = _script_data(out / "data/member0.js")
    details = _script_data(out / "data/latents/m0_0.js")
    busiest = int(np.argmax(member["frequency"]))
    contexts = details[busiest]["contexts"]
    assert 0 < len(contexts) <= CONTEXTS and member["frequency"][busiest] > 0
    values = [c["value"] for c in contexts]
    assert values == sorted(values, reverse=True)
    first = contexts[0]
    assert first["acts"][first["at"]] == pytest.approx(first["value"], rel=1e-3)  # the token it fired on
    assert sum(details[busiest]["histogram"]) > 0 and len(details[busiest]["histogram"]) == HISTOGRAM_BINS
    # the tokens shown are text of the corpus, decoded by the model's tokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2[0])
    text = "".join(tokens[t] for t in first["tokens"])
    assert text == tokenizer.decode(first["tokens"]) and text.strip()
    assert text.replace("<|endoftext|>", "\n").split()[0].strip(".") in tiny_gpt2[1].read_text()


def test_browse_refuses_a_run_not_trained_on_an_activation_cache(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--config",
                "configs/quick.yaml",
                "--set",
                "train.n_samples=2000",
                "--out",
                str(tmp_path / "r"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["browse", str(tmp_path / "r"), "--out", str(tmp_path / "site")]) == 2
    assert "activation cache" in capsys.readouterr().err


def _browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_the_site_works_in_a_real_browser(site, tmp_path):
    """Headless Chromium over the site opened from the file system: the index loads with no console error,
    sorting and the token filter change its rows, a latent page shows contexts and a histogram, the summary its
    figure, at a desktop's and a phone's width. .ci/run installs Chromium and asks for this test to run."""
    binary = _browser()
    if binary is None or not _has_playwright():
        if os.environ.get("MFR_SAE_BROWSER_TEST") == "required":
            pytest.fail("the browser test is required here, but Chromium or playwright is missing")
        pytest.skip("no Chromium or playwright here (.ci/run installs them)")
    from playwright.sync_api import sync_playwright

    out, _, _ = site
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=binary, args=["--allow-file-access-from-files"])
        for width, height in ((1280, 900), (390, 844)):
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((out / "index.html").as_uri())
            page.wait_for_selector("#latents tbody tr")
            first_rows = page.locator("#latents tbody tr").first.get_attribute("data-latent")
            page.click("th[data-key=latent]")  # by latent, descending
            assert page.locator("#latents tbody tr").first.get_attribute("data-latent") == "47"
            page.click("th[data-key=latent]")  # ascending
            assert page.locator("#latents tbody tr").first.get_attribute("data-latent") == "0"
            count = page.locator("#latents tbody tr").count()
            page.fill("#token-filter", "zzzz-no-such-token")
            page.dispatch_event("#token-filter", "change")
            assert page.locator("#latents tbody tr").count() == 0 < count
            page.fill("#token-filter", "")
            page.dispatch_event("#token-filter", "change")
            page.goto((out / "index.html").as_uri() + "#m0/l" + str(first_rows))
            page.wait_for_selector("#contexts .context")
            assert page.locator("#histogram svg rect").count() > 0
            assert page.locator("#matches li").count() == 2  # its best match in each other member
            page.screenshot(path=str(tmp_path / f"latent-{width}.png"), full_page=True)
            scroll = page.evaluate("document.documentElement.scrollWidth")
            assert scroll <= width + 1, "the page is wider than the screen"
            page.goto((out / "index.html").as_uri() + "#summary")
            page.wait_for_selector("#summary-table tbody tr")
            assert page.locator("img.figure").evaluate("img => img.complete && img.naturalWidth > 0")
            page.screenshot(path=str(tmp_path / f"summary-{width}.png"))
        browser.close()
    assert not errors, errors
    assert (tmp_path / "latent-1280.png").stat().st_size > 5000


def _has_playwright() -> bool:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return False
    return True
