"""The studio's pages in a real browser (the system's chromium, headless, driven by Playwright as in
test_webui_browser.py): a tiny run started from the Train page, its loss plot growing while it trains, the run under
Runs, its model in the Chat tab's list."""

from __future__ import annotations

import pytest

from llava_kit.serve.server import ServerSettings, start_server
from llava_kit.studio import Studio
from llava_kit.studio.api import studio_router
from llava_kit.studio.models import serve_fine_tuned_models
from llava_kit.studio.settings import StudioSettings
from scripts import screenshots as driver

STEPS = 12


@pytest.fixture(scope="module")
def studio_page(chromium_path, tmp_path_factory):
    from llava_kit.webui import mount_webui

    studio = Studio(tmp_path_factory.mktemp("studio")).start(poll_s=0.1)
    settings = ServerSettings(max_new_tokens=8)

    def setup(app) -> None:
        serve_fine_tuned_models(studio, app.state.workers, settings)
        mount_webui(app, studio)

    server = start_server({}, settings, port=0, routers=[studio_router(studio, StudioSettings())], setup=setup)
    yield studio, server.url.removesuffix("/v1") + "/"
    server.shutdown()
    studio.close(cancel_running=True)


def test_the_train_page_previews_its_data_and_refuses_a_run_that_cannot_train(browser, studio_page):
    studio, url = studio_page
    page = driver.open_page(browser, url, height=1000)
    assert "none yet" in page.inner_text("body")  # no model before the first run
    for tab in ("Train", "Runs", "Compare"):
        assert page.get_by_role("tab", name=tab).count() == 1
    page.get_by_role("tab", name="Train").click()
    page.click("#train-preview")  # the recipe's data: a preview and the data check's summary
    page.wait_for_function("document.querySelector('#train-data-summary').innerText.includes('can be trained')")
    assert "48 of 48 records can be trained on (conversations; formats: llava 48; 48 with images)" in \
        page.inner_text("#train-data-summary")
    assert "pretrain.json[0] · images: train/000000.png\n\nuser: <image>\n" in page.inner_text("#train-data-preview")

    page.fill("#train-max-steps input", "0")
    page.fill("#train-epochs input", "0")
    page.click("#train-start")
    page.wait_for_function("document.querySelector('#train-status').innerText.includes('Not started')")
    assert "set `train.max_steps` > 0 or `train.num_epochs` > 0" in page.inner_text("#train-status")
    assert studio.store.jobs() == []  # refused on the page: nothing was queued
    page.close()


@pytest.mark.slow
def test_a_run_started_from_the_train_page_plots_its_loss_and_appears_under_runs(browser, studio_page, tmp_path):
    studio, url = studio_page
    page = driver.open_page(browser, url, height=1000)
    job_id = driver.start_training(page, max_steps=STEPS)
    counts = driver.follow_plot(page, "train-loss", "train-status")
    status = page.inner_text("#train-status")
    assert f"{job_id} (tiny-pretrain): succeeded · step {STEPS}/{STEPS}" in status
    assert counts[-1] == STEPS  # a point per logged step...
    assert len([c for c in counts if 0 < c < STEPS]) >= 1, counts  # ...drawn while the run trained, not only at its end
    assert counts == sorted(counts)
    page.screenshot(path=str(tmp_path / "studio-train.png"), full_page=True)

    page.get_by_role("tab", name="Runs").click()
    page.wait_for_function(f"document.querySelector('#runs-table').innerText.includes('{job_id}')")
    row = next(line for line in page.inner_text("#runs-table").split(job_id)[1:2])
    assert "succeeded" in row and f"{STEPS}/{STEPS}" in row
    page.fill("#runs-job input", job_id)
    page.press("#runs-job input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('#runs-loss .mark-symbol path').length === {STEPS}")
    assert "ft:tiny-pretrain:" + job_id in page.inner_text("#runs-details")

    page.get_by_role("tab", name="Chat").click()  # the run's model joins the models' list
    page.wait_for_function(f"document.body.innerText.includes('ft:tiny-pretrain:{job_id} (images and text)')")
    page.close()
