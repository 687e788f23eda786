"""`edge-agent receiver run|keys|fsck`: the reference receiver (central side of the wire protocol), its receipt
key, and the check of its store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_agent import services
from edge_agent.cli.app import app, emit, fail, options, table
from edge_agent.config import ConfigError, ReceiverConfig, load_receiver_config
from edge_agent.i18n import _

receiver_app = typer.Typer(no_args_is_help=True, help="The reference receiver: verify, store and ack agents' files.")
app.add_typer(receiver_app, name="receiver")
keys_app = typer.Typer(no_args_is_help=True, help="The receiver's receipt key, which agents pin.")
receiver_app.add_typer(keys_app, name="keys")
hold_app = typer.Typer(no_args_is_help=True, help="Legal holds on evidence in the receiver's S3 bucket.")
receiver_app.add_typer(hold_app, name="hold")
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="receiver.toml (mqtt and receiver tables)")]


def _config(ctx: typer.Context, config: Path | None) -> ReceiverConfig:
    try:
        return load_receiver_config(config or options(ctx).config_path)
    except ConfigError as exc:
        fail(str(exc), code=2)
        raise


@receiver_app.command("run")
def receiver_run(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Run a receiver until SIGTERM. Several may share one store and a shared subscription."""
    services.receiver.serve(_config(ctx, config))


@keys_app.command("show")
def keys_show(ctx: typer.Context, config: ConfigOption = None) -> None:
    """The receipt key's id and public key: install it on every agent (mqtt.receiver_keys)."""
    key = services.receiver.receipt_key(_config(ctx, config))
    emit(ctx, key.as_dict(), _("receipt key id {key_id}\npublic key file {path}").format(key_id=key.key_id,
                                                                                       path=key.path)
         + f"\n{key.public_key_pem}")


@keys_app.command("rotate")
def keys_rotate(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Replace the receipt key. Pin the new public key on every agent BEFORE restarting the receiver; remove the
    old one from the agents after (docs/PROTOCOL.md, Receipts)."""
    key = services.receiver.receipt_key(_config(ctx, config), rotate=True)
    emit(ctx, key.as_dict(), _("receipt key {old_key_id} replaced by {key_id}\n"
                               "1. install {path} on every agent's mqtt.receiver_keys (keep the old key)\n"
                               "2. restart the receiver\n3. then remove {old_key_id} from the agents").format(
        old_key_id=key.old_key_id, key_id=key.key_id, path=key.path) + f"\n{key.public_key_pem}")


@receiver_app.command("fsck")
def receiver_fsck(
    ctx: typer.Context,
    store: Annotated[Path | None, typer.Option("--store", help="the receiver's store_dir (default: from --config)")]
    = None,
    repair: Annotated[bool, typer.Option("--repair", help="repair what is found (objects are quarantined)")]
    = False,
    config: ConfigOption = None,
) -> None:
    """Check a receiver store (stop its receivers first), or with [store] backend = "s3" in --config its bucket;
    exit 1 if anything is left to repair."""
    if store is not None:
        result = services.receiver.fsck(store, repair=repair)
    else:
        receiver_config = _config(ctx, config)
        if receiver_config.store.backend == "s3":
            if repair:
                fail(_("nothing in a WORM bucket can be repaired: run fsck without --repair and act on each "
                       "finding"), code=2)
            result = services.receiver.fsck_bucket(receiver_config)
        else:
            result = services.receiver.fsck(receiver_config.receiver.store_dir, repair=repair)
    rows = [[f["kind"], f["path"], _("yes") if f["repaired"] else _("no"), f["detail"]] for f in result.findings]
    bucket = result.store.startswith("s3://")
    verdict = (_("clean") if not rows else _("repaired")) if result.clean else (
        _("problems found") if bucket else _("problems found: run with --repair"))
    human = table(_("receiver store {store}: {objects} object(s) checked, {verdict}").format(
        store=result.store, objects=result.objects_checked, verdict=verdict),
        [_("finding"), _("path"), _("repaired"), _("detail")], rows)
    emit(ctx, result.as_dict(), human)
    if not result.clean:
        raise typer.Exit(1)


@hold_app.command("release")
def hold_release(
    ctx: typer.Context,
    request: Annotated[Path | None, typer.Option("--request", help="the platform's signed release request (JSON)")]
    = None,
    agent: Annotated[str | None, typer.Option("--agent", help="without --request: the agent whose chain releases "
                                                            "the file's case")] = None,
    file_id: Annotated[str | None, typer.Option("--file", help="without --request: the stored evidence file")] = None,
    config: ConfigOption = None,
) -> None:
    """Release the legal hold of one stored evidence file: on a request signed by a platform key
    (store.release_keys; unsigned, forged, stale and replayed requests are refused), or on a case_released
    annotation for the file's case in the agent's chain (--agent, --file). Exit 1 when refused."""
    result = services.receiver.release_hold(_config(ctx, config), request, agent=agent, file_id=file_id)
    emit(ctx, result, _("legal hold released: {agent}/{file} (request {id}, seq {seq} of {key}); its retention "
                        "lock stays until its date").format(agent=result["agent_id"], file=result["file_id"],
                                                            id=result["id"], seq=result["seq"],
                                                            key=result["key_id"]))
