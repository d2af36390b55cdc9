"""Prepare the paper's datasets as TFDS ArrayRecord datasets, or list the builders and what is prepared.

    python -m pisam_jax.data.tfds prepare dis5k --manual_dir ~/downloads --data_dir ~/tensorflow_datasets
    python -m pisam_jax.data.tfds prepare all --manual_dir ~/downloads        # every dataset found there
    python -m pisam_jax.data.tfds prepare synthetic/train100_test20_size1024_seed0_detail1 --data_dir D
    python -m pisam_jax.data.tfds list [--data_dir D]

The manual folder holds the downloaded zip archives or the folders they extract to (``list`` says which folders
each dataset has); splits whose folders are absent are skipped with a warning. Bad input (a missing folder, an
unpaired or corrupt file, a size mismatch) prints one line naming it and exits with status 2, leaving nothing
half-written. ``--data_dir`` defaults to TFDS's (``$TFDS_DATA_DIR`` or ~/tensorflow_datasets).
"""

from __future__ import annotations

import os
import sys

from pisam_jax.cli import ArgumentParser


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _prepare(a) -> None:
    from pisam_jax.data import tfds as tfds_data
    from pisam_jax.data.datasets import DatasetError

    names = list(tfds_data.MANUAL_BUILDERS) if a.names == ["all"] else a.names
    for name in names:
        try:
            builder = tfds_data.prepare(name, a.data_dir, a.manual_dir, progress=a.progress, skip_bad=a.skip_bad,
                                        check=a.check) if name.split("/")[0] in tfds_data.MANUAL_BUILDERS \
                else tfds_data.prepare(name, a.data_dir, progress=a.progress)
        except DatasetError as e:
            if a.names == ["all"] and "no split of" in str(e):
                print(f"{name}: nothing in {a.manual_dir}; skipped", file=sys.stderr)
                continue
            raise
        splits = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
        print(f"{builder.name}: {splits} examples, {_size(os.fspath(builder.data_dir)) / 2 ** 20:.1f} MiB in "
              f"{builder.data_dir}", flush=True)


def _list(a) -> None:
    from pisam_jax.data import datasets
    from pisam_jax.data import tfds as tfds_data

    for name, cls in tfds_data.MANUAL_BUILDERS.items():
        print(f"{name}: {cls.__doc__.splitlines()[0]}")
        for split, ds in cls.SPLITS.items():
            spec = datasets.DATASETS[ds]
            print(f"  {split:<10} {ds:<16} {spec.image_dir} + {spec.gt_dir}")
    print("synthetic: " + tfds_data.Synthetic.__doc__.splitlines()[0])
    print("  train, test; configs train{n}_test{m}_size{s}_seed{k}_detail{d}")
    if a.data_dir is not None or os.environ.get("TFDS_DATA_DIR"):
        root = os.path.expanduser(a.data_dir or os.environ["TFDS_DATA_DIR"])
        print(f"prepared in {root}:")
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            for dirpath, _, files in os.walk(os.path.join(root, name)):
                if "dataset_info.json" in files and "incomplete" not in dirpath:
                    print(f"  {os.path.relpath(dirpath, root)}  {_size(dirpath) / 2 ** 20:.1f} MiB")


def main(argv=None) -> int:
    p = ArgumentParser(prog="python -m pisam_jax.data.tfds", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="prepare datasets as ArrayRecord files")
    pp.add_argument("names", nargs="+", help="builders: dis5k thin_object5k hrsod uhrsd big fss duts ecssd "
                                             "msra10k, all, or synthetic[/CONFIG]")
    pp.add_argument("--manual_dir", help="the downloaded archives or their extracted folders")
    pp.add_argument("--data_dir", help="where the TFDS datasets go (default: TFDS's)")
    pp.add_argument("--check", choices=("header", "full"), default="header",
                    help="header: read sizes from the headers; full: decode every file (finds truncated ones)")
    pp.add_argument("--skip_bad", action="store_true", help="leave bad samples out (counted) instead of stopping")
    pp.add_argument("--no_progress", dest="progress", action="store_false", help="no progress bars")
    pl = sub.add_parser("list", help="the builders, their splits and folders, and what is prepared")
    pl.add_argument("--data_dir")
    a = p.parse_args(argv)

    from pisam_jax.data.datasets import DatasetError
    from pisam_jax.data.images import ImageReadError

    try:
        _prepare(a) if a.command == "prepare" else _list(a)
    except (DatasetError, ImageReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
