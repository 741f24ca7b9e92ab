"""Save a PNG screenshot of an MLflow experiment page, with nested runs expanded.

    python scripts/mlflow_screenshot.py --url http://127.0.0.1:5000 \
        --experiment quickstart --output mlflow_experiment.png

The script reads a running MLflow tracking server at --url and starts nothing
else, unless --backend-store-uri is given: then it starts `mlflow server` on
127.0.0.1 at a free port for the duration of the screenshot and stops it.

Headless Chromium renders the page (Debian package `chromium`:
`apt-get install -y chromium`). The script drives it through the Chrome
DevTools Protocol over a pipe, so Chromium opens no debugging port. It waits
until the experiment's runs appear in the runs table, clicks every run's
expander so that child runs show under their parent, then captures the page.
It prints one JSON line: the screenshot path and which runs the page shows.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger("mlflow_screenshot")

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
# The runs table marks each parent run's expander button with this component id
# (MLflow 3.17 UI, runNameCellRenderer.tsx).
EXPANDER_SELECTOR = '[data-component-id$="runnamecellrenderer.tsx_46"]'
# The MLflow Assistant side panel opens on first load and covers a third of the page.
ASSISTANT_CLOSE_SELECTOR = '[data-component-id="mlflow.assistant.chat_panel.close"]'
# Text of the runs table only: run names can also appear in the page header,
# for example when a run is named after its experiment.
GRID_TEXT_JS = "(document.querySelector('.ag-root-wrapper')?.innerText || '')"
RUN_NAME_COLUMN = "attributes.`Run Name`"
# Column widths in CSS pixels, wide enough for names such as
# blocks.12.hook_resid_pre/standard/x16/l1_coefficient=5.0 and heldout_explained_variance.
RUN_NAME_WIDTH = 430
METRIC_WIDTH = 180
# Metrics shown as columns when the runs have them: the sweep's held-out and last training values.
DEFAULT_METRICS = ("heldout_explained_variance", "heldout_l0", "explained_variance", "l0")
# Chromium reads DevTools commands from descriptor 3 and writes replies to 4.
PIPE_IN_FD, PIPE_OUT_FD = 3, 4


class ScreenshotError(RuntimeError):
    """The page could not be rendered or captured."""


def find_chromium(explicit: str | None = None) -> str | None:
    """Return the Chromium executable: `explicit`, $CHROMIUM, or the first of CHROMIUM_NAMES on PATH."""
    for candidate in (explicit, os.environ.get("CHROMIUM"), *CHROMIUM_NAMES):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rest_get(base_url: str, endpoint: str, params: dict[str, Any]) -> dict[str, Any]:
    """GET `endpoint` of the MLflow REST API and return the decoded JSON."""
    url = f"{base_url.rstrip('/')}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def rest_post(base_url: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST `body` to `endpoint` of the MLflow REST API and return the decoded JSON."""
    url = f"{base_url.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def wait_for_server(base_url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Poll the server's /health endpoint until it returns 200, or raise ScreenshotError on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ScreenshotError(f"mlflow server exited with code {process.returncode} before it responded to /health")
        try:
            with urllib.request.urlopen(f"{base_url.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise ScreenshotError(f"timed out: no MLflow server responded at {base_url} within {timeout_s:.0f} s")


def start_mlflow_server(backend_store_uri: str, artifacts_destination: str | None, port: int, log_path: Path) -> subprocess.Popen:
    """Start `mlflow server` on 127.0.0.1:`port` in its own process group, with its output in `log_path`."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--workers",
        "1",
    ]
    if artifacts_destination:
        command += ["--artifacts-destination", artifacts_destination]
    # The server sends no usage telemetry: it may run where nothing outside is reachable.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def stop_process_group(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """Stop `process` and the children in its group: SIGTERM, then SIGKILL after `timeout_s`."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class DevToolsPipe:
    """A Chrome DevTools Protocol client over Chromium's --remote-debugging-pipe.

    Messages are JSON objects, each terminated by a NUL byte.
    """

    def __init__(self, chromium: str, width: int, height: int, profile_dir: Path):
        to_chrome_read, self._write_fd = os.pipe()
        self._read_fd, from_chrome_write = os.pipe()

        def attach_pipes() -> None:
            # Copy both ends above the target numbers first, so that moving one
            # end onto 3 or 4 cannot overwrite the other.
            high_in = fcntl.fcntl(to_chrome_read, fcntl.F_DUPFD, 10)
            high_out = fcntl.fcntl(from_chrome_write, fcntl.F_DUPFD, 10)
            os.dup2(high_in, PIPE_IN_FD)
            os.dup2(high_out, PIPE_OUT_FD)

        command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"]
        self.process = subprocess.Popen(
            command,
            # subprocess closes every descriptor not listed here after preexec_fn runs.
            pass_fds=(PIPE_IN_FD, PIPE_OUT_FD),
            preexec_fn=attach_pipes,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(to_chrome_read)
        os.close(from_chrome_write)
        self._buffer = b""
        self._next_id = 0

    def call(self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None, timeout_s: float = 60) -> dict[str, Any]:
        """Send one command and return its result. Events that arrive meanwhile are dropped."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        os.write(self._write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") != self._next_id:
                continue
            if "error" in reply:
                raise ScreenshotError(f"DevTools {method} failed: {reply['error']}")
            return reply.get("result", {})

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScreenshotError("timed out waiting for a DevTools reply from Chromium")
            ready, _, _ = select.select([self._read_fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._read_fd, 1 << 20)
            if not chunk:
                raise ScreenshotError(f"Chromium closed the DevTools pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.call("Browser.close", timeout_s=10)
                self.process.wait(timeout=10)
        except (ScreenshotError, OSError, subprocess.TimeoutExpired):
            pass
        finally:
            # Chromium's helper processes (zygote, renderers) share its process
            # group and may outlive the browser process for a moment.
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
            os.close(self._write_fd)
            os.close(self._read_fd)


def evaluate(devtools: DevToolsPipe, session: str, expression: str) -> Any:
    """Evaluate a JavaScript expression in the page and return its value."""
    result = devtools.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    if "exceptionDetails" in result:
        raise ScreenshotError(f"page script failed: {result['exceptionDetails'].get('text')}")
    return result.get("result", {}).get("value")


def _wait_until(devtools: DevToolsPipe, session: str, expression: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if evaluate(devtools, session, expression):
            return True
        time.sleep(0.5)
    return False


def _count_visible(devtools: DevToolsPipe, session: str, names: list[str]) -> int:
    return int(evaluate(devtools, session, f"{json.dumps(names)}.filter(name => {GRID_TEXT_JS}.includes(name)).length"))


def _expand_nested_runs(devtools: DevToolsPipe, session: str, timeout_s: float) -> int:
    """Click each collapsed run expander until none is left, and return the number of clicks."""
    clicks = 0
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        # Each row is clicked once, keyed by its run id, because a second click would collapse it again.
        clicked = evaluate(
            devtools,
            session,
            f"""(() => {{
                const seen = new Set({json.dumps(sorted(seen))});
                const done = [];
                for (const button of document.querySelectorAll('{EXPANDER_SELECTOR}')) {{
                    const row = button.closest('[row-id]');
                    const key = row ? row.getAttribute('row-id') : button.outerHTML;
                    if (seen.has(key)) continue;
                    button.click();
                    done.push(key);
                }}
                return done;
            }})()""",
        )
        if not clicked:
            return clicks
        seen.update(clicked)
        clicks += len(clicked)
        time.sleep(1.0)
    return clicks


def _wait_for_table(devtools: DevToolsPipe, session: str, names: list[str], nested: bool, timeout_s: float) -> None:
    """Wait until the runs table shows a run name and, for nested runs, an expander."""
    names_js = json.dumps(names)
    if not _wait_until(devtools, session, f"{names_js}.some(name => {GRID_TEXT_JS}.includes(name))", timeout_s):
        logger.warning("no run name appeared in the runs table within %.0f s", timeout_s)
    if nested and not _wait_until(devtools, session, f"document.querySelector('{EXPANDER_SELECTOR}') !== null", 20):
        logger.warning("the experiment has nested runs but the page shows no run expander")


def _apply_view_state(
    devtools: DevToolsPipe, session: str, experiment_id: str, parent_ids: list[str], metrics: list[str]
) -> bool:
    """Store a runs-table view with nested runs expanded, `metrics` as columns and a wide run name column.

    The MLflow UI keeps this view per experiment in the browser's localStorage
    (key `MLflowLocalStorage-1.1-ExperimentPage-["<id>"]-ReactComponentState`
    in MLflow 3.17) and reads it when the page loads. Returns False when the
    page has no such key, as other UI versions may not.
    """
    metric_columns = [f"metrics.`{name}`" for name in metrics]
    script = f"""(() => {{
        const suffix = '-ExperimentPage-[' + JSON.stringify({json.dumps(experiment_id)}) + ']-ReactComponentState';
        const key = Object.keys(localStorage).find(k => k.endsWith(suffix));
        if (!key) return false;
        const state = JSON.parse(localStorage.getItem(key));
        const metricColumns = {json.dumps(metric_columns)};
        const header = [...document.querySelectorAll('.ag-header-cell')].map(h => h.getAttribute('col-id')).filter(Boolean);
        state.selectedColumns = metricColumns;
        // Keep the run name and the built-in columns, drop attribute columns (dataset, source, models).
        const builtInColumns = header.filter(id => !id.startsWith('attributes.`') || id === {json.dumps(RUN_NAME_COLUMN)});
        state.columnOrder = [...new Set([...builtInColumns, ...metricColumns])];
        state.columnWidths = {{...(state.columnWidths || {{}}), {json.dumps(RUN_NAME_COLUMN)}: {RUN_NAME_WIDTH}}};
        for (const column of metricColumns) state.columnWidths[column] = {METRIC_WIDTH};
        state.runsExpanded = {{...(state.runsExpanded || {{}}), ...Object.fromEntries({json.dumps(parent_ids)}.map(id => [id, true]))}};
        localStorage.setItem(key, JSON.stringify(state));
        return true;
    }})()"""
    return bool(evaluate(devtools, session, script))


def capture(
    base_url: str,
    experiment: str,
    output: Path,
    *,
    chromium: str,
    width: int = 1800,
    height: int = 1000,
    timeout_s: float = 90,
    metrics: tuple[str, ...] = DEFAULT_METRICS,
) -> dict[str, Any]:
    """Render the runs page of `experiment` at `base_url`, expand nested runs, save a PNG.

    Of `metrics`, those that some run has become table columns. Returns
    {"screenshot", "url", "experiment_id", "runs", "visible_runs", "metric_columns", "clicks"}:
    `runs` are the run names the REST API lists, `visible_runs` those that the
    rendered runs table shows, and `clicks` the expanders clicked because the
    stored view did not expand every parent.
    """
    found = rest_get(base_url, "experiments/get-by-name", {"experiment_name": experiment})
    experiment_id = found["experiment"]["experiment_id"]
    runs = rest_post(base_url, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])
    names = sorted({run["info"].get("run_name", "") for run in runs} - {""})
    parent_ids = sorted(
        {tag["value"] for run in runs for tag in run["data"].get("tags", []) if tag["key"] == "mlflow.parentRunId"}
    )
    logged = {metric["key"] for run in runs for metric in run["data"].get("metrics", [])}
    shown_metrics = [name for name in metrics if name in logged]
    page_url = f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs"
    names_js = json.dumps(names)

    with tempfile.TemporaryDirectory(prefix="mlflow-screenshot-", ignore_cleanup_errors=True) as profile:
        devtools = DevToolsPipe(chromium, width, height, Path(profile))
        try:
            target = devtools.call("Target.createTarget", {"url": "about:blank"})
            session = devtools.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})["sessionId"]
            devtools.call("Page.enable", session_id=session)
            devtools.call(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
                session,
            )
            devtools.call("Page.navigate", {"url": page_url}, session)
            _wait_for_table(devtools, session, names, bool(parent_ids), timeout_s)
            if _apply_view_state(devtools, session, experiment_id, parent_ids, shown_metrics):
                devtools.call("Page.reload", session_id=session)
                time.sleep(1.0)
                _wait_for_table(devtools, session, names, bool(parent_ids), timeout_s)
            else:
                logger.warning("this MLflow UI stores no runs-table view: expanding by clicks, without metric columns")
            evaluate(devtools, session, f"document.querySelector('{ASSISTANT_CLOSE_SELECTOR}')?.click()")

            clicks = 0
            if not _wait_until(devtools, session, f"{names_js}.every(name => {GRID_TEXT_JS}.includes(name))", 5):
                visible_before = _count_visible(devtools, session, names)
                clicks = _expand_nested_runs(devtools, session, timeout_s=30)
                if _count_visible(devtools, session, names) < visible_before:
                    # Some parents were open already, and the clicks folded them away.
                    logger.warning("expanding runs hid rows: clicking the expanders again")
                    clicks += _expand_nested_runs(devtools, session, timeout_s=30)
                # Let the table render the rows the expanders revealed.
                _wait_until(devtools, session, f"{names_js}.every(name => {GRID_TEXT_JS}.includes(name))", 10)
            text = evaluate(devtools, session, GRID_TEXT_JS) or ""
            shot = devtools.call("Page.captureScreenshot", {"format": "png"}, session)
        finally:
            devtools.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(base64.b64decode(shot["data"]))
    return {
        "screenshot": str(output),
        "url": page_url,
        "experiment_id": experiment_id,
        "runs": names,
        "visible_runs": [name for name in names if name in text],
        "metric_columns": shown_metrics,
        "clicks": clicks,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="MLflow tracking server URL, e.g. http://127.0.0.1:5000")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--output", required=True, type=Path, help="PNG file to write")
    parser.add_argument(
        "--backend-store-uri",
        help="start `mlflow server` on 127.0.0.1 with this store (e.g. sqlite:///saesweep_results/mlflow.db) "
        "for the screenshot, instead of reading --url",
    )
    parser.add_argument("--artifacts-destination", help="artifact root of the server that --backend-store-uri starts")
    parser.add_argument("--chromium", help="Chromium executable; default: $CHROMIUM, else chromium on PATH")
    parser.add_argument("--width", type=int, default=1800, help="viewport width in pixels")
    parser.add_argument("--height", type=int, default=1000, help="viewport height in pixels")
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help="comma-separated metrics to show as columns, where the runs have them",
    )
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for the server and for the runs to render")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if bool(args.url) == bool(args.backend_store_uri):
        print("error: pass exactly one of --url and --backend-store-uri", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("error: Chromium not found: apt-get install -y chromium, or pass --chromium PATH", file=sys.stderr)
        return 2

    server = None
    url = args.url
    with tempfile.TemporaryDirectory(prefix="mlflow-server-") as scratch:
        try:
            if args.backend_store_uri:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                log_path = Path(scratch) / "mlflow-server.log"
                logger.info("starting mlflow server at %s for %s", url, args.backend_store_uri)
                server = start_mlflow_server(args.backend_store_uri, args.artifacts_destination, port, log_path)
            wait_for_server(url, args.timeout, server)
            result = capture(
                url,
                args.experiment,
                args.output,
                chromium=chromium,
                width=args.width,
                height=args.height,
                timeout_s=args.timeout,
                metrics=tuple(name.strip() for name in args.metrics.split(",") if name.strip()),
            )
        except urllib.error.HTTPError as error:
            print(f"error: MLflow server at {url} returned {error.code} for {error.url}: {error.read()[:300]!r}", file=sys.stderr)
            return 1
        except ScreenshotError as error:
            print(f"error: {error}", file=sys.stderr)
            if server is not None and (Path(scratch) / "mlflow-server.log").is_file():
                print((Path(scratch) / "mlflow-server.log").read_text()[-2000:], file=sys.stderr)
            return 1
        finally:
            if server is not None:
                stop_process_group(server)
                logger.info("stopped mlflow server at %s", url)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
