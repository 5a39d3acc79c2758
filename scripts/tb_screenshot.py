"""Screenshot a running TensorBoard's Time Series (scalars) page with headless Chromium.

Helper of scripts/tb_screenshot.sh, which starts and stops TensorBoard; run that script, not this one.
Only the standard library is used: Chromium is driven over the DevTools protocol on a pipe
(--remote-debugging-pipe: commands on fd 3, replies on fd 4, NUL-separated JSON), because a plain
`chromium --headless --screenshot` cannot close TensorBoard's settings pane (a localStorage setting)
and can only guess, with a fixed virtual-time budget, when the charts have been drawn.
Here the page counts as drawn when scalar cards are on screen, no spinner shows, no data request
is pending and that has held for a settle period. Collapsed tag groups are clicked open, and
without --height the viewport grows until the dashboard needs no scrolling.
The DOM names used (scalar-card, line-chart, button.group-toolbar) are TensorBoard 2.x's; if a
later version renames them this fails after --timeout with the page state in the message.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

# Settings TensorBoard reads from localStorage (backend names, see its settings converter):
# close the settings pane and the per-card step selector / data table, so charts get the space.
TB_SETTINGS = {"timeSeriesSettingsPaneOpened": False, "stepSelectorEnabled": False}

# Polled in the page: how many scalar cards exist, are wholly in view, are loading; how many pixels
# the tallest scroll area hides.
PAGE_STATE_JS = """JSON.stringify({
  ready: document.readyState,
  cards: document.querySelectorAll('scalar-card').length,
  charts: document.querySelectorAll('scalar-card line-chart').length,
  in_view: [...document.querySelectorAll('scalar-card')].filter(c => {
    const r = c.getBoundingClientRect();
    return r.height > 0 && r.top >= 0 && r.bottom <= innerHeight;
  }).length,
  spinners: document.querySelectorAll('mat-spinner, mat-progress-spinner, mat-progress-bar').length,
  overflow: Math.max(0, ...[document.scrollingElement, ...document.querySelectorAll('*')]
    .filter(e => e === document.scrollingElement || /auto|scroll/.test(getComputedStyle(e).overflowY))
    .map(e => e.scrollHeight - e.clientHeight)),
})"""

MIN_HEIGHT, MAX_HEIGHT = 1000, 6000  # viewport height when --height is not given

# TensorBoard expands only the first two tag groups (losses/, time/, ...); click the others open, once each.
EXPAND_GROUPS_JS = """(() => {
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
  return clicked;
})()"""


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
    url = base + "data/plugin/scalars/tags"
    answered = False
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
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
    matching = [t for t in tags if rx.search(t)]
    if not matching:
        die(f"--tag-filter {tag_filter!r} matches none of the scalar tags: {', '.join(tags)}", BAD_FILTER)
    return len(matching)


class Chromium:
    """A headless Chromium driven over --remote-debugging-pipe."""

    def __init__(self, binary: str, width: int, height: int, log_path: str):
        self.profile = tempfile.mkdtemp(prefix="tb_screenshot_chromium.")
        cmd_r, cmd_w = os.pipe()  # we write commands, Chromium reads them on fd 3
        res_r, res_w = os.pipe()  # Chromium writes replies on fd 4, we read them
        argv = [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--disable-breakpad",
            "--no-default-browser-check",
            "--mute-audio",
            "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]

        def in_child() -> None:
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in close())
        # Own session: Ctrl-C reaches us, and close() then takes down Chromium's whole process group.
        self.proc = subprocess.Popen(
            argv,
            pass_fds=(3, 4),
            preexec_fn=in_child,
            start_new_session=True,
            # Chromium's crash database goes to $XDG_CONFIG_HOME/chromium even with a --user-data-dir.
            env={**os.environ, "XDG_CONFIG_HOME": self.profile, "XDG_CACHE_HOME": self.profile},
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )
        os.close(cmd_r)
        os.close(res_w)
        self.w, self.r = cmd_w, res_r
        self.buf = b""
        self.next_id = 0
        self.inflight: dict[str, str] = {}  # data requests of the page not finished yet: id -> URL
        self.session: str | None = None

    def _handle_event(self, msg: dict) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        # Only the data requests count: worker scripts never report their end on the page's session.
        if method == "Network.requestWillBeSent" and params.get("type") in ("XHR", "Fetch"):
            self.inflight[params["requestId"]] = params["request"]["url"]
        elif method in ("Network.loadingFinished", "Network.loadingFailed"):
            self.inflight.pop(params["requestId"], None)

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self.next_id += 1
        mid = self.next_id
        msg: dict = {"id": mid, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == mid:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                    return reply.get("result", {})
                self._handle_event(reply)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {method} in {timeout:.0f}s")
            if select.select([self.r], [], [], left)[0]:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium exited (see its log)")
                self.buf += chunk

    def open_page(self, width: int, height: int) -> None:
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next((t for t in targets if t["type"] == "page"), None)
        target_id = page["targetId"] if page else self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Network.enable")
        self.set_viewport(width, height)

    def set_viewport(self, width: int, height: int) -> None:
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", metrics)

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})["result"].get("value")

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.send("Browser.close", timeout=5)
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        finally:
            for fd in (self.w, self.r):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)


def wait_drawn(browser: Chromium, timeout: float, settle: float, url: str) -> dict:
    """Poll the page until charts are on screen and nothing has changed for `settle` seconds."""
    deadline = time.monotonic() + timeout
    last, quiet_since = None, time.monotonic()
    while True:
        time.sleep(0.25)
        clicked = browser.evaluate(EXPAND_GROUPS_JS)
        state = json.loads(browser.evaluate(PAGE_STATE_JS) or "{}")
        key = (clicked, *(state.get(k) for k in ("ready", "cards", "charts", "in_view", "spinners", "overflow")))
        key += (len(browser.inflight),)
        if key != last:
            last, quiet_since = key, time.monotonic()
        loaded = (
            state.get("ready") == "complete"
            and state.get("charts", 0) > 0
            and state.get("spinners", 1) == 0
            and not browser.inflight
        )
        if loaded and time.monotonic() - quiet_since >= settle:
            return state
        if time.monotonic() > deadline:
            die(
                f"page not drawn after {timeout:.0f}s (state {state}, "
                f"requests pending: {sorted(browser.inflight.values())}): {url}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True, help="TensorBoard root, e.g. http://127.0.0.1:6006/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag-filter")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, help=f"default: as tall as the charts need, {MIN_HEIGHT}-{MAX_HEIGHT}")
    ap.add_argument("--timeout", type=float, default=90.0, help="seconds for TensorBoard and for the page")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds the page must stay quiet")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "chromium"))
    ap.add_argument("--chromium-log", default=os.devnull)
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
    browser = Chromium(args.chromium, width, height, args.chromium_log)
    try:
        browser.open_page(width, height)
        settings = json.dumps(json.dumps(TB_SETTINGS))
        browser.send(
            "Page.addScriptToEvaluateOnNewDocument",
            {"source": f"try {{ localStorage.setItem('_tb_global_settings', {settings}); }} catch (e) {{}}"},
        )
        browser.send("Page.navigate", {"url": url})
        state = wait_drawn(browser, args.timeout, args.settle, url)
        # No --height: grow the viewport until the dashboard's scroll area needs no scrolling
        # (a taller viewport draws the cards that were below the fold, which may add height again).
        for _ in range(3):
            if args.height or not state.get("overflow") or height >= MAX_HEIGHT:
                break
            height = min(height + state["overflow"], MAX_HEIGHT)
            browser.set_viewport(width, height)
            state = wait_drawn(browser, args.timeout, args.settle, url)

        png = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
        with open(args.out, "wb") as f:
            f.write(png)
    finally:
        browser.close()

    shown = state.get("in_view", 0)
    total = n_tags if n_tags >= 0 else state.get("cards", 0)
    note = f"; {total - shown} cut off or below the fold (raise --height or use --tag-filter)" if total > shown else ""
    print(
        f"tb_screenshot: {args.out}: {shown} of {total} scalar charts in view ({width}x{height}){note}", file=sys.stderr
    )


if __name__ == "__main__":
    main()
