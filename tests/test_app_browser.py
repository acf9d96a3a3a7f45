"""The explorer end to end in a real headless browser: Debian's Chromium, driven by Selenium through Debian's
ChromeDriver (`make browser` installs both; `make test` runs it first). The app runs as `zoo-app` on localhost with a
small CA-Stream checkpoint; the test uploads a photograph, types a box, ticks two methods, waits,
and checks that the overlays, the scores and the curves appear; a file that is not an image gets a message. A
screenshot goes to results/app/."""

import shutil
from pathlib import Path

import pytest
from app_fixtures import CLASSES, served_app
from matplotlib import cbook

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="no Chromium and ChromeDriver on this machine: "
                       "`make browser` installs Debian's chromium and chromium-driver"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs the [test] extra's selenium")
pytest.importorskip("gradio", reason="the app needs the [app] extra: pip install -e '.[app]'")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# as the project's machines run Chromium: headless, no sandbox as root, and none of its calls home
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,2400"]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with served_app(tmp_path_factory.mktemp("app")) as (url, _):
        yield url


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def text(driver, selector: str) -> str:
    return " ".join(element.text for element in driver.find_elements(By.CSS_SELECTOR, selector))


def images(driver, selector: str) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, f"{selector} img"))


def open_page(driver, url: str) -> WebDriverWait:
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: "resnet18_castream" in text(d, "#description"))  # the model loaded with the page
    return wait


def test_upload_tick_two_methods_and_see_maps_scores_and_curves(app_url, browser):
    wait = open_page(browser, app_url)
    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    assert images(browser, "#image") == 1  # the first screen shows an example, ready to explain
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(photo)
    wait.until(lambda d: "grace_hopper" in d.find_element(By.CSS_SELECTOR, "#image img").get_attribute("src"))
    box = browser.find_element(By.CSS_SELECTOR, "#box textarea")
    box.clear()
    box.send_keys("150, 60, 380, 420")
    wanted = {"gradcam", "scorecam"}
    for choice in browser.find_elements(By.CSS_SELECTOR, "#methods label"):
        if (choice.text.strip() in wanted) != choice.find_element(By.TAG_NAME, "input").is_selected():
            choice.click()
    ticked = {c.text.strip() for c in browser.find_elements(By.CSS_SELECTOR, "#methods label")
              if c.find_element(By.TAG_NAME, "input").is_selected()}
    assert ticked == wanted
    browser.find_element(By.CSS_SELECTOR, "#explain").click()
    WebDriverWait(browser, 240).until(lambda d: "scorecam" in text(d, "#scores") and images(d, "#curves") >= 1)
    assert any(name in text(browser, "#top5") for name in CLASSES)
    assert images(browser, "#builtin") == 5  # every stage's attention
    assert images(browser, "#maps") == 3  # the built-in map, Grad-CAM, Score-CAM
    scores = text(browser, "#scores")
    for expected in ("built-in saliency", "gradcam", "scorecam", "AD", "AG", "AI", "I", "D", "SP", "EP"):
        assert expected in scores
    assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body.error")
    out = ROOT / "results" / "app"
    out.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 200)  # the whole page in the screenshot
    assert browser.save_screenshot(str(out / "browser_test.png"))


def test_a_file_that_is_not_an_image_is_refused_with_a_message(app_url, browser, tmp_path):
    wait = open_page(browser, app_url)
    (tmp_path / "notes.png").write_text("these are notes, not pixels")
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(tmp_path / "notes.png"))
    wait.until(lambda d: "notes.png is not an image" in text(d, ".toast-body"))
    browser.find_element(By.CSS_SELECTOR, "#explain").click()
    wait.until(lambda d: "upload an image" in text(d, ".toast-body"))
    assert "Traceback" not in browser.page_source
