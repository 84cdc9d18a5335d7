"""The HTML postmortem: self-contained, findings first, and inert against hostile packets.

tests/data/html_injection.pcap is a real loopback capture (tcpdump -i lo) of one HTTP
exchange whose request line, Host header and response body carry
`<script>document.title='pwned'</script>` / `<img onerror=...>`: if any of it reached the
report unescaped, a browser would change the page title.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import pcapflow
from pcapflow.report.html import render, write_html

ROOT = Path(__file__).resolve().parent.parent
INJECTION = ROOT / "tests" / "data" / "html_injection.pcap"
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">.pcap"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TITLE = re.compile(r"<title>(.*?)</title>", re.DOTALL)


def hostile_capture(tmp_path: Path) -> Path:
    """The injection capture under a file name that is itself HTML."""
    path = tmp_path / HOSTILE_NAME
    shutil.copy(INJECTION, path)
    return path


def browser(tmp_path: Path, url: str, *args: str) -> str:
    profile = tmp_path / "profile"
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *args, url],
        check=False, capture_output=True, text=True, timeout=120)
    return out.stdout


def test_http_pileup_report_puts_findings_first_and_embeds_everything():
    a = pcapflow.analyze(str(ROOT / "sample_pcaps/http_pileup/server.pcap"))
    page = render(a)
    assert page.index("server_time_wait_pileup") < page.index("<h2>Connections")
    assert page.count('<img alt="chart" src="data:image/png;base64,') >= 3
    assert 'id="conn-199"' in page
    assert not re.search(r"""(src|href)=["'](https?:|//)|<link|<script""", page)


def test_packet_and_file_name_text_is_escaped(tmp_path):
    a = pcapflow.analyze(str(hostile_capture(tmp_path)))
    page = render(a)
    assert "<script>document.title" not in page
    assert "<img src=x" not in page
    assert "GET /&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt; HTTP/1.1" in page
    assert "&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;.pcap" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_browser_renders_the_report_and_runs_no_injected_script(tmp_path):
    report = tmp_path / "report.html"
    write_html(pcapflow.analyze(str(hostile_capture(tmp_path))), str(report))
    dom = browser(tmp_path, report.as_uri(), "--dump-dom")
    assert TITLE.search(dom).group(1) == "pcapflow report"
    assert "<h2>Findings" in dom and dom.count("<img") >= 2
    # the harness itself: the same text left unescaped does run in this browser
    control = tmp_path / "control.html"
    control.write_text("<html><head><title>control</title></head><body>"
                       "<script>document.title='pwned'</script></body></html>")
    assert TITLE.search(browser(tmp_path, control.as_uri(), "--dump-dom")).group(1) == "pwned"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
def test_browser_screenshot_of_the_pileup_report(tmp_path):
    report = tmp_path / "pileup.html"
    write_html(pcapflow.analyze(str(ROOT / "sample_pcaps/http_pileup/server.pcap")), str(report))
    dom = browser(tmp_path, report.as_uri(), "--dump-dom")
    assert "server_time_wait_pileup" in dom
    assert dom.count('<img alt="chart"') >= 3
    shot = tmp_path / "pileup.png"
    browser(tmp_path, report.as_uri(), f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.read_bytes()[:4] == b"\x89PNG"
