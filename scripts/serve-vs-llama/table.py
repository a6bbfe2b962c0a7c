"""Markdown table of every `starlift loadtest` JSON in a results folder (compare.sh's), per
concurrency level; the ratio is each row's throughput over the first llama-server row of its level."""

import glob
import json
import re
import sys


def ms(seconds):
    return "-" if seconds is None else f"{1000 * seconds:,.0f}"


def main(folder: str) -> None:
    rows: dict[int, dict] = {}
    for f in sorted(glob.glob(f"{folder}/*-c*.json")):
        label, c = re.match(r".*/(.+)-c(\d+)\.json", f).groups()
        with open(f) as fh:
            rows.setdefault(int(c), {})[label] = json.load(fh)
    print("| variant | C | tok/s | vs llama-server | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | 5xx |")
    print("|---|---|---|---|---|---|---|")
    for c in sorted(rows):
        llama = [k for k in rows[c] if k.startswith("llama")]
        ref = rows[c][llama[0]] if llama else None
        for label, s in sorted(rows[c].items()):
            tps = s["throughput_tokens_per_s"]
            ratio = f"{tps / ref['throughput_tokens_per_s']:.2f}x" if ref else "-"
            print(f"| {label} | {c} | {tps:.1f} | {ratio} | {ms(s['ttft_p50_s'])} / {ms(s['ttft_p99_s'])} | "
                  f"{ms(s['itl_p50_s'])} / {ms(s['itl_p99_s'])} | {s['server_errors_5xx']} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results")
