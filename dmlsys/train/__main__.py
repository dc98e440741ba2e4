"""``python -m dmlsys.train``: train a Fashion-MNIST model in this process and store it.

Examples::

    python -m dmlsys.train --arch mlp --epochs 10
    python -m dmlsys.train --arch cnn --channels 32,64 --dense 128 --epochs 4 --batch 128
    python -m dmlsys.train --arch-json '{"kind": "mlp", "hidden": [512]}' --limit 5000 --no-save
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import TrainError


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dmlsys.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("architecture")
    a.add_argument("--arch", choices=["mlp", "cnn"], default="mlp", help="model kind (default mlp)")
    a.add_argument("--hidden", type=_ints, help="MLP hidden sizes, e.g. 256,128")
    a.add_argument("--channels", type=_ints, help="CNN conv channels, e.g. 32,64")
    a.add_argument("--dense", type=int, help="CNN dense layer width")
    a.add_argument("--arch-json", help="the whole architecture as JSON (overrides the above)")
    h = p.add_argument_group("training")
    h.add_argument("--epochs", type=int, default=5)
    h.add_argument("--batch", type=int, default=128, help="global batch size")
    h.add_argument("--lr", type=float, default=1e-3)
    h.add_argument("--optimizer", choices=["adam", "sgd", "momentum"], default="adam")
    h.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    h.add_argument("--weight-decay", type=float, default=0.0)
    h.add_argument("--augment", action="store_true", help="random horizontal flips")
    h.add_argument("--seed", type=int, default=0)
    d = p.add_argument_group("data and output")
    d.add_argument("--data", help="directory with the four IDX .gz files (default: search)")
    d.add_argument("--limit", type=int, help="use only the first N training samples")
    d.add_argument("--test-limit", type=int, help="use only the first N test samples")
    d.add_argument("--store", help="model store directory (default $DMLSYS_STORE or .dmlsys/models)")
    d.add_argument("--name", help="model name in the store (default fmnist-<kind>)")
    d.add_argument("--no-save", action="store_true", help="do not save the model to the store")
    d.add_argument("--checkpoint-dir", help="write a checkpoint each epoch here and resume from it")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("--json", metavar="FILE", help="write the per-epoch rows and the card as JSON")
    return p.parse_args(argv)


def arch_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.arch_json:
        return json.loads(args.arch_json)
    arch: dict[str, Any] = {"kind": args.arch}
    if args.arch == "mlp" and args.hidden is not None:
        arch["hidden"] = args.hidden
    if args.arch == "cnn" and args.channels is not None:
        arch["channels"] = args.channels
    if args.arch == "cnn" and args.dense is not None:
        arch["dense"] = args.dense
    return arch


def epoch_table(history: list, title: str) -> Table:
    table = Table(title=title)
    for col in ("epoch", "train loss", "train acc", "test loss", "test acc", "seconds", "samples/s"):
        table.add_column(col, justify="right")
    for h in history:
        table.add_row(str(h.epoch), f"{h.loss:.4f}", f"{h.train_accuracy:.4f}", f"{h.test_loss:.4f}",
                      f"{h.test_accuracy:.4f}", f"{h.seconds:.1f}", f"{h.samples_per_s:,.0f}")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    from . import data, models
    from .store import ModelStore
    from .trainer import Hyperparams, train_model

    try:
        arch = arch_from_args(args)
        models.normalize(arch)  # fail on a bad architecture before loading any data
        hp = Hyperparams(lr=args.lr, batch_size=args.batch, epochs=args.epochs, optimizer=args.optimizer,
                         schedule=args.schedule, weight_decay=args.weight_decay, augment=args.augment,
                         seed=args.seed)
        ds = data.load(args.data, limit=args.limit, test_limit=args.test_limit)
        console.print(f"data {ds.source}: {ds.num_train} train / {ds.num_test} test, fingerprint {ds.fingerprint}")
        store = None if args.no_save else ModelStore(args.store)
        result = train_model(
            arch, hp, dataset=ds, store=store, model_name=args.name, checkpoint_dir=args.checkpoint_dir,
            progress=False if args.no_progress else None,
            on_epoch=lambda h: console.print(f"epoch {h.epoch}: loss {h.loss:.4f}, test accuracy {h.test_accuracy:.4f}"),
        )
    except (TrainError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    console.print(epoch_table(result.history, f"{result.card['arch']}"))
    if result.version is not None:
        console.print(f"saved {result.card['name']} version {result.version} to {store.root}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"history": [dataclasses.asdict(h) for h in result.history], "card": result.card}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
