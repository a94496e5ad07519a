"""What every job shares: logging, connecting to Ray, turning failures into one clear line."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster of ``ray job submit`` (RAY_ADDRESS) or start a local one.

    Ray's token authentication stays as the environment says: a job connects to a token-protected
    cluster with its token (RAY_AUTH_TOKEN / ~/.ray/auth_token), and a local Ray started here
    generates its own token (Ray 2.60). Only the tests disable it, for the clusters they start."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"ignore_reinit_error": True, "log_to_driver": True}
    if not os.environ.get("RAY_ADDRESS") and num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)


def root_cause(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (RayTaskError, UserCodeException, ...)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        # RayTaskError.cause, Ray Train's ControllerError.controller_failure, then the chain
        nxt = getattr(exc, "cause", None) or getattr(exc, "controller_failure", None) or exc.__cause__
        if not isinstance(nxt, BaseException):
            break
        exc = nxt
    return exc


def final_error(exc: BaseException, error_class: type[BaseException]) -> BaseException | None:
    """The non-retryable error (an exception with ``retryable = False``, e.g. ``climax.data.ShardReadError``)
    inside Ray's wrappers, or None; a wrapper that kept only the worker's traceback text gives back an
    ``error_class`` when its last line names that class."""
    name = f"{error_class.__module__}.{error_class.__name__}: "
    seen = set()
    while isinstance(exc, BaseException) and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "retryable", True) is False:
            return exc
        lines = str(exc).strip().splitlines()
        if lines and lines[-1].startswith(name):
            return error_class(lines[-1][len(name):])
        exc = getattr(exc, "_base_exc", None) or getattr(exc, "cause", None) or exc.__cause__
    return None


def error_line(exc: BaseException) -> str:
    cause = root_cause(exc)
    text = str(cause).strip()
    # Ray's wrappers render a traceback; the user's message is its last line.
    if "Traceback (most recent call last)" in text:
        text = text.splitlines()[-1]
    return f"{type(cause).__name__}: {text}"
