"""Screenshot a running TensorBoard's Time Series (scalars) page with headless Chromium.

Helper of scripts/tb_screenshot.sh, which starts and stops TensorBoard; run that script, not this one.
Selenium drives Debian's chromium through Debian's chromedriver (both paths given, so Selenium Manager
never downloads anything). The page counts as drawn when scalar cards are on screen, no spinner shows,
no data request is pending and that has held for a settle period. Collapsed tag groups are clicked open,
and without --height the viewport grows until the dashboard needs no scrolling.
The DOM names used (scalar-card, line-chart, button.group-toolbar) are TensorBoard 2.x's; if a
later version renames them this fails after --timeout with the page state in the message.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

# Settings TensorBoard reads from localStorage (backend names, see its settings converter):
# close the settings pane and the per-card step selector / data table, so charts get the space.
TB_SETTINGS = {"timeSeriesSettingsPaneOpened": False, "stepSelectorEnabled": False}

# Run before the page's own scripts: store the settings, and count the page's pending data requests.
ON_NEW_DOCUMENT_JS = """(() => {
  try { localStorage.setItem('_tb_global_settings', SETTINGS); } catch (e) {}
  window.__tbShotPending = 0;
  const send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.send = function (...args) {
    window.__tbShotPending++;
    this.addEventListener('loadend', () => window.__tbShotPending--);
    return send.apply(this, args);
  };
  const fetch = window.fetch;
  window.fetch = (...args) => {
    window.__tbShotPending++;
    return fetch(...args).finally(() => window.__tbShotPending--);
  };
})()""".replace("SETTINGS", json.dumps(json.dumps(TB_SETTINGS)))

# Polled in the page. TensorBoard expands only the first two tag groups: click the others open, once each.
# Then report how many scalar cards exist, are wholly in view, are loading; how many pixels the tallest
# scroll area hides.
POLL_JS = """
const done = (window.__tbShotExpanded = window.__tbShotExpanded || new Set());
let clicked = 0;
for (const b of document.querySelectorAll('button.group-toolbar')) {
  const title = (b.querySelector('.group-title') || {}).textContent;
  if (b.querySelector('mat-icon[svgicon="expand_more_24px"]') && !done.has(title)) {
    done.add(title);
    b.click();
    clicked++;
  }
}
return {
  clicked,
  ready: document.readyState,
  cards: document.querySelectorAll('scalar-card').length,
  charts: document.querySelectorAll('scalar-card line-chart').length,
  in_view: [...document.querySelectorAll('scalar-card')].filter(c => {
    const r = c.getBoundingClientRect();
    return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight;
  }).length,
  spinners: document.querySelectorAll('mat-spinner, mat-progress-spinner, mat-progress-bar').length,
  pending: window.__tbShotPending,
  overflow: Math.max(0, ...[document.scrollingElement, ...document.querySelectorAll('*')]
    .filter(e => e === document.scrollingElement || /auto|scroll/.test(getComputedStyle(e).overflowY))
    .map(e => e.scrollHeight - e.clientHeight)),
};
"""

MIN_HEIGHT, MAX_HEIGHT = 1000, 6000  # viewport height when --height is not given
BAD_FILTER = 3  # exit status when --tag-filter matches no tag (the wrapper then shows no logs)


def die(msg: str, status: int = 1) -> None:
    print(f"tb_screenshot: {msg}", file=sys.stderr)
    sys.exit(status)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for_scalars(base: str, tag_filter: str | None, timeout: float, tb_pid: int | None) -> int:
    """Wait until TensorBoard answers HTTP and has loaded scalar tags; return how many match (-1: unknown)."""
    deadline = time.monotonic() + timeout
    answered = False
    while True:
        try:
            with urllib.request.urlopen(base + "data/plugin/scalars/tags", timeout=5) as resp:
                runs = json.load(resp)
            answered = True
            tags = sorted({tag for run_tags in runs.values() for tag in run_tags})
            if tags:
                break
        except (urllib.error.URLError, OSError, ValueError):
            pass
        if tb_pid and not process_alive(tb_pid):
            die("TensorBoard exited before serving (see its log)")
        if time.monotonic() > deadline:
            die(f"TensorBoard at {base} {'has no scalar tags' if answered else 'did not answer'} after {timeout:.0f}s")
        time.sleep(0.5)
    if not tag_filter:
        return len(tags)
    try:  # TensorBoard filters with a case-insensitive JavaScript RegExp; Python's re is close enough.
        rx = re.compile(tag_filter, re.IGNORECASE)
    except re.error:
        return -1  # cannot check here; let the page decide
    if not any(rx.search(t) for t in tags):
        die(f"--tag-filter {tag_filter!r} matches none of the scalar tags: {', '.join(tags)}", BAD_FILTER)
    return sum(1 for t in tags if rx.search(t))


def wait_drawn(driver: webdriver.Chrome, timeout: float, settle: float, url: str) -> dict:
    """Poll the page until charts are on screen and nothing has changed for `settle` seconds."""
    seen: dict = {"state": {}, "key": None, "since": time.monotonic()}

    def drawn(_) -> dict | bool:
        state = seen["state"] = driver.execute_script(POLL_JS)
        if state != seen["key"]:
            seen.update(key=state, since=time.monotonic())
        loaded = state["ready"] == "complete" and state["charts"] > 0 and not state["spinners"] and not state["pending"]
        return loaded and time.monotonic() - seen["since"] >= settle and state

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(drawn)
    except TimeoutException:
        die(f"page not drawn after {timeout:.0f}s (state {seen['state']}): {url}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="TensorBoard root, e.g. http://127.0.0.1:6006/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag-filter")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, help=f"default: as tall as the charts need, {MIN_HEIGHT}-{MAX_HEIGHT}")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds for TensorBoard and for the page")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds the page must stay quiet")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    ap.add_argument("--chromedriver", default=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    ap.add_argument("--chromium-log", default=os.devnull, help="chromedriver's and Chromium's output")
    ap.add_argument("--tensorboard-pid", type=int, help="give up early if this process exits")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so that Chromium is closed

    base = args.base_url.rstrip("/") + "/"
    n_tags = wait_for_scalars(base, args.tag_filter, args.timeout, args.tensorboard_pid)
    query = {"darkMode": "false"}
    if args.tag_filter:
        query["tagFilter"] = args.tag_filter
    url = f"{base}?{urllib.parse.urlencode(query)}#timeseries"

    width, height = args.width, args.height or MIN_HEIGHT
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}"):
        options.add_argument(arg)
    with tempfile.TemporaryDirectory(prefix="tb_screenshot_chromium.") as home, open(args.chromium_log, "w") as log:
        # Chromium's crash database goes to $XDG_CONFIG_HOME/chromium even with its own --user-data-dir.
        env = {**os.environ, "XDG_CONFIG_HOME": home, "XDG_CACHE_HOME": home}
        # Own session: Ctrl-C reaches only us, and driver.quit() then closes Chromium.
        service = Service(args.chromedriver, log_output=log, env=env, popen_kw={"start_new_session": True})
        driver = webdriver.Chrome(options=options, service=service)
        try:
            metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ON_NEW_DOCUMENT_JS})
            driver.get(url)
            state = wait_drawn(driver, args.timeout, args.settle, url)
            # No --height: grow the viewport until the dashboard's scroll area needs no scrolling
            # (a taller viewport draws the cards that were below the fold, which may add height again).
            for _ in range(3):
                if args.height or not state["overflow"] or height >= MAX_HEIGHT:
                    break
                metrics["height"] = height = min(height + state["overflow"], MAX_HEIGHT)
                driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
                state = wait_drawn(driver, args.timeout, args.settle, url)
            driver.save_screenshot(args.out)
        finally:
            driver.quit()

    shown = state["in_view"]
    total = n_tags if n_tags >= 0 else state["cards"]
    note = f"; {total - shown} cut off or below the fold (raise --height or use --tag-filter)" if total > shown else ""
    print(
        f"tb_screenshot: {args.out}: {shown} of {total} scalar charts in view ({width}x{height}){note}", file=sys.stderr
    )


if __name__ == "__main__":
    try:
        main()
    except WebDriverException as e:  # its message, without chromedriver's native stack trace
        die(f"{type(e).__name__}: {e.msg}")
