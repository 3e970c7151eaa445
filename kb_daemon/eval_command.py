"""`kbctl eval`: score an editing method on an edit-case file (register with `cli.add_command`).

Nothing heavy is imported at module level: torch and the editor load inside the command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

METHOD_NAMES = ("balancedit", "grace", "ft", "mend", "ike")

CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])


def _output_options(*, json_help: str, plot_help: str) -> Callable[[CommandFunction], CommandFunction]:
    """`--model`, `--json` and `--plot`, shared by `eval` and `eval-stream`; each command says what
    its report and its plot hold."""

    def decorate(command: CommandFunction) -> CommandFunction:
        # Applied innermost first, so that --help lists them as written top to bottom.
        file_type = click.Path(dir_okay=False, path_type=Path)
        command = click.option("--plot", "plot_path", type=file_type, help=plot_help)(command)
        command = click.option("--json", "json_path", type=file_type, help=json_help)(command)
        model_help = '"demo" or a local model directory.'
        return click.option("--model", default="demo", show_default=True, help=model_help)(command)

    return decorate


def _method_options(*, hparam_help: str, input_name: str) -> Callable[[CommandFunction], CommandFunction]:
    """`--hparam` and `--pool`, shared by `eval` and `eval-stream`; `input_name` is the command's
    input file, beside which the reference pool is looked for by default."""

    def decorate(command: CommandFunction) -> CommandFunction:
        command = click.option(
            "--pool",
            "pool_path",
            type=click.Path(dir_okay=False, path_type=Path),
            help=f"Reference pool for hard negatives [default: reference_pool.jsonl beside {input_name}].",
        )(command)
        return click.option("--hparam", "hparams", multiple=True, metavar="KEY=VALUE", help=hparam_help)(command)

    return decorate


@click.command("eval")
@click.argument("cases", type=click.Path(dir_okay=False, path_type=Path), metavar="CASES.jsonl")
@click.option(
    "--method",
    required=True,
    metavar="|".join(METHOD_NAMES),
    help="Editing method: BalancEdit, GRACE, or the FT / MEND / IKE baselines.",
)
@click.option(
    "--sequential",
    is_flag=True,
    help="Apply every case to one model in file order, then score all (default: each case "
    "alone on the unedited model).",
)
@_output_options(
    json_help="Write the full report (per-case results, curve, timings) as JSON.",
    plot_help="Write a PNG of the metrics against the number of edits (needs matplotlib).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N cases.")
@_method_options(
    hparam_help="Method hyperparameter, repeatable (e.g. alpha=0.1, max_steps=50, pool_size=100).",
    input_name="CASES.jsonl",
)
@click.option("--curve-every", type=click.IntRange(min=1), help="Curve point every K edits [default: N/8].")
def eval_command(
    cases: Path,
    method: str,
    sequential: bool,
    model: str,
    json_path: Path | None,
    plot_path: Path | None,
    limit: int | None,
    hparams: tuple[str, ...],
    pool_path: Path | None,
    curve_every: int | None,
) -> None:
    """Apply the facts of CASES.jsonl with an editing method and print Acc, T-Gen, I-Gen, Loc and
    HM, both as exact match of the greedy answer and at token level, with seconds per edit.

    The method, the hyperparameters and the whole case file are checked before anything runs; a
    problem is reported as one line, "Error: FILE:LINE: what", with exit status 1. Progress goes
    to stderr, the table to stdout.

    \b
    Example:
        python -m editor.eval build-easyvqa --out bench/dev
        kbctl eval bench/dev/cases.jsonl --method balancedit --json out/balancedit.json
        kbctl eval bench/dev/cases.jsonl --method grace --sequential --plot out/grace.png
        kbctl eval bench/dev/cases.jsonl --method balancedit --hparam alpha=0.1 --limit 5
    """
    from editor.errors import EditorError
    from editor.eval.cases import load_cases
    from editor.eval.errors import UnknownMethodError
    from editor.eval.hparams import parse_hparams, settings_for

    try:
        if method not in METHOD_NAMES:
            raise UnknownMethodError(
                f"--method: unknown method {method!r}; choose one of {', '.join(METHOD_NAMES)}"
            )
        values = parse_hparams(hparams)
        settings_for(method, values)
        load_cases(cases)  # the whole file, before the model is loaded
        if pool_path is not None:
            from editor.eval.cases import load_reference_pool

            load_reference_pool(pool_path)
    except EditorError as exc:
        raise click.ClickException(str(exc)) from exc

    from editor.eval.runner import run_eval
    from editor.eval.table import format_table

    def progress(message: str) -> None:
        click.echo(message, err=True)

    try:
        report = run_eval(
            cases,
            method,
            sequential,
            model,
            hparams=values,
            limit=limit,
            pool_path=pool_path,
            curve_every=curve_every,
            json_path=json_path,
            plot_path=plot_path,
            progress=progress,
        )
    except EditorError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_table([report]))
    if json_path is not None:
        click.echo(f"report: {json_path}", err=True)
    if plot_path is not None:
        click.echo(f"plot: {plot_path}", err=True)


@click.command("eval-stream")
@click.argument("stream", type=click.Path(dir_okay=False, path_type=Path), metavar="STREAM.jsonl")
@_output_options(
    json_help="Write the report (every checkpoint's metrics and probe answers, every operation's seconds) as JSON.",
    plot_help="Write a PNG of the metrics and seconds per operation against operations (needs matplotlib).",
)
@_method_options(
    hparam_help="BalancEdit hyperparameter, repeatable (e.g. alpha=0.1, pool_size=100) [default: the editor's].",
    input_name="STREAM.jsonl",
)
def eval_stream_command(
    stream: Path,
    model: str,
    json_path: Path | None,
    plot_path: Path | None,
    hparams: tuple[str, ...],
    pool_path: Path | None,
) -> None:
    """Apply an operation stream (new facts, supersedes, retractions) in order to one BalancEdit
    editor and score it at each checkpoint the stream names.

    At a checkpoint every live fact is probed (Acc on its own input, T-Gen on held-out
    phrasings, I-Gen on other images of its scope), superseded facts' inputs must give the new
    answer, retracted facts' inputs and inputs no fact ever touched (Loc) the unedited model's;
    HM is the harmonic mean of T-Gen, I-Gen and Loc. Exact match of the greedy answer, in
    percent, with seconds per operation and the count of spliced answers (neither the unedited
    answer nor any fact's). The file is checked before the model loads; a problem is reported as
    "Error: FILE:LINE: what", exit status 1. Progress goes to stderr, the table to stdout.

    \b
    Example:
        python -m editor.eval build-stream --ops 1000 --seed 0 --out bench/stream
        kbctl eval-stream bench/stream/stream.jsonl --json out/stream.json --plot out/stream.png
    """
    from editor.errors import EditorError
    from editor.eval.hparams import parse_hparams, settings_for
    from editor.eval.stream import format_stream_table, load_stream, run_stream

    try:
        values = parse_hparams(hparams)
        settings_for("balancedit", values)
        load_stream(stream)
    except EditorError as exc:
        raise click.ClickException(str(exc)) from exc

    def progress(message: str) -> None:
        click.echo(message, err=True)

    try:
        report = run_stream(
            stream,
            model,
            hparams=values,
            pool_path=pool_path,
            json_path=json_path,
            plot_path=plot_path,
            progress=progress,
        )
    except EditorError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(format_stream_table(report))
    met = report["targets_met"]
    click.echo("targets: " + ", ".join(f"{k} {'met' if v else 'not met'}" for k, v in met.items()))
    if json_path is not None:
        click.echo(f"report: {json_path}", err=True)
    if plot_path is not None:
        click.echo(f"plot: {plot_path}", err=True)
