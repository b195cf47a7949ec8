"""`precompute cache list|gc|verify`: see what the activation cache holds, remove what nobody uses,
check every stored block."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

from precompute.store import ActivationStore


def _store(args) -> ActivationStore:
    import json

    return ActivationStore(args.store, json.loads(os.environ.get("PRECOMPUTE_STORE_OPTIONS", "{}")))


def cmd_list(args) -> int:
    entries = _store(args).entries()
    print(f"{'entry':<52} {'rows':>7} {'MiB':>9}  {'last used (UTC)':<16}  status")
    for e in entries:
        when = dt.datetime.fromtimestamp(e["last_used"], dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
        status = e["status"] + (f", {e['writers']} writer(s)" if e["writers"] else "") + (
            f", {len(e['stale_leases'])} stale lease(s)" if e["stale_leases"] else "")
        print(f"{e['entry']:<52} {e['rows']:>7} {e['bytes'] / 2**20:>9.2f}  {when:<16}  {status}")
        for problem in e["problems"]:
            print(f"    damaged: {problem}")
        for lease in e["stale_leases"]:  # holds nothing: gc removes it
            print(f"    stale lease: {lease}")
    damaged = sum(e["status"] != "ok" for e in entries)
    print(f"{len(entries)} entries, {sum(e['bytes'] for e in entries) / 2**20:.2f} MiB"
          + (f", {damaged} damaged: `precompute cache verify --repair` drops what is damaged" if damaged else ""))
    return 0


def cmd_verify(args) -> int:
    """Every block of every entry against its checksum; exit 1 while damage remains."""
    results = _store(args).verify(repair=args.repair)
    left = 0
    for r in results:
        still = (bool(r["damaged"]) and not args.repair) or (bool(r["key_problem"]) and not r["key_restored"])
        state = "DAMAGED" if still else ("repaired" if r["damaged"] or r["key_restored"] else "ok")
        left += still
        print(f"{r['entry']}: {state}; {r['verified']} chunks verified, {r['unverified']} unverified "
              "(written before checksums)")
        for chunk, why in r["damaged"].items():
            print(f"    {'dropped' if args.repair else 'damaged'} chunk {chunk}: {why}")
        if r["key_problem"]:
            print(f"    {'restored' if r['key_restored'] else 'damaged'}: {r['key_problem']}")
    print(f"{len(results)} entries checked; " + (f"{left} with damage left" if left else "no damage left")
          + ("" if args.repair or not left else ": run again with --repair to drop it (rows are recomputed)"))
    return 1 if left else 0


def cmd_gc(args) -> int:
    removed = _store(args).remove_unused(keep=args.keep, unused_for_s=args.unused_days * 86400,
                                         dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for rel in removed:
        print(f"{verb} {rel}")
    print(f"{verb} {len(removed)} entries or leftover chunks; kept everything used in the last "
          f"{args.unused_days:g} days and {len(args.keep)} entries named with --keep")
    return 0


def cmd_predict(args) -> int:
    from precompute.predict import load_model, predict_folder

    record = load_model(args.model, args.tracking_uri)
    table = predict_folder(record, args.images, tta=args.tta)
    table.to_csv(args.out, index=False)
    bad = table[table["status"] != "ok"]
    print(f"wrote {args.out}: {len(table) - len(bad)} images predicted, {len(bad)} not readable")
    for row in bad.itertuples():
        print(f"  skipped {row.path}: {row.status} ({row.reason})")
    return 0


def cmd_serve(args) -> int:
    from precompute.serving import serve

    serve(args.model_uri, args.port, args.host, args.image_root, args.allow_url, args.workers)  # does not return
    return 0


def cmd_rerun(args) -> int:
    """The recipe of an MLflow run again: same job, assets, partition and run config (pipelines.local)."""
    try:
        from pipelines.local import rerun
    except ImportError as exc:
        raise RuntimeError(f"precompute rerun needs the project's pipelines package ({exc}): run it from the "
                           "project folder, or pip install -e . there") from None
    rerun(args.run_id, args.tracking_uri)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="precompute")
    sub = parser.add_subparsers(dest="command", required=True)
    cache = sub.add_parser("cache", help="inspect and clean the activation cache").add_subparsers(
        dest="action", required=True)
    default_store = os.environ.get("PRECOMPUTE_STORE", os.path.join(os.environ.get("PRECOMPUTE_HOME", "var"), "activations"))
    for name, fn, text in (("list", cmd_list, "entries with rows, size and last use"),
                           ("gc", cmd_gc, "remove entries unused for a while, and crash leftovers"),
                           ("verify", cmd_verify, "check every stored block against its checksum")):
        p = cache.add_parser(name, help=text)
        p.add_argument("--store", default=default_store, help="path or fsspec URL (default: %(default)s)")
        p.set_defaults(fn=fn)
        if name == "gc":
            p.add_argument("--unused-days", type=float, default=30.0, help="remove entries unused this long")
            p.add_argument("--keep", action="append", default=[], help="an entry path to keep regardless")
            p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
        if name == "verify":
            p.add_argument("--repair", action="store_true",
                           help="drop damaged chunks (the next precompute recomputes their rows)")
    pred = sub.add_parser("predict", help="predict a folder of images with a trained model")
    pred.add_argument("--model", required=True, help="a model .pt file, or the MLflow run id of a finetuned stage")
    pred.add_argument("--images", required=True, help="folder of images (any layout)")
    pred.add_argument("--out", default="predictions.csv", help="CSV to write (default: %(default)s)")
    pred.add_argument("--tta", type=int, default=0, help="augmented views to average with the center crop")
    tracking_default = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///" + os.path.abspath(
        os.path.join(os.environ.get("PRECOMPUTE_HOME", "var"), "mlflow.db")))
    pred.add_argument("--tracking-uri", default=tracking_default,
                      help="MLflow tracking URI for a run id (default: $MLFLOW_TRACKING_URI)")
    pred.set_defaults(fn=cmd_predict)
    srv = sub.add_parser("serve", help="serve a logged model over HTTP (mlflow models serve, this environment)")
    srv.add_argument("-m", "--model-uri", required=True, help="models:/precompute-<arch>-cut<n>/<version>, runs:/...")
    srv.add_argument("-p", "--port", type=int, default=5000, help="port (default: %(default)s)")
    srv.add_argument("--host", help="interface to bind (mlflow's default: 127.0.0.1)")
    srv.add_argument("--workers", type=int, help="uvicorn workers (mlflow's default: 1)")
    srv.add_argument("--image-root", action="append", default=[],
                     help="a folder whose images clients may name by path (repeatable; also $PRECOMPUTE_SERVE_ROOTS)")
    srv.add_argument("--allow-url", action="append", default=[],
                     help="a URL prefix clients may name (repeatable; also $PRECOMPUTE_SERVE_URLS)")
    srv.set_defaults(fn=cmd_serve)
    again = sub.add_parser("rerun", help="launch the recipe an MLflow run logged again, on the local Dagster instance")
    again.add_argument("run_id", help="the MLflow run id of a recipe stage (or of the run grouping them)")
    again.add_argument("--tracking-uri", default=tracking_default, help="MLflow tracking URI (default: %(default)s)")
    again.set_defaults(fn=cmd_rerun)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
        # our errors say what to do next: the message alone, not a traceback (set PRECOMPUTE_DEBUG=1 for one)
        if os.environ.get("PRECOMPUTE_DEBUG"):
            raise
        print(f"precompute {args.command}: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
