#!/usr/bin/env python
"""Benchmark of the WSM merge (megatron_wsm.merge) against the I/O floor and a naive merge.

Builds K synthetic MoE checkpoints with megatron-core's torch_dist save (default 4 x 1 GiB of
bf16, a realistic mix: 64 MiB embedding/output items, 2-6 MiB attention and expert items, tiny
norms/router/bias items), then measures, each variant in its own child process so that peak RSS
is clean:

- ``io_floor``: read every input byte once and write the output's bytes once (+ fsync);
- ``merge_1``: tools/merge_wsm.py logic with 1 process; ``merge_2``: 2 processes (torchrun);
- ``merge_1_nocrc``: ``merge_1`` without the CRC-32 check of the input bytes (its cost is
  printed as the ratio merge_1 / merge_1_nocrc);
- ``naive``: load each checkpoint fully (torch DCP), average in memory in fp32, save (DCP);
- ``merge_1_halfK`` / ``merge_1_half`` (``--scaling``): 1 process on K/2 inputs and on
  half-size checkpoints, to show peak memory does not grow with K or model size.

Prints one table (time, ratios to the I/O floor and to the naive merge, peak RSS above start vs
the chunk size) and the goals from issue 6. All runs read inputs from a warm page cache (they
were just written; dropping caches needs privileges), so the floor is memory-bandwidth bound.

    python bench/merge_bench.py                      # 4 x 1 GiB, ~5 min on 2 cores
    python bench/merge_bench.py --size-gb 0.25 --k 4 --scaling
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from megatron_wsm.ports import free_port

ROOT = Path(__file__).resolve().parents[1]

MIB = 2**20


# ----------------------------------------------------------------------------- checkpoints


def spec_for(size_gb: float, dtype: str) -> dict[str, Any]:
    """A synthetic MoE spec of about ``size_gb`` GiB: layers scale, widths stay realistic."""
    hidden, ffn, experts, vocab = 1024, 1024, 8, 32000
    itemsize = 2 if dtype in ("bf16", "fp16") else 4
    fixed = 2 * vocab * hidden + hidden
    per_layer = 4 * hidden * hidden + experts * 3 * ffn * hidden + experts * hidden + 3 * hidden
    target = size_gb * 2**30 / itemsize
    if target < fixed + per_layer:  # small runs: shrink the vocabulary instead
        vocab = max(1024, int((target - per_layer) / (2 * hidden)))
        layers = 1
    else:
        layers = max(1, round((target - fixed) / per_layer))
    return {"num_layers": layers, "hidden": hidden, "ffn": ffn, "num_experts": experts,
            "vocab": vocab, "dtype": dtype}


def build(workdir: Path, name: str, k: int, spec: dict[str, Any]) -> list[Path]:
    """K checkpoints saved by one process (megatron-core torch_dist), reused if present."""

    paths = [workdir / name / f"iter_{(j + 1) * 100:07d}" for j in range(k)]
    todo = [p for p in paths if not (p / "wsm_manifest.json").exists()]
    if todo:
        job = {"save": [
            {"path": str(p), "seed": int(p.name[5:]), "iteration": int(p.name[5:]), "world": 1,
             "spec": spec}
            for p in todo
        ]}
        job_file = workdir / f"{name}.job.json"
        job_file.write_text(json.dumps(job))
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        subprocess.run([sys.executable, "-m", "megatron_wsm.testing.synthetic", str(job_file)],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    return paths


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- variants (child)


class PeakRSS:
    """RSS at start and the process's high-water mark (kernel ru_maxrss) at the end."""

    def __init__(self) -> None:
        import psutil

        self.start = psutil.Process().memory_info().rss

    def above_start(self) -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.start


def variant_io_floor(inputs: list[Path], out: Path, out_bytes: int) -> dict[str, Any]:
    rss = PeakRSS()
    buf = bytearray(64 * MIB)
    view = memoryview(buf)
    t0 = time.perf_counter()
    read = 0
    for path in inputs:
        for f in sorted(path.glob("*.distcp")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    read += n
    out.mkdir(parents=True)
    written = 0
    with open(out / "floor.bin", "wb", buffering=0) as fh:
        while written < out_bytes:
            written += fh.write(view[: min(len(view), out_bytes - written)])
        os.fsync(fh.fileno())
    return {"seconds": time.perf_counter() - t0, "rss": rss.above_start(), "read": read,
            "written": written}


def variant_merge(
    inputs: list[Path], out: Path, chunk_mb: float, verify_crc: bool = True
) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401 - imported before timing, as in naive

    from megatron_wsm import coefficients  # noqa: F401
    from megatron_wsm.merge import merge_checkpoints

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
        dist.barrier()
    rss = PeakRSS()
    coefs = ema_coefficients(len(inputs))
    t0 = time.perf_counter()
    report = merge_checkpoints(inputs, coefs, out, chunk_mb=chunk_mb, verify_crc=verify_crc)
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "rss": rss.above_start(), "read": report.bytes_read,
              "written": report.bytes_written, "buffers": report.buffer_bytes_per_rank}
    if dist.is_initialized():
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, result)
        dist.destroy_process_group()
        result = {"seconds": max(r["seconds"] for r in results),
                  "rss": max(r["rss"] for r in results), "read": report.bytes_read,
                  "written": report.bytes_written, "buffers": report.buffer_bytes_per_rank}
    return result


def variant_naive(inputs: list[Path], out: Path) -> dict[str, Any]:
    """Load each checkpoint fully, average in fp32 in memory, save with torch DCP."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load
    from torch.distributed.checkpoint.state_dict_saver import save

    rss = PeakRSS()
    coefs = ema_coefficients(len(inputs))
    t0 = time.perf_counter()
    acc: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path, coef in zip(inputs, coefs):
        md = FileSystemReader(str(path)).read_metadata()
        state = {
            k: torch.empty(v.size, dtype=v.properties.dtype)
            for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata) and v.properties.dtype.is_floating_point
        }
        load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
        for key, value in state.items():
            dtypes[key] = value.dtype
            if key in acc:
                acc[key].add_(value.float(), alpha=coef)
            else:
                acc[key] = value.float().mul_(coef)
        del state
    merged = {k: v.to(dtypes[k]) for k, v in acc.items()}
    del acc
    save(merged, storage_writer=FileSystemWriter(str(out)), no_dist=True)
    return {"seconds": time.perf_counter() - t0, "rss": rss.above_start(),
            "read": sum(dir_bytes(p) for p in inputs), "written": dir_bytes(out)}


def ema_coefficients(n: int) -> list[float]:
    """EMA weights: every input contributes (so every input byte is read, as the floor)."""
    from megatron_wsm.coefficients import MergeMethod

    return MergeMethod("ema", alpha=0.3).coefficients(n - 1)


def run_variant_child(args: argparse.Namespace) -> None:
    inputs = [Path(p) for p in args.inputs]
    out = Path(args.out)
    if args.variant == "io_floor":
        result = variant_io_floor(inputs, out, args.out_bytes)
    elif args.variant == "naive":
        result = variant_naive(inputs, out)
    else:
        result = variant_merge(inputs, out, args.chunk_mb, verify_crc=args.variant != "merge_nocrc")
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def launch(variant: str, inputs: list[Path], out: Path, *, ranks: int = 1, chunk_mb: float = 256,
           out_bytes: int = 0) -> dict[str, Any]:
    """Run one variant in fresh process(es) and return its measurements."""
    shutil.rmtree(out, ignore_errors=True)
    result_file = out.parent / f"{out.name}.result.json"
    script = [str(Path(__file__).resolve()), "--variant", variant, "--out", str(out),
              "--result", str(result_file), "--chunk-mb", str(chunk_mb),
              "--out-bytes", str(out_bytes), "--inputs", *map(str, inputs)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script]
    else:
        cmd = [sys.executable, *script]
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-5000:]}")
    result = json.loads(result_file.read_text())
    shutil.rmtree(out, ignore_errors=True)  # keep the disk (and page cache) for the next one
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="size of one checkpoint (GiB)")
    p.add_argument("--k", type=int, default=4, help="number of checkpoints merged")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--chunk-mb", type=float, default=256, help="merge --chunk-mb")
    p.add_argument("--workdir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints for another run")
    p.add_argument("--scaling", action="store_true",
                   help="also merge K/2 inputs and half-size inputs (peak RSS must not change)")
    p.add_argument("--skip-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs of each variant (interleaved; the best time is reported)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    # Internal: one variant in this process (launched by the driver).
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--out-bytes", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        run_variant_child(args)
        return 0

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="merge_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec = spec_for(args.size_gb, args.dtype)
    t0 = time.perf_counter()
    inputs = build(workdir, f"ckpt_{args.size_gb:g}g", args.k, spec)
    print(f"built {args.k} x {dir_bytes(inputs[0]) / 2**30:.2f} GiB checkpoints ({spec}) in "
          f"{time.perf_counter() - t0:.0f} s under {workdir}", flush=True)
    out = workdir / "out"
    half: list[Path] = []
    if args.scaling:
        half = build(workdir, f"ckpt_{args.size_gb / 2:g}g", args.k,
                     spec_for(args.size_gb / 2, args.dtype))
    written = launch("merge", inputs, out, chunk_mb=args.chunk_mb)["written"]
    variants: dict[str, dict[str, Any]] = {
        "merge_1": {"variant": "merge", "inputs": inputs, "chunk_mb": args.chunk_mb},
        "merge_2": {"variant": "merge", "inputs": inputs, "chunk_mb": args.chunk_mb, "ranks": 2},
        "io_floor": {"variant": "io_floor", "inputs": inputs, "out_bytes": written},
        "merge_1_nocrc": {"variant": "merge_nocrc", "inputs": inputs, "chunk_mb": args.chunk_mb},
    }
    if not args.skip_naive:
        variants["naive"] = {"variant": "naive", "inputs": inputs}
    if args.scaling:
        variants["merge_1_halfK"] = {"variant": "merge", "inputs": inputs[: max(2, args.k // 2)],
                                     "chunk_mb": args.chunk_mb}
        variants["merge_1_halfsize"] = {"variant": "merge", "inputs": half,
                                        "chunk_mb": args.chunk_mb}
    # Interleaved repeats, best time kept: the machine's background noise hits every variant.
    rows: dict[str, dict[str, Any]] = {}
    for _ in range(args.repeat):
        for name, v in variants.items():
            r = launch(v["variant"], v["inputs"], out, ranks=v.get("ranks", 1),
                       chunk_mb=v.get("chunk_mb", 256), out_bytes=v.get("out_bytes", 0))
            best = rows.setdefault(name, r)
            best["seconds"] = min(best["seconds"], r["seconds"])
            best["rss"] = max(best["rss"], r["rss"])
            print(f"  {name}: {r['seconds']:.2f} s, peak RSS +{r['rss'] / MIB:.0f} MiB", flush=True)
    report(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    floor = rows["io_floor"]["seconds"]
    naive = rows.get("naive", {}).get("seconds")
    chunk = args.chunk_mb * MIB
    print(f"\nK={args.k} x {args.size_gb:g} GiB {args.dtype}, --chunk-mb {args.chunk_mb:g}, "
          f"{os.cpu_count()} CPUs, warm page cache, best of {args.repeat}\n")
    print("| variant | time (s) | / I/O floor | naive / this | read (GiB) | written (GiB) "
          "| peak RSS above start (MiB) | RSS / chunk |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        speedup = f"{naive / r['seconds']:.2f}" if naive else "-"
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / floor:.2f} | {speedup} | "
              f"{r['read'] / 2**30:.2f} | {r['written'] / 2**30:.2f} | {r['rss'] / MIB:.0f} | "
              f"{r['rss'] / chunk:.2f} |")
    m1, m2 = rows["merge_1"], rows["merge_2"]
    print(f"\n2 ranks vs 1 rank: {m1['seconds'] / m2['seconds']:.2f}x faster")
    if "merge_1_nocrc" in rows:
        ratio = m1["seconds"] / rows["merge_1_nocrc"]["seconds"]
        print(f"CRC-32 check of the inputs: merge_1 / merge_1_nocrc = {ratio:.2f}")
    print("goals (issue 6): merge/floor <= 1.3 -> "
          f"{m1['seconds'] / floor:.2f} (1 rank), {m2['seconds'] / floor:.2f} (2 ranks)")
    if naive:
        print(f"  naive/merge >= 1 with 1 rank -> {naive / m1['seconds']:.2f}; "
              f">= 1.5 with 2 ranks -> {naive / m2['seconds']:.2f}")
    limit = (2 * chunk + 200 * MIB) / MIB
    worst = max(r["rss"] for n, r in rows.items() if n.startswith("merge")) / MIB
    print(f"  peak RSS above start <= 2 chunks + 200 MiB = {limit:.0f} MiB -> worst merge "
          f"{worst:.0f} MiB (naive: {rows.get('naive', {}).get('rss', 0) / MIB:.0f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
