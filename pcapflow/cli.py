"""Command line: thin click commands over the library (SPEC.md, "Command line")."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from typing import NoReturn

# numpy advises the kernel to back each big array with huge pages; on the benchmark machine
# (THP "madvise") faulting them in made fresh arrays ~6x dearer to first touch, and the
# analysis allocates every array once: analyze ran 7-12% faster without (README, Speed).
# Read by numpy when imported: set before it, and inherited by batch's workers.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

import click
import numpy as np
import pandas as pd

from .analysis import CONNECTION_COLUMNS as COLUMNS
from .analysis import Analysis, analyze
from .bpf import FilterError
from .capture import CaptureError
from .safe import clean

FORMATS = ["table", "json", "csv", "parquet", "html"]
SIDES = ("client", "server")


class InputError(click.ClickException):
    """Bad input from the user: one line, exit 2 (SPEC.md); internal errors exit 1."""

    exit_code = 2


class Progress:
    """Progress bars on stderr, when it is a terminal: over the input files' bytes while
    reading, then over the connections while reconstructing them (--low-memory: over the
    partitions, then over the rows written)."""

    def __init__(self, enabled: bool | None, captures):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = sum(os.path.getsize(c) for c in captures if c != "-" and os.path.isfile(c))
        self.bar = None

    def _start(self, label: str, length: int):
        self.done()
        self.bar = click.progressbar(length=max(length, 1), label=label, file=sys.stderr)

    def reading(self, n: int) -> None:
        if self.bar is None:
            self._start("reading   ", self.total)
        self.bar.update(n)

    def analyzing(self, done: int, total: int) -> None:
        self._advance("analyzing ", done, total)

    def writing(self, done: int, total: int) -> None:
        self._advance("writing   ", done, total)

    def _advance(self, label: str, done: int, total: int) -> None:
        if self.bar is None or self.bar.label != label:
            self._start(label, total)
        self.bar.update(done - self.bar.pos)

    def done(self) -> None:
        if self.bar is not None:
            self.bar.render_finish()
            self.bar = None


def run_analysis(captures, progress, **kw) -> Analysis:
    """analyze() with user errors turned into one line and exit 2, warnings on stderr."""
    bar = Progress(progress, captures)
    with reported(bar):
        a = analyze(list(captures), progress=bar.reading if bar.enabled else None,
                    analysis_progress=bar.analyzing if bar.enabled else None, **kw)
    warn_truncated(a.captures)
    return a


@contextlib.contextmanager
def reported(bar: Progress):
    """Bad input as one line and exit 2; the progress bar closed whatever happens."""
    try:
        yield
    except (CaptureError, FilterError) as e:
        raise InputError(clean(e)) from None
    finally:
        bar.done()


def warn_truncated(captures) -> None:
    for cap in captures:
        if cap.truncated:
            click.echo(f"warning: {clean(cap.path)}: capture cut short ({cap.truncated}); "
                       "analyzed the packets before the cut", err=True)


def flat(df: pd.DataFrame) -> pd.DataFrame:
    """Lists and dicts as JSON text, for CSV."""
    out = df.copy()
    for col in out.columns[out.dtypes == object]:  # only object columns can hold them
        values = out[col].tolist()
        if any(isinstance(v, (list, dict)) for v in values):
            out[col] = [(json.dumps(v) if v else "[]" if isinstance(v, list) else "{}")  # most are empty
                        if isinstance(v, (list, dict)) else v for v in values]
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pcapflow")
def cli():
    """pcapflow: TCP connection teardown analysis of pcap/pcapng captures."""


@cli.command("analyze")
@click.argument("captures", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option("--charts", type=click.Path(file_okay=False), help="Also write the charts (PNG) here.")
@click.option("--filter", "filter_", help='tcpdump-style filter, e.g. "host 10.0.0.2 and port 80".')
@click.option("--msl", type=float, default=30.0, show_default=True, help="MSL in s; TIME_WAIT = 2 MSL.")
@click.option("--fin-timeout", type=float, default=60.0, show_default=True,
              help="net.ipv4.tcp_fin_timeout of the hosts, s.")
@click.option("--port-range", default="32768-60999", show_default=True,
              help="Ephemeral port range of the clients (net.ipv4.ip_local_port_range).")
@click.option("--progress/--no-progress", default=None, help="Progress on stderr (default: if a terminal).")
@click.option("--low-memory", is_flag=True, help="Memory bounded by a 64 MB slice of capture, not by "
              "the whole (json or csv; slower): for captures too big for memory.")
def analyze_cmd(captures, fmt, output, charts, filter_, msl, fin_timeout, port_range, progress, low_memory):
    """Analyze CAPTURE... (pcap/pcapng, optionally compressed; '-' for stdin) as one timeline."""
    try:
        lo, hi = (int(x) for x in port_range.split("-"))
    except ValueError:
        raise click.BadParameter("expected LOW-HIGH, e.g. 32768-60999", param_hint="--port-range")
    if fmt in ("parquet", "html") and not output:
        raise click.UsageError(f"--format {fmt} needs -o PATH")
    if low_memory:
        if fmt not in ("json", "csv") or charts or "-" in captures:
            raise click.UsageError("--low-memory writes --format json or csv, from files, without --charts")
        return analyze_low_memory(captures, fmt, output, progress, (lo, hi), msl=msl,
                                  fin_timeout=fin_timeout, filter=filter_)
    a = run_analysis(captures, progress, msl=msl, fin_timeout=fin_timeout, filter=filter_)
    a.params.port_range = (lo, hi)
    if fmt == "table":
        from .report.table import render
        text = render(a)
    elif fmt == "json":  # streamed: a big capture's document is never held whole
        if output:
            a.to_json(output)
        else:
            a.write_json(click.get_text_stream("stdout"))
        text = None
    elif fmt == "csv":
        text = flat(a.connections).to_csv(index=False)
    elif fmt == "parquet":
        try:
            a.connections.to_parquet(output, index=False)
        except ImportError:
            raise InputError("parquet output needs pyarrow: pip install 'pcapflow[parquet]'")
        text = None
    else:
        from .report.html import write_html
        write_html(a, output)
        text = None
    if text is not None:
        if output:
            with open(output, "w") as fh:
                fh.write(text + ("" if text.endswith("\n") else "\n"))
        else:
            click.echo(text, nl=not text.endswith("\n"))
    if charts:
        from .report.charts import write_charts
        for path in write_charts(a, charts):
            click.echo(f"chart: {path}", err=True)


def analyze_low_memory(captures, fmt, output, progress, port_range, **kw) -> None:
    """analyze --low-memory: the batch engine on one timeline, written as it is merged."""
    try:
        from .batch import analyze_streamed
    except ImportError:  # its temporary files are Arrow's
        raise InputError("--low-memory needs pyarrow: pip install 'pcapflow[parquet]'") from None
    bar = Progress(progress, captures)
    with reported(bar), contextlib.ExitStack() as stack:
        a = stack.enter_context(analyze_streamed(
            list(captures), progress=bar.reading if bar.enabled else None,
            analysis_progress=bar.analyzing if bar.enabled else None, **kw))
        bar.done()
        a.params.port_range = port_range
        a.progress = bar.writing if bar.enabled else None
        fh = stack.enter_context(open(output, "w")) if output else click.get_text_stream("stdout")
        if fmt == "json":
            a.write_json(fh)
        else:
            header = True
            for df in a.connections():
                flat(df).to_csv(fh, index=False, header=header)
                header = False
            if header:  # no connection: the header alone, as analyze writes
                pd.DataFrame(columns=COLUMNS).to_csv(fh, index=False)
    warn_truncated(a.captures)


@cli.command("states")
@click.argument("captures", nargs=-1, required=True)
@click.option("--at", "at", type=float, help="Instant (epoch seconds, or seconds from the capture "
              "start if below 1e9). Default: end of capture.")
@click.option("--host", help="Only this host's sockets.")
@click.option("--explain", is_flag=True, help="Break each count down by local port and peer.")
@click.option("--msl", type=float, default=30.0, show_default=True)
@click.option("--fin-timeout", type=float, default=60.0, show_default=True)
@click.option("--progress/--no-progress", default=None)
def states_cmd(captures, at, host, explain, msl, fin_timeout, progress):
    """netstat-like socket state counts per host at an instant of the capture."""
    a = run_analysis(captures, progress, msl=msl, fin_timeout=fin_timeout)
    start = min((c.first_ts for c in a.captures if c.first_ts is not None), default=0.0)
    t = None if at is None else (start + at if at < 1e9 else at)
    sockets = a.sockets(at=t, host=host)
    when = pd.to_datetime(t if t is not None else a.capture_end or 0, unit="s", utc=True)
    click.echo(f"states at {when.isoformat()}")
    if sockets.empty:
        click.echo("(no sockets)")
    closers = a.connections["active_closer"]
    for h, g in sockets.groupby("host", sort=True):
        click.echo(f"{clean(h)}")
        for state, n in g["state"].value_counts().items():
            click.echo(f"  {state:<12} {n:>7}")
            if not explain:
                continue
            mine = g[g["state"] == state]
            service = np.where(mine["side"] == "server",  # a server port, or where a client went
                               ":" + mine["port"].astype(str) + " <- " + mine["peer"],
                               "-> " + mine["peer"] + ":" + mine["peer_port"].astype(str))
            for (where, side), p in mine.groupby([service, mine["side"].to_numpy()]):
                first = closers.loc[p["conn_id"]].value_counts()
                who = ", ".join(f"{'this host' if k == side else 'peer' if k in SIDES else k}"
                                f" closed first {v}" for k, v in first.items() if k != "none")
                sample = ", ".join(map(str, p["conn_id"].head(5)))
                click.echo(f"      {clean(where)}: {len(p)}{'; ' + who if who else ''}; "
                           f"e.g. conn {sample}")


@cli.command("show")
@click.argument("capture")
@click.argument("conn_id", type=int)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the ladder diagram (PNG/SVG/PDF).")
@click.option("--msl", type=float, default=30.0, show_default=True)
@click.option("--fin-timeout", type=float, default=60.0, show_default=True)
def show_cmd(capture, conn_id, output, msl, fin_timeout):
    """One connection's teardown, told step by step (and drawn with -o)."""
    a = run_analysis([capture], False, msl=msl, fin_timeout=fin_timeout)
    if conn_id not in a.connections.index:
        raise InputError(f"{clean(capture)}: no connection {conn_id} "
                                   f"(ids 0-{len(a.connections) - 1})")
    from .report.story import story
    click.echo(story(a, conn_id))
    if output:
        fig = a.plot_ladder(conn_id)
        fig.savefig(output, dpi=110, bbox_inches="tight")
        click.echo(f"ladder: {output}", err=True)


@cli.command("batch")
@click.argument("paths", nargs=-1, required=True)
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output directory: Parquet datasets connections/, events/, findings/, files/.")
@click.option("--jobs", type=click.IntRange(min=1), help="Local worker processes (default: every core).")
@click.option("--scheduler", metavar="ADDRESS", help="Run on this dask.distributed scheduler "
              "(tcp://host:8786); workers must see the inputs and OUT_DIR at the same paths.")
@click.option("--group-by", type=click.Choice(["dir", "none"]), default="dir", show_default=True,
              help="One timeline per directory (vantage point), or one for everything.")
@click.option("--msl", type=float, default=30.0, show_default=True, help="MSL in s; TIME_WAIT = 2 MSL.")
@click.option("--fin-timeout", type=float, default=60.0, show_default=True,
              help="net.ipv4.tcp_fin_timeout of the hosts, s.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr (default: if a terminal).")
def batch_cmd(paths, out_dir, jobs, scheduler, group_by, msl, fin_timeout, progress):
    """Analyze an archive of captures (files, directories, globs) into Parquet datasets.

    Files of one group are one timeline, ordered by first packet; unchanged groups are not
    recomputed on a re-run. Exit status: 0 all files analyzed, 2 bad usage or no capture
    found, 3 some files could not be read (listed in the summary and the files table).
    """
    from .batch import BatchError, run
    bar = None

    def advance(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=total, label="reading", file=sys.stderr)
            bar.__enter__()
        bar.update(done - bar.pos)

    show = sys.stderr.isatty() if progress is None else progress
    try:
        result = run(paths, out_dir, jobs=jobs, scheduler=scheduler, group_by=group_by, msl=msl,
                     fin_timeout=fin_timeout, progress=advance if show else None)
    except BatchError as e:
        raise InputError(clean(e)) from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    click.echo(clean(result.summary()))
    if result.failed:
        sys.exit(3)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except SystemExit as e:
        if isinstance(e.code, str):
            click.echo(e.code, err=True)
        _exit(e.code if isinstance(e.code, int) else 0 if e.code is None else 1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        _exit(130)
    except Exception as e:  # a bug: one line, exit 1; PCAPFLOW_DEBUG=1 shows the traceback
        if os.environ.get("PCAPFLOW_DEBUG"):
            raise
        click.echo(f"pcapflow: internal error: {type(e).__name__}: {clean(e)} "
                   "(set PCAPFLOW_DEBUG=1 for a traceback and please report it)", err=True)
        _exit(1)


def _exit(code: int) -> NoReturn:
    """Exit without tearing the interpreter down object by object: for a big analysis that
    took 0.28 s of short.pcap's 4 s, and the OS takes the memory back at once. Every command
    has closed its files and pools by now; what the standard streams hold is written first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (| head): nothing more to say
            code = code or 1
    os._exit(code)
