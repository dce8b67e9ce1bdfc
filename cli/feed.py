"""`fedstream feed`: a producer's rows into a device's ingestion service, line by line,
with the line to go on from when it stops (see the README's deployment section)."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable
from functools import partial
from typing import Annotated, Any, NoReturn

import typer
from rich.markup import escape

from fedstream.cli.main import address_problem, app, err, fail


@app.command()
def feed(
    file: Annotated[str, typer.Argument(metavar="FILE|-", help="CSV or JSONL file, - for stdin.")],
    to: Annotated[
        str,
        typer.Option("--to", help="Ingestion service: unix:///path.sock or 127.0.0.1:PORT."),
    ],
    label: Annotated[str, typer.Option("--label", help="Label column (or key).")] = "label",
    features: Annotated[
        list[str] | None,
        typer.Option("--features", help="Feature columns, comma-separated or repeated "
                     "(default: all but the label)."),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option("--classes", help="Class names in index order, comma-separated "
                     "(default: labels are integer class indices)."),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Rows per message.")] = 4096,
    fmt: Annotated[str, typer.Option("--format", help="auto, csv or jsonl.")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    wait: Annotated[
        float,
        typer.Option("--wait", min=0, help="Seconds to wait for the ingestion service to come "
                     "up (a producer started beside its device); 0 fails at once."),
    ] = 0.0,
) -> None:
    """Push samples from a CSV or JSONL file (or stdin) into a device's ingestion service.

    Malformed rows are reported with file:line and skipped; the good rows are stored.
    Exit code 0: all stored; 2: malformed rows or bad input; 3: the spool was full
    (back-pressure: rows from the line named on were not stored), or its disk full; 1: service
    unreachable."""
    from array import array

    from tqdm import tqdm

    from fedstream.client.feed import Reader, open_input, still_reading
    from fedstream.client.ingest import IngestError, Producer
    from fedstream.client.sources import DataError
    from fedstream.protocol.runtime import Stopped, StopRequest, on_signals

    if fmt not in ("auto", "csv", "jsonl"):
        fail(f"--format must be auto, csv or jsonl, got {fmt!r}", 2)
    if problem := address_problem(to, "--to", unix=True):
        fail(problem, 2)
    wanted = [f.strip() for group in features or [] for f in group.split(",") if f.strip()]
    request = StopRequest()  # a stop while rows flow ends the input there, the stream whole
    # From the first read to the device's last reply, a stop says what was sent.
    with on_signals():
        try:
            stream, name = open_input(file)
            reader = Reader(
                stream, name, path=file, label=label, features=wanted or None, fmt=fmt,  # type: ignore[arg-type]
                classes=[c.strip() for c in classes.split(",")] if classes else None, batch=batch,
                stop=request,
            )
            chunks = reader.open()  # the header, before connecting
        except (DataError, ValueError) as e:
            fail(e, 2)
        except Stopped as e:  # e.g. a live pipe that has not sent its header yet
            err.print(f"stopped ({e}) before the input's first row: nothing was sent",
                      markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        lines = array("q")  # file line of every row sent, by stream position
        problems: list[str] = []
        malformed = 0
        fatal: list[Exception] = []
        bar = tqdm(unit=" rows", disable=True if quiet else None, file=sys.stderr)

        def batches() -> Any:
            nonlocal malformed
            try:
                for chunk in chunks:
                    malformed += len(chunk.errors)
                    problems.extend(chunk.errors[: max(0, 1000 - len(problems))])
                    bar.update(len(chunk.y) + len(chunk.errors))
                    if len(chunk.y):
                        lines.extend(chunk.lines.tolist())
                        yield chunk.x, chunk.y, None, None
            except (DataError, ValueError) as e:  # the input as a whole; rows before it are sent
                fatal.append(e)

        result, stopped = None, None
        try:
            with Producer(to) as producer:
                if wait:
                    producer.wait_ready(wait)
                width = producer.stats()["n_features"]
                _check_width(reader.features or wanted, width, name, to)
                with on_signals(STOPPING_FEED, soft=request):
                    result = producer.append_batches(batches())
        except Stopped as e:
            stopped = e
            if result is None:  # the device's reply did not come: say what was handed over
                bar.close()
                _stopped_mid_feed(e, lines, name, partial(_resume_from, reader, stream))
        except IngestError as e:
            bar.close()
            _failed_mid_feed(e, lines, name, partial(_resume_from, reader, stream), wait,
                             problems)
        finally:
            if not still_reading():  # else closing waits on the reader's lock (see main)
                stream.close()
    bar.close()
    ended = None
    if request.is_set():
        stopped = request
        # Only a stop that cut the input short has a line to go on from; a full spool
        # names its own (the first row refused), which comes before it.
        if reader.broke_off and result is not None and result.first_refused is None:
            resume = partial(_resume_from, reader, stream)
            ended = _ended_at(request, lines[: result.sent], name, resume)
    named = [c.strip() for c in classes.split(",")] if classes else []
    _report_feed(result, lines, problems, malformed, fatal, name, to, stopped, ended, named)


STOPPING_FEED = ("stopping: sending the rows already read, then the device says what it "
                 "stored (stop again to leave at once, not knowing which rows it stored)")


def _ended_at(request: Any, lines: Any, name: str, resume: Callable[[int], str]) -> str:
    """What a feed stopped mid-input tells: `lines` are the rows the device received (its
    reply counts them), and the input was read no further than the row after them."""
    said = f"stopped ({signal.Signals(request.signum).name}): "
    if not lines:
        return said + f"no row was sent: feed {name} again"
    return (said + f"the rows up to {name}:{lines[-1]} were sent, and the device's counts "
            f"above are for them; feed again from {resume(lines[-1] + 1)}")


def _stopped_mid_feed(e: Any, lines: Any, name: str, resume: Callable[[int], str]) -> NoReturn:
    """A feed stopped (Ctrl-C, SIGTERM) before the device replied: what was handed over,
    and the line to feed again from."""
    handed = len(lines)
    sent = f"{handed} rows were sent" + (f" (to {name}:{lines[-1]})" if handed else "")
    rest = (f"Rows after {name}:{lines[-1]} were not sent: feed again from "
            f"{resume(lines[-1] + 1)} (up to a few thousand rows before them were still in "
            "flight and may not be stored)") if handed else f"Feed {name} again"
    err.print(f"stopped ({e}): {sent}; the device stored those it received before the "
              f"stop. {rest}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(e.exit_code) from None


def _failed_mid_feed(
    e: Any, lines: Any, name: str, resume: Callable[[int], str], wait: float,
    problems: list[str],
) -> NoReturn:
    """The device could not be reached, went away, or could not store (a full disk):
    what it kept, and the line to feed again from."""
    if e.handled is not None:  # its spool could not store: it said from which row on
        for problem in sorted(problems, key=_line_of)[:20]:  # rows this feed refused
            err.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
        if not lines:
            fail(f"{e}\nno row was stored: feed {name} again once the device has room", 3)
        first = lines[e.handled] if e.handled < len(lines) else lines[-1] + 1
        fail(f"{e}\nthe rows before {name}:{first} were stored, but for malformed ones; "
             f"{name}:{first} and the rows after it were not. Once the device has room, "
             f"feed again from {resume(first)}", 3)
    if e.sent:  # it went away mid-stream: say what was sent and where to go on
        last = lines[e.sent - 1]
        fail(f"{e}\nthe device went away during the feed: {e.sent} rows were sent (to "
             f"{name}:{last}); it stored those it had received, and rows after "
             f"{name}:{last} were not sent. Once it is up, feed again from "
             f"{resume(last + 1)}; the last rows sent before it went away may not be stored "
             "either", 1)
    hint = "" if wait else " (is its device up? --wait S waits for it)"
    fail(f"{e}{hint}", 1)


def _report_feed(
    result: Any, lines: Any, problems: list[str], malformed: int, fatal: list[Exception],
    name: str, to: str, stopped: Any, ended: str | None = None, classes: list[str] | None = None,
) -> None:
    """The device's reply: counts on stdout, the first problems on stderr, and the exit
    code the docstring of `feed` gives."""
    for error in result.errors:
        room = max(0, 1000 - len(problems))
        reason = _class_named(error.reason, classes or [])
        for index in range(error.index, error.index + min(error.count, room)):
            problems.append(f"{name}:{lines[index]}: {reason}")
    malformed += result.rejected
    problems.sort(key=_line_of)
    typer.echo(
        f"{result.accepted} accepted, {result.dropped} dropped, {result.refused} refused "
        f"(spool full), {malformed} malformed; {to}"
    )
    for problem in [*problems[:20], *map(str, fatal)]:
        err.print(f"[red]error:[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if malformed > min(20, len(problems)):
        err.print(f"... and {malformed - min(20, len(problems))} more malformed rows")
    if result.first_refused is not None:
        err.print(
            f"[red]spool full:[/red] rows from {escape(name)}:{lines[result.first_refused]} "
            "on were not stored (back-pressure), nor was the rest of the input read; "
            "feed them again later",
            highlight=False, soft_wrap=True,
        )
    if ended:
        err.print(ended, markup=False, highlight=False, soft_wrap=True)
    if result.first_refused is not None:  # back-pressure: the line above is where to go on
        raise typer.Exit(3)
    if stopped is not None:  # it came once the device had replied: the report is whole
        raise typer.Exit(stopped.exit_code)
    if malformed or fatal:
        raise typer.Exit(2)
    if result.refused:
        raise typer.Exit(3)


_OUT_OF_RANGE = re.compile(r"label out of range: (\d+) is not in \[0, (\d+)\)")


def _class_named(reason: str, classes: list[str]) -> str:
    """A label the device refused, by its name in --classes too: the device knows only
    indices, and a class it lacks is the operator's to see ('warn', not 2)."""
    found = _OUT_OF_RANGE.fullmatch(reason)
    if not found or int(found[1]) >= len(classes):
        return reason
    return (f"{reason}: {classes[int(found[1])]!r} is class {found[1]} of --classes "
            f"({len(classes)} names), and the device takes {found[2]} (its stream.n_classes)")


def _resume_from(reader: Any, stream: Any, line: int) -> str:
    """Where a stopped feed goes on, with a command that keeps a CSV's header (line
    numbers count every line of the input, as an editor's do)."""
    import gzip

    cat = "zcat FILE" if isinstance(getattr(stream, "buffer", None), gzip.GzipFile) else (
        "cat FILE")
    if reader.kind == "csv":
        head = reader.header_line
        return (f"line {line}, after the header (line {head}): e.g. "
                f"`{cat} | sed -n '{head}p;{line},$p'`")
    return f"line {line}: e.g. `{cat} | tail -n +{line}`"


def _check_width(features: list[str], width: int, name: str, to: str) -> None:
    """Columns that cannot fit the device: said once, before any row is sent (the device
    would refuse every row). A JSONL input's keys are known here only from --features;
    without it, each row's are checked as it comes."""
    if features and len(features) != width:
        shown = ", ".join(repr(f) for f in features[:8]) + (", ..." if len(features) > 8 else "")
        fail(f"{name}: its rows have {len(features)} features ({shown}), and the device at "
             f"{to} stores samples of {width}: name the {width} feature columns, in the "
             "order the device's other producers use, with --features (nothing was sent)", 2)


def _line_of(problem: str) -> int:
    """The line number in a "file:line: message" problem (for ordering)."""
    head = problem.split(": ", 1)[0]
    number = head.rsplit(":", 1)[-1]
    return int(number) if number.isdigit() else 0
