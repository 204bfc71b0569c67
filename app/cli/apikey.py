"""``reco apikey create|list|revoke``: keys for ``reco serve``'s API (stored hashed in the metadata DB)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.cli._common import fail, load_settings, print_json

if TYPE_CHECKING:
    from app.db.apikeys import ApiKeyRepo

apikey_cli = typer.Typer(help="API keys of reco serve (scopes: read, write, admin).", no_args_is_help=True)


def _keys() -> ApiKeyRepo:
    from app.db.apikeys import ApiKeyRepo
    from app.services.method_common import session_factory_for

    return ApiKeyRepo(session_factory_for(load_settings()))


@apikey_cli.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what uses it.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: read, write, admin.")] = "read",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Create a key; it is printed once and only its hash is stored."""
    try:
        key, info = _keys().create(name, scopes)
    except ValueError as exc:
        fail(exc)
    if as_json:
        print_json({"id": info.id, "name": info.name, "scopes": sorted(info.scopes), "key": key})
        return
    typer.echo(f"key {info.id} ({info.name}, scopes {','.join(sorted(info.scopes))}) — shown once, keep it:")
    typer.echo(key)


@apikey_cli.command("list")
def list_keys(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Keys with their scopes and last use (never the key itself)."""
    rows: list[dict[str, Any]] = [
        {"id": k.id, "name": k.name, "prefix": k.prefix, "scopes": sorted(k.scopes), "created_at": k.created_at,
             "last_used_at": k.last_used_at, "revoked": k.revoked} for k in _keys().list()]
    if as_json:
        print_json(rows)
        return
    for r in rows:
        state = "revoked" if r["revoked"] else "active"
        scopes = ",".join(r["scopes"])
        typer.echo(f"{r['id']:>4} {r['name']:<24} reco_{r['prefix']}_…  {scopes:<17} {state}  "
                   f"last used {r['last_used_at'] or 'never'}")


@apikey_cli.command("revoke")
def revoke(which: Annotated[str, typer.Argument(help="Key id, name or prefix.")]) -> None:
    """Revoke keys (a server stops accepting them within 10 s)."""
    n = _keys().revoke(which)
    if n == 0:
        fail(f"no active key matches {which!r}", code=1)
    typer.echo(f"revoked {n} key(s)")


def register(cli: typer.Typer) -> None:
    cli.add_typer(apikey_cli, name="apikey")
