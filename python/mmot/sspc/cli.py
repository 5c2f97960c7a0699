"""``mmot-sspc``: train, evaluate and reproduce SSPC.

    mmot-sspc train --config uci_quick [--resume | --overwrite] [--out DIR] [--set train.epochs=5 ...] [--nproc N]
    mmot-sspc eval --checkpoint runs/uci_quick/last.pt [--split test] [--json FILE]
    mmot-sspc reproduce [--quick] [--testbed concepts|uci] [--variants contrastive,multi_sk] [--seeds 5] [--jobs 2] [--out DIR]
                        [--resume | --overwrite]
    mmot-sspc convert-features IN.pkl OUT.npz [--config CFG] [--set data.pickle.n_video_tokens=48 ...]

``--config`` takes a YAML path or the name of a shipped config (``mmot-sspc configs`` lists them).
``python -m mmot.sspc`` is the same program, so that ``torchrun --nproc_per_node 2 -m mmot.sspc train
--config ...`` trains data-parallel on 2 processes (gloo on CPU, NCCL on CUDA, one GPU each);
``train --nproc N`` starts that torchrun itself on this machine. ``train.batch_size`` is the
global batch; ``--resume`` needs the number of processes the run was started with.
Checkpoints are read without unpickling code (tensors and plain containers only). Feature
pickles (``data.format: pickle``) are unpickled: only read pickles you trust, or convert them
once with ``convert-features`` and train on the ``.npz`` (``data.format: npz``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from mmot._extras import MissingExtra


def _parse_set(items: list[str]) -> dict:
    """``section.key=value`` overrides (value parsed as YAML) into nested dicts."""
    from mmot.sspc.config import yaml

    out: dict = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SystemExit(f"mmot-sspc: --set expects section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _table(results: dict) -> str:
    from mmot.sspc.evaluate import CLASS_METRICS, METRICS

    shown = [m for m in METRICS + CLASS_METRICS if any(m in res["mean"] for res in results.values())]
    lines = ["| split | pair | " + " | ".join(shown) + " |", "|---|---|" + "---:|" * len(shown)]
    for split, res in results.items():
        for pair, vals in list(res["pairs"].items()) + [("mean", res["mean"])]:
            lines.append(f"| {split} | {pair} | " + " | ".join(f"{vals[m]:.1f}" if m in vals else "" for m in shown) + " |")
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _launch(args) -> int:
    """``train --nproc N``: this command without ``--nproc`` under torchrun, N processes on this machine."""
    from mmot.sspc.distributed import env_world_size

    if env_world_size() > 1:
        print(f"mmot-sspc: error: --nproc: already one of {env_world_size()} torchrun processes; drop --nproc", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", str(args.nproc)]
    command += ["-m", "mmot.sspc", "train", "--config", args.config]
    if args.resume:
        command.append("--resume")
    if args.overwrite:
        command.append("--overwrite")
    if args.out:
        command += ["--out", args.out]
    for item in args.set:
        command += ["--set", item]
    if args.no_progress:
        command.append("--no-progress")
    env = dict(os.environ)
    # torchrun would set 1 thread and warn; share the cores instead (train.num_threads overrides).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    return subprocess.call(command, env=env)


def _train(args) -> int:
    """The train command in this process (one rank of a torchrun run, or the whole run)."""
    from mmot.sspc import distributed
    from mmot.sspc.checkpoint import CheckpointError
    from mmot.sspc.config import ConfigError, load_config
    from mmot.sspc.data import DataError
    from mmot.sspc.train import train

    try:
        cfg = load_config(args.config)
        overrides = _parse_set(args.set)
        if args.no_progress:
            overrides.setdefault("train", {})["progress"] = False
        if overrides:
            cfg = cfg.replace(**overrides)
        results = train(cfg, resume=args.resume, overwrite=args.overwrite, out_dir=args.out)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError) as exc:
        agreed = getattr(exc, "mmot_agreed", False)  # raised on every rank alike
        if not agreed or _rank() == 0:
            print(f"mmot-sspc: error: {exc}", file=sys.stderr)
        return distributed.finish(2, wait=agreed)
    if _rank() == 0:
        print(_table(results))
    return distributed.finish(0)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmot-sspc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a model from a YAML config")
    p_train.add_argument("--config", required=True, help="YAML file or shipped config name")
    mode = p_train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in the output directory from its last checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="start over in an output directory that already holds a run")
    p_train.add_argument("--out", help="output directory (default: train.out_dir)")
    p_train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p_train.add_argument("--no-progress", action="store_true")
    p_train.add_argument(
        "--nproc",
        type=_positive_int,
        default=None,
        metavar="N",
        help="train data-parallel on N local processes: runs torchrun (torch.distributed.run) with this command",
    )
    p_eval = sub.add_parser("eval", help="evaluate a checkpoint: retrieval for every modality pair")
    p_eval.add_argument("--checkpoint", required=True, help="a last.pt file or a run directory")
    p_eval.add_argument("--split", action="append", help="only these splits (default: all but train)")
    p_eval.add_argument("--json", help="also write the results to this JSON file")
    p_eval.add_argument("--device", default="cpu")
    p_rep = sub.add_parser("reproduce", help="contrastive vs + SSPC (Sinkhorn) vs + SSPC (Multi-SK) on the concepts and UCI test beds")
    p_rep.add_argument("--quick", action="store_true", help="small configs, about 5 minutes on a 2-core CPU")
    p_rep.add_argument("--out", default=None, help="output directory (default: sspc_reproduce[_quick])")
    p_rep.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5; the paired intervals need >= 2)")
    p_rep.add_argument("--testbed", action="append", choices=["concepts", "uci"], help="only this test bed (repeatable; default both)")
    p_rep.add_argument(
        "--variants",
        default=None,
        help=(
            "comma-separated variants (default contrastive,sinkhorn,multi_sk); also gc, bridge, separation, c3, "
            "multi_sk+gc, multi_sk+bridge, multi_sk+separation"
        ),
    )
    p_rep.add_argument("--q", default=None, help="comma-separated pair-noise levels (default: 0,0.2,0.4 concepts; 0,0.4 uci)")
    p_rep.add_argument(
        "--modality-dropout",
        type=float,
        default=None,
        help="probability that a training sample misses a modality (data.modality_dropout; default: the config's, 0)",
    )
    p_rep.add_argument("--jobs", type=int, default=None, help="runs in parallel, one thread each (default: the CPUs, at most 8)")
    p_rep.add_argument("--config", default=None, help="replace the test bed's config (with one --testbed)")
    p_rep.add_argument("--no-progress", action="store_true")
    rep_mode = p_rep.add_mutually_exclusive_group()
    rep_mode.add_argument("--overwrite", action="store_true", help="start over where the output directory already holds runs")
    rep_mode.add_argument("--resume", action="store_true", help="continue an interrupted reproduce (finished runs are evaluated)")
    p_conv = sub.add_parser(
        "convert-features",
        help="convert a trusted everything_at_once feature pickle into an .npz (read with data.format: npz, no unpickling)",
        description="Unpickling runs any code the file holds: convert only pickles you trust. Tokens are fitted with the "
        "data.pickle options of --config (and --set data.pickle.KEY=VALUE); the .npz then needs no unpickling.",
    )
    p_conv.add_argument("src", metavar="IN.pkl", help="a trusted clip-feature pickle")
    p_conv.add_argument("dst", metavar="OUT.npz", help="the .npz file to write")
    p_conv.add_argument("--config", default=None, help="config whose data.pickle options to use (default: the defaults)")
    p_conv.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    sub.add_parser("configs", help="list the shipped configs")
    args = parser.parse_args(argv)

    try:
        from mmot.sspc.checkpoint import CheckpointError
        from mmot.sspc.config import Config, ConfigError, load_config, shipped_configs
        from mmot.sspc.data import DataError
    except MissingExtra as exc:
        print(f"mmot-sspc: error: {exc}", file=sys.stderr)
        return 2

    try:
        if args.command == "configs":
            print("\n".join(shipped_configs()))
            return 0
        if args.command == "train":
            if args.nproc is not None and args.nproc > 1:
                return _launch(args)
            return _train(args)
        if args.command == "eval":
            from mmot.sspc.evaluate import evaluate_checkpoint

            results = evaluate_checkpoint(args.checkpoint, args.split, args.device)
            print(_table(results))
            if args.json:
                with open(args.json, "w", encoding="utf-8") as fh:
                    json.dump(results, fh, indent=2)
            return 0
        if args.command == "reproduce":
            from mmot.sspc.distributed import env_world_size
            from mmot.sspc.reproduce import TESTBEDS, VARIANTS, reproduce

            if env_world_size() > 1:
                raise ConfigError("reproduce runs its trainings in separate single processes (--jobs); start it without torchrun")

            try:
                q_levels = tuple(float(q) for q in args.q.split(",")) if args.q else None
            except ValueError:
                raise ConfigError(f"reproduce: --q expected comma-separated numbers, got {args.q!r}") from None
            reproduce(
                quick=args.quick,
                out_dir=args.out,
                n_seeds=args.seeds,
                config=args.config,
                progress=not args.no_progress,
                overwrite=args.overwrite,
                resume=args.resume,
                testbeds=tuple(dict.fromkeys(args.testbed)) if args.testbed else TESTBEDS,
                variants=tuple(v.strip() for v in args.variants.split(",")) if args.variants else VARIANTS,
                q_levels=q_levels,
                jobs=args.jobs,
                modality_dropout=args.modality_dropout,
            )
            return 0
        if args.command == "convert-features":
            from mmot.sspc.data import convert_feature_pickle

            cfg = load_config(args.config) if args.config else Config()
            overrides = _parse_set(args.set)
            if overrides:
                cfg = cfg.replace(**overrides)
            out = convert_feature_pickle(args.src, args.dst, cfg.data.pickle)
            print(f"wrote {out}: read it with data.format: npz, data.path: {out}")
            return 0
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError) as exc:
        print(f"mmot-sspc: error: {exc}", file=sys.stderr)
        return 2
    return 1  # pragma: no cover


if __name__ == "__main__":
    raise SystemExit(main())
