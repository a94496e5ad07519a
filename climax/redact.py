"""Secrets out of everything we write or print: the one redaction helper.

Credentials reach this project through configuration (``storage_options: {key, secret, token}``,
an endpoint URL ``http://user:password@host``, a ``key=value`` on the command line). They must stay
in memory, where s3fs/pyarrow/gcsfs use them, and never reach a file, an object, a log line or a
tracking server. Every dump of a configuration goes through :func:`redact` (manifests, checkpoints'
``run_config``, MLflow parameters, the printed "effective configuration", Tune's reports and files)
and every stored command line through :func:`redact_argv` (the NetCDF ``history`` attribute).

Hand-written rather than pydantic ``SecretStr``: the secrets sit in free-form ``dict[str, Any]``
option mappings handed unchanged to fsspec/s3fs (which need the plain strings), so a field type
cannot mark them; the keys' names can.

Imports only the standard library (``pipelines`` uses it without torch).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["REDACTED", "is_secret_key", "redact", "redact_text", "redact_argv", "without_redacted"]

REDACTED = "<redacted>"

#: words that make a key secret: ``key``, ``secret``, ``token``, ``password``, ``credentials`` alone or
#: inside a name split at ``_ - .`` or camel case (``aws_secret_access_key``, ``session_token``,
#: ``api_key``, ``accessKey``, ``sas_token``, ``account_key``, ``client_secret``)
_SECRET_WORDS = {"key", "secret", "token", "password", "passwd", "pwd", "credential", "credentials",
                 "apikey", "accesskey", "secretkey", "sessiontoken", "passphrase", "signature", "sig"}
_SPLIT = re.compile(r"[_\-.\s]+|(?<=[a-z0-9])(?=[A-Z])")
#: ``scheme://user:password@host`` (also ``scheme://token@host``): the userinfo goes
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/?#@\s'\"]+)@")
#: ``?token=...&X-Amz-Signature=...`` in a URL's query: the value goes
_QUERY = re.compile(r"(?P<name>[?&;](?P<key>[^=&;#\s'\"]+)=)(?P<value>[^&;#\s'\"]*)")


def is_secret_key(name: Any) -> bool:
    """Whether a mapping key names a secret (``key``, ``secret``, ``session_token``, ``password``, ...)."""
    if not isinstance(name, str) or not name:
        return False
    words = {w.lower() for w in _SPLIT.split(name) if w}
    return bool(words & _SECRET_WORDS) or name.lower().replace("_", "").replace("-", "") in _SECRET_WORDS


def redact_text(text: str) -> str:
    """A string with the userinfo of every URL and secret-named query values replaced."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    if "?" in text or "&" in text:
        text = _QUERY.sub(lambda m: m["name"] + (REDACTED if is_secret_key(m["key"]) and m["value"] else m["value"]),
                          text)
    return text


def redact(obj: Any) -> Any:
    """A copy of ``obj`` safe to write: the value of every secret-named key (at any depth of dicts,
    lists, tuples and pydantic models) replaced by ``"<redacted>"`` (empty values stay as they are, so
    the output still says none was given), URL userinfo removed from every string. Pydantic models
    come back as their JSON-able dump; ``SecretStr``/``SecretBytes`` as ``"<redacted>"``."""
    if isinstance(obj, Mapping):
        return {k: (_hide(v) if is_secret_key(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, (list, tuple)):
        out = [redact(v) for v in obj]
        return out if isinstance(obj, list) else tuple(out)
    if type(obj).__name__ in ("SecretStr", "SecretBytes"):
        return REDACTED
    dump = getattr(obj, "model_dump", None)
    if callable(dump) and hasattr(type(obj), "model_fields"):  # a pydantic model
        return redact(dump(mode="json"))
    return obj


def _hide(value: Any) -> Any:
    if value is None or value == "" or value == {} or value == []:
        return value
    return REDACTED


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line safe to store: ``a.b.key=VALUE`` (a secret-named last key) becomes
    ``a.b.key=<redacted>``; a YAML mapping or list value (``storage_options={key: .., secret: ..}``)
    is redacted inside and written back in YAML flow style; URLs lose their userinfo."""
    import yaml

    out = []
    for arg in argv:
        arg = str(arg)
        key, sep, value = arg.partition("=")
        if sep and key and not key.startswith("-") and "://" not in key:
            if is_secret_key(key.rsplit(".", 1)[-1]):
                out.append(f"{key}={_hide(value)}")
                continue
            if value[:1] in "{[":
                try:
                    parsed = yaml.safe_load(value)
                except yaml.YAMLError:
                    parsed = None
                if isinstance(parsed, (dict, list)):
                    clean = redact(parsed)
                    if clean != parsed:
                        flow = yaml.safe_dump(clean, default_flow_style=True, width=10**9).strip()
                        out.append(f"{key}={flow}")
                        continue
        out.append(redact_text(arg))
    return out


def without_redacted(obj: Any) -> Any:
    """``obj`` with every entry whose value is ``"<redacted>"`` dropped: options read back from a
    stored (redacted) configuration then fall back on the environment's credentials (instance
    profile, ``AWS_ACCESS_KEY_ID``, ...) instead of sending the placeholder as a key."""
    if isinstance(obj, Mapping):
        return {k: without_redacted(v) for k, v in obj.items() if v != REDACTED}
    if isinstance(obj, list):
        return [without_redacted(v) for v in obj if v != REDACTED]
    return obj
