"""Regenerate the results tables of docs/benchmarks.md from the JSON lines under docs/bench/.

Usage: python scripts/bench_report.py  (rewrites the part of docs/benchmarks.md between the markers)

A file may hold mini-sglang's lines (as `.peer/device_peer.sh` writes them) beside ferry's, from one device
lease: each ferry row is then compared with the peer's row of the same model and workload in that file.
Older H100 files, which have none, are compared with the H100 anchors below.
"""

from __future__ import annotations

import glob
import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# mini-sglang on the device's H100 (2026-11-24), output tok/s: only for H100 rows without a peer line.
MINI_SGLANG_H100 = {
    ("qwen2.5-0.5b", "nanovllm"): 16019,
    ("qwen2.5-0.5b", "512x256"): 25923,
    ("qwen2.5-0.5b", "decode-heavy"): 25656,
    ("qwen3-0.6b", "nanovllm"): 17043,
    ("qwen3-0.6b", "512x256"): 22502,
    ("qwen3-0.6b", "decode-heavy"): 24685,
    ("llama-3.1-8b", "nanovllm"): 6662,
    ("llama-3.1-8b", "512x256"): 9016,
    ("llama-3.1-8b", "decode-heavy"): 14637,
}


def load() -> tuple[list[dict], dict[tuple[str, str, str], float]]:
    """ferry's rows, and the peer's output tok/s by (file, model, workload)."""
    rows, peer = [], {}
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "bench", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    if "workload" not in row:  # other benchmarks' lines (bench_vlm) have their own section
                        continue
                    row["_file"] = os.path.relpath(path, ROOT)
                    if str(row.get("engine", "")).startswith("mini-sglang"):
                        if "out_tok_s" in row:
                            peer[(row["_file"], row["model"], row["workload"])] = row["out_tok_s"]
                    elif "ferry" in row:
                        rows.append(row)
    return rows, peer


def model_name(row: dict) -> str:
    return os.path.basename(os.path.normpath(row.get("model_path") or "smollm2-135m"))


def table(rows: list[dict], peer: dict[tuple[str, str, str], float]) -> str:
    lines = [
        "| model | workload | device | ferry out tok/s | mini-sglang | ferry / peer | HF out tok/s | ferry/HF "
        "| floor tok/s | ferry of floor | peer of floor | settings | date | commit | source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name, ferry = model_name(r), r["ferry"]
        anchor = peer.get((r["_file"], name, r["workload"]))
        if anchor is None and "H100" in str(ferry.get("device", "")):
            anchor = MINI_SGLANG_H100.get((name, r["workload"]))
        hf = r.get("hf", {}).get("output_tok_s")
        roof = r.get("roofline", {})
        settings = " ".join(f"{k}={v}" for k, v in r.get("engine_settings", {}).items())
        cells = [
            name,
            r["workload"],
            ferry.get("device", ""),
            f"{ferry['output_tok_s']:,.0f}",
            f"{anchor:,}" if anchor else "",
            f"{ferry['output_tok_s'] / anchor:.2f}x" if anchor else "",
            f"{hf:,.0f}" if hf else "",
            f"{r['ferry_over_hf']:.1f}x" if hf else "",
            f"{roof['floor_output_tok_s']:,.0f}" if roof else "",
            f"{roof['fraction_of_floor']:.0%}" if roof else "",
            f"{anchor / roof['floor_output_tok_s']:.0%}" if roof and anchor else "",
            settings,
            r.get("date", ""),
            r.get("commit") or r.get("tag", ""),
            r["_file"],
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    with open(DOC) as f:
        text = f.read()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    with open(DOC, "w") as f:
        f.write(f"{head}{BEGIN}\n{table(*load())}\n{END}{tail}")


if __name__ == "__main__":
    main()
