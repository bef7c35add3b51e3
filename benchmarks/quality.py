"""Quality against bytes: every way a Quiver table can be searched, on real judgments.

For each BEIR collection under ../shared/eval (scifact, cranfield, limit-small) it embeds
the corpus once with the default model and `vectors.codecs: [float32, int8, binary]`
(tables are kept under benchmarks/.warehouse and reused when their spec is unchanged),
then runs `quiver eval --report` on it and prints one table: bytes per vector, nDCG@10,
recall@100, share of float32 nDCG@10 kept, and search latency p50/p99 per way.

    python benchmarks/quality.py                        # all three, default windows chunking
    python benchmarks/quality.py --sets limit-small     # one set
    python benchmarks/quality.py --chunking truncate    # sentence-transformers-style truncation
    python benchmarks/quality.py --html out/            # also one HTML page with a plot per set
    python benchmarks/quality.py --code pca-b1@24       # and a fitted first-stage code
                                                        # (vectors.code), rescored at 40/100/200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO.parent / "shared" / "eval"
WAREHOUSE = REPO / "benchmarks" / ".warehouse"
SETS = ("scifact", "cranfield", "limit-small")
CODECS = ["float32", "int8", "binary"]


def table_spec(name: str, chunking: str, code: str | None = None,
               code_sample: int = 4096) -> dict:
    """The job spec of one collection's benchmark table (`code`: `NAME@BYTES`)."""
    vectors: dict = {"codecs": CODECS}
    suffix = ""
    if code:
        code_name, _, nbytes = code.partition("@")
        vectors["code"] = {"name": code_name, "bytes": int(nbytes), "sample": code_sample}
        suffix = f"-{code_name}-{nbytes}"
    return {
        "kind": "embed",
        "source": {"uri": str(EVAL / name / "corpus.jsonl"), "id_field": "_id",
                   "text_fields": ["title", "text"]},
        "table": str(WAREHOUSE / f"{name}-{chunking}{suffix}.lance"),
        "chunking": {"mode": chunking},
        "vectors": vectors,
        "write": {"mode": "overwrite"},
    }


def ensure_table(name: str, chunking: str, code: str | None = None,
                 code_sample: int = 4096) -> str:
    """Embed the collection unless a table from the same spec already exists."""
    from jobs import api
    from schemas.spec import parse_spec

    spec = table_spec(name, chunking, code, code_sample)
    marker = Path(spec["table"][: -len(".lance")] + ".spec.json")
    table = spec["table"]
    if marker.is_file() and json.loads(marker.read_text()) == spec and Path(table).is_dir():
        print(f"[quality] reusing {table}", flush=True)
        return table
    summary = api.run(parse_spec(spec, origin=f"benchmark:{name}"))
    print(f"[quality] {name}: {summary.chunks} chunks, {summary.tokens} tokens in "
          f"{summary.embed_seconds} s", flush=True)
    marker.write_text(json.dumps(spec))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--chunking", default="windows", choices=("windows", "truncate"))
    parser.add_argument("--html", type=Path, help="Folder for one HTML report per set.")
    parser.add_argument("--json", type=Path, help="Write all reports to this JSON file.")
    parser.add_argument("--code", help="Also store a fitted first-stage code, NAME@BYTES "
                        "(e.g. pca-b1@24, opq-pq@24): the report adds it alone and "
                        "rescored at depths 40, 100 and 200")
    parser.add_argument("--code-sample", type=int, default=4096,
                        help="Chunks the code is fitted on")
    args = parser.parse_args()

    from jobs import api
    from jobs._quality import format_report, report_html
    from operators.embed import cpu_kind

    print(f"CPU: {cpu_kind()}", flush=True)
    WAREHOUSE.mkdir(parents=True, exist_ok=True)
    reports = {}
    for name in args.sets:
        if not (EVAL / name / "corpus.jsonl").is_file():
            print(f"[quality] skipping {name}: {EVAL / name} is absent")
            continue
        table = ensure_table(name, args.chunking, args.code, args.code_sample)
        reports[name] = api.quality(table, EVAL / name)
        if args.html:
            args.html.mkdir(parents=True, exist_ok=True)
            page = report_html(reports[name], title=f"Quiver quality: {name} ({args.chunking})")
            (args.html / f"{name}.html").write_text(page, encoding="utf-8")
    for name, report in reports.items():
        extra = f", ANN recall@10 vs exact {report['ann_recall@10']}" \
            if "ann_recall@10" in report else ""
        print(f"\n== {name} ({args.chunking} chunking, {report['queries']} queries{extra})")
        print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
