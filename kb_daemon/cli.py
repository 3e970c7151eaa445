"""`kbctl`, the admin CLI. Commands stay thin; domain errors become one line on stderr."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from kb_daemon.errors import KbError


class KbGroup(click.Group):
    """The one error boundary: domain errors -> `Error: ...` on stderr, exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001  (the boundary)
            if ctx.meta.get("kb_debug"):
                raise
            if isinstance(exc, KbError) or type(exc).__module__.startswith("editor"):
                raise click.ClickException(str(exc)) from exc
            raise click.ClickException(
                f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback)"
            ) from exc


@click.group(cls=KbGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks of unexpected errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log progress at INFO level on stderr.")
@click.version_option(package_name="kb-daemon")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """kb-daemon keeps a deployed vision-language model's knowledge current by model editing.

    Each fact becomes a small, removable codebook edit (BalancEdit) on a frozen model.
    """
    ctx.meta["kb_debug"] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@cli.command()
@click.option("--answer", "new_name", default="oblong box", show_default=True,
              help="The new name given to the edited image's shape.")
def demo(new_name: str) -> None:
    """Apply one fact to the shipped demo model and show what changed.

    Runs in process (no database, no worker): picks easy-VQA training images, renames the
    shape in one of them, and prints the model's answers before and after the edit for the
    edited image, a rephrased question, another image of the same shape, a different shape,
    and a different question.

    Example:

        kbctl demo --answer "oblong box"
    """
    from kb_daemon.demo import run_demo

    run_demo(click.echo, new_name)


def main() -> None:
    cli(prog_name="kbctl")


if __name__ == "__main__":
    main()
