"""Run every benchmarks/bench_*.py, gather their JSON in benchmarks/results/, summarise.

`make bench` calls this. Each benchmark script runs in its own process (a crash or a
hang in one does not stop the others) with `--json PATH`: it writes one JSON object
there (or, if it ignores the flag, prints it as the last line of its stdout). The
driver adds what the reader of Appendix B needs to trust a number, the hardware and
the date, and writes `benchmarks/results/<bench>.<hardware>.json`, so results from a
CPU laptop and from an H100 sit side by side, each labelled with its machine.

    python benchmarks/run_all.py                 # every benchmark
    python benchmarks/run_all.py --only model    # bench_model.py alone
    python benchmarks/run_all.py --list          # what would run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def hardware() -> dict[str, object]:
    """Describe this machine: CPU model and cores, GPU names, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(
            r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE
        )
        cpu = names[0].strip() if names else cpu
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": gpus,
        "label": f"{len(gpus)}x {gpus[0]}" if gpus else f"CPU ({cpu})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def slug(label: str) -> str:
    """Return a file-name-safe hardware label: "1x NVIDIA H100" -> "1x-nvidia-h100"."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:60]


def run_one(script: Path, timeout: float) -> dict[str, object]:
    """Run one benchmark script; return its JSON payload, or an error record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, str(script), "--json", str(out)],
                check=False, capture_output=True, text=True, timeout=timeout,
                cwd=HERE.parent,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        seconds = time.perf_counter() - start
        sys.stderr.write(proc.stderr[-4000:])
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {"error": f"exit code {proc.returncode}: {tail}", "seconds": seconds}
        if out.is_file():
            payload = json.loads(out.read_text())
        else:
            payload = last_json_line(proc.stdout)
            if payload is None:
                return {
                    "error": "wrote no JSON (--json PATH or stdout)",
                    "seconds": seconds,
                }
    payload.setdefault("seconds", seconds)
    return payload


def last_json_line(stdout: str) -> dict | None:
    """Return the last stdout line that parses as a JSON object, or the whole stdout."""
    for text in [stdout, *reversed(stdout.strip().splitlines())]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def summarise(name: str, result: dict[str, object]) -> list[str]:
    """Return printable lines: the scalar results of one benchmark, or its error."""
    if "error" in result:
        return [f"{name:<18} FAILED: {result['error']}"]
    body = result.get("results", result)
    lines = [f"{name:<18} ({result.get('seconds', 0):.0f} s)"]
    for key, value in flatten(body).items():
        if isinstance(value, float):
            lines.append(f"  {key:<44} {value:,.4g}")
        elif isinstance(value, (int, str)) and len(str(value)) < 40:
            lines.append(f"  {key:<44} {value}")
    return lines[:25]


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Flatten nested dicts into "a.b.c" keys (lists are left out of the summary)."""
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in value.items():
        if key in ("hardware", "date", "seconds", "benchmark"):
            continue
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; return 0 if all succeeded, 1 if any failed."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--only", nargs="*", default=None,
                        help="benchmarks to run (model, bench_model, ...)")  # fmt: skip
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per benchmark"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--dir", type=Path, default=HERE, help="where bench_*.py are")
    parser.add_argument("--list", action="store_true", help="list benchmarks and exit")
    args = parser.parse_args(argv)

    scripts = sorted(args.dir.glob("bench_*.py"))
    if args.only:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in args.only}
        scripts = [s for s in scripts if s.stem in wanted]
    if args.list or not scripts:
        print("\n".join(s.name for s in scripts) or "no benchmarks/bench_*.py found")
        return 0 if scripts or args.list else 1

    machine = hardware()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    args.results.mkdir(parents=True, exist_ok=True)
    print(f"hardware: {machine['label']}, {machine['cpu_cores']} cores; {date}")
    failed = 0
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        result = run_one(script, args.timeout)
        result.setdefault("benchmark", name)
        result.setdefault("hardware", machine)
        result.setdefault("date", date)
        print("\n".join(summarise(name, result)))
        if "error" in result:  # keep the last good result of this machine
            failed += 1
            continue
        path = args.results / f"{script.stem}.{slug(machine['label'])}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(path)
        print(f"  -> {path}")
    print(f"{len(scripts) - failed} of {len(scripts)} benchmarks succeeded")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
