import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mfr_sae.browse import (
    AFTER,
    BEFORE,
    CONTEXTS,
    HISTOGRAM_BINS,
    best_matches,
    collect,
    token_position,
    window_activations,
)
from mfr_sae.cli import main
from mfr_sae.data.vectors import VectorsData
from mfr_sae.ensemble import Ensemble
from mfr_sae.metrics import max_cosine


@pytest.fixture
def rows_and_ensemble(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(700, 16)
    np.save(tmp_path / "rows.npy", x.numpy())
    ensemble = Ensemble(16, 40, [3, 5]).eval()
    return VectorsData(tmp_path / "rows.npy", holdout=1), ensemble, x


def test_one_pass_keeps_each_latents_top_activations_and_counts_as_a_dense_pass(rows_and_ensemble):
    cache, ensemble, x = rows_and_ensemble
    stats = collect(ensemble, cache, len(x), contexts=6, batch_rows=37, progress=False)  # 19 batches merged
    with torch.no_grad():
        dense = ensemble.dense_codes(x).transpose(1, 2).flatten(0, 1)  # [N h, rows]: (member, latent) by row
    assert torch.equal(stats.fired.flatten(), (dense > 0).sum(1).float())
    torch.testing.assert_close(stats.total.flatten(), dense.sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.largest.flatten(), dense.max(1).values.clamp_min(0))
    assert torch.equal(stats.histogram.sum(-1).flatten(), stats.fired.flatten())
    want = dense.topk(6, dim=1)
    fired = want.values > 0
    assert torch.equal(stats.top.values[fired], want.values[fired])
    assert torch.equal(stats.top.indices[fired], want.indices[fired])  # the rows they fire on
    assert (stats.top.values[~fired] <= 0).all()  # a latent firing fewer times keeps empty slots


def test_the_windows_hold_each_contexts_latent_on_the_tokens_around_it(rows_and_ensemble):
    cache, ensemble, x = rows_and_ensemble
    stats = collect(ensemble, cache, len(x), contexts=4, progress=False)
    context = 50  # sequences of 49 rows
    windows = window_activations(ensemble, cache, stats, context, chunk_rows=64)
    with torch.no_grad():
        dense = ensemble.dense_codes(x).transpose(1, 2).flatten(0, 1)  # [N h, rows]
    for owner in (0, 7, 45, 79):
        for slot, (value, row) in enumerate(zip(stats.top.values[owner], stats.top.indices[owner])):
            if value <= 0:
                assert not windows[owner, slot].any()
                continue
            sequence, position = (int(t) for t in token_position(row, context))
            for offset in range(-BEFORE, 5):
                inside = 1 <= position + offset <= context - 1 and int(row) + offset < len(x)
                want = dense[owner, int(row) + offset] if inside else 0.0
                assert windows[owner, slot, offset + BEFORE] == pytest.approx(float(want), abs=1e-6)
            assert windows[owner, slot, BEFORE] == pytest.approx(float(value), rel=1e-5)  # the token it fired on


def test_best_matches_are_each_latents_best_cosine_in_every_other_member():
    torch.manual_seed(1)
    decoder = torch.nn.functional.normalize(torch.randn(3, 50, 8), dim=-1)
    cosine, match = best_matches(decoder)
    for a in range(3):
        assert (cosine[a, a] == 1).all() and torch.equal(match[a, a], torch.arange(50))
        for b in set(range(3)) - {a}:
            want, want_match = max_cosine(decoder[a], decoder[b])
            torch.testing.assert_close(cosine[a, b], want)
            assert torch.equal(match[a, b], want_match)


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


def test_the_windows_of_jumprelu_members_equal_their_dense_codes_whatever_the_threshold(tmp_path):
    # saved BatchTopK members are JumpReLU: with a low or unset threshold a row's smallest kept activation is near
    # 0, so that a recomputed window value within rounding of it must still count as kept
    torch.manual_seed(0)
    x = torch.randn(1500, 256) * 3 + 1.0
    np.save(tmp_path / "rows.npy", x.numpy())
    cache = VectorsData(tmp_path / "rows.npy", holdout=1)
    ensemble = Ensemble(256, 128, [3, 8, 20], architecture="batchtopk")
    with torch.no_grad():
        for param in ensemble.parameters():
            param.add_(0.05 * torch.randn_like(param))
        ensemble.threshold.copy_(torch.tensor([0.5, 2.0, -1.0]))  # the last: unset, a plain ReLU
    ensemble.eval()
    stats = collect(ensemble, cache, len(x), contexts=4, progress=False)
    context = 50
    windows = window_activations(ensemble, cache, stats, context, chunk_rows=300)
    with torch.no_grad():
        dense = ensemble.dense_codes(x).transpose(1, 2).flatten(0, 1)  # [N h, rows]
    offsets = torch.arange(-BEFORE, AFTER + 1)
    rows = stats.top.indices.unsqueeze(-1) + offsets
    shown = token_position(stats.top.indices, context)[1].unsqueeze(-1) + offsets
    inside = (shown >= 1) & (shown <= context - 1) & (rows < len(x)) & (stats.top.values > 0).unsqueeze(-1)
    owner = torch.arange(len(rows)).view(-1, 1, 1).expand_as(rows)
    want = torch.zeros_like(windows)
    want[inside] = dense[owner[inside], rows[inside]]
    assert inside.sum() > 20_000
    assert torch.equal(windows > 0, want > 0)  # kept exactly where the encoder keeps
    torch.testing.assert_close(windows, want, rtol=1e-4, atol=1e-4)
