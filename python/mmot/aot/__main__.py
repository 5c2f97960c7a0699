"""``python -m mmot.aot``: compile every Triton kernel configuration for sm_80 and sm_90; exit 1 on a failure."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from mmot.aot import calls, report
from mmot.aot.build import Build, build
from mmot.aot.capture import SM_COUNTS, Specialization, specializations

# The specialisations the pool's workers build, inherited through fork (JIT functions do not pickle).
_pending: list[Specialization] = []


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mmot.aot", description=__doc__.splitlines()[0].strip("`"))
    parser.add_argument("--arch", nargs="+", type=int, choices=sorted(SM_COUNTS), default=sorted(SM_COUNTS), help="compute capabilities")
    parser.add_argument("--all", action="store_true", help="the full sweep (default: the sample CI compiles; see mmot.aot.calls)")
    parser.add_argument("--only", nargs="+", metavar="TEXT", help="only calls whose op or label contains one of these")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)), help="parallel builds (default: the cores)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every build as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the resource table as a markdown section")
    return parser.parse_args(argv)


def capture(arch: int, chosen: list[calls.Call]) -> list[Specialization]:
    """The distinct specialisations the chosen calls ask for on ``arch``, in first-asked order."""
    with specializations(arch) as asked:
        for call in chosen:
            call.run()
    return list({spec.key: spec for spec in asked}.values())


def build_all(specs: list[Specialization], jobs: int, progress=None) -> list[Build]:
    _pending[:] = specs
    results: list[Build | None] = [None] * len(specs)
    with multiprocessing.get_context("fork").Pool(max(1, jobs)) as pool:
        for done, (index, result) in enumerate(pool.imap_unordered(_indexed, range(len(specs)))):
            results[index] = result
            if progress:
                progress(done + 1, len(specs), result)
    return [r for r in results if r is not None]


def _indexed(index: int) -> tuple[int, Build]:
    return index, build(_pending[index])


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    chosen = [c for c in calls.every_call() if args.all or c.sampled]
    if args.only:
        chosen = [c for c in chosen if any(t in c.op or t in c.label for t in args.only)]
    start = time.perf_counter()
    specs = [spec for arch in args.arch for spec in capture(arch, chosen)]
    print(f"{len(chosen)} launcher calls ask for {len(specs)} distinct builds over sm_{', sm_'.join(map(str, args.arch))}", file=sys.stderr)

    def progress(done: int, total: int, result: Build) -> None:
        if not result.ok:
            what = f"sm_{result.arch} {result.kernel} {result.config}"
            print(f"  FAILED {what}: {'; '.join(result.problems)} {result.error or ''}", file=sys.stderr)
        if done % 25 == 0 or done == total:
            print(f"  {done}/{total} built, {time.perf_counter() - start:.0f} s", file=sys.stderr)

    builds = build_all(specs, args.jobs, progress)
    seconds = time.perf_counter() - start
    summary = report.summary(builds)
    print(summary)
    print(f"{len(builds)} builds in {seconds:.0f} s, {sum(not b.ok for b in builds)} failed")
    if args.json:
        args.json.write_text(json.dumps({"calls": len(chosen), "seconds": seconds, "builds": [asdict(b) for b in builds]}, indent=1))
    if args.markdown:
        args.markdown.write_text(report.markdown(builds, seconds, sys.argv[1:] if argv is None else argv))
    return 1 if any(not b.ok for b in builds) else 0


if __name__ == "__main__":
    sys.exit(main())
