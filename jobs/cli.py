"""The `quiver` command line: parse, call `jobs.api`, render.

stdout carries results (exactly one JSON document with `--json`); progress, logs and
hints go to stderr. Exit codes: 0 success, 1 runtime failure, 2 usage or spec error.
Heavy imports (Ray, torch) happen inside commands so `--help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from schemas.errors import QuiverError, SpecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Quiver: embed text corpora into retrieval-ready Lance tables, on Ray.",
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
TableArg = Annotated[str, typer.Argument(help="Path or URI of a Quiver Lance table.")]
UsingOpt = Annotated[str, typer.Option(
    "--using", help="First-stage column: float, int8, binary, code (the table's fitted code), "
    "or auto (the most compact).")]
ModeOpt = Annotated[str, typer.Option(
    "--mode", help="dense (vectors), fts (BM25 on text) or hybrid (both, rank-fused).")]
VersionOpt = Annotated[str | None, typer.Option(
    "--version", help="Read this table version number or tag (time travel).")]
RescoreOpt = Annotated[int | None, typer.Option(
    "--rescore", min=1, help="Candidates per hit re-scored with the best column (1 = off; "
    "default 4 for int8/binary).")]
DepthOpt = Annotated[int | None, typer.Option(
    "--depth", min=1, help="Candidates re-scored, as a count instead of --rescore per hit.")]
RefineOpt = Annotated[int | None, typer.Option(
    "--refine", min=1, max=64, help="Rows per candidate a compact index refines: a "
    "Lance-indexed code (pca-rq) ranks them by its stored projection (default 4; 8 for "
    "steadier quality, about 10-15% more search time at 1M rows).")]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="Local model folder to use instead of the manifest's name."),
]
StorageOpt = Annotated[list[str] | None, typer.Option(
    "--storage-option", "-S", help="Object-store option KEY=VALUE for an s3://, gs:// or "
    "az:// table (repeatable): aws_endpoint, aws_region, aws_access_key_id, allow_http...; "
    "@FILE reads a profile: a YAML mapping of such options. Pass secrets through @FILE or "
    "the AWS_* environment variables: a KEY=VALUE argument is visible to anyone who can "
    "list processes (ps).")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", help="If a job is writing the table, wait for it (default: fail at once).")]


VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Show Ray's and Ray Data's own logs on stderr (default: in a "
    "log file next to the table, named at the end).")]


def _quiet(table: str, verbose: bool) -> Path | None:
    """Unless `verbose`, send Ray's logs to `logs/` beside a local table (or under
    ~/.cache/quiver for an object-store one); returns the file."""
    if verbose:
        return None
    import time

    from jobs._progress import quiet_ray_logs

    folder = Path.home() / ".cache" / "quiver" / "logs" if "://" in table \
        else Path(table).resolve().parent / "logs"
    path = folder / f"quiver-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    quiet_ray_logs(path)
    return path


def _said_logs(path: Path | None) -> None:
    if path is not None:
        print(f"[quiver] Ray's own logs: {path}", file=sys.stderr)


def _profile(path: Path) -> dict[str, str]:
    """A storage profile file: a YAML mapping of option names to values."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"--storage-option @{path}: cannot read it as YAML: {err}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise SpecError(f"--storage-option @{path}: expected a mapping of option names to "
                        "values")
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in data.items()}


def _storage(options: list[str] | None) -> dict[str, str]:
    """KEY=VALUE pairs (and @FILE profiles, YAML mappings) as Lance's storage_options, in
    the order given (later ones win); a malformed one is a usage error."""
    out: dict[str, str] = {}
    for item in options or []:
        if item.startswith("@"):
            out.update(_profile(Path(item[1:])))
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"--storage-option {item!r}: expected KEY=VALUE")
        out[key.strip()] = value
    return out


def _emit(data: object) -> None:
    print(json.dumps(data, indent=2, default=str))


def _emitted(data: object, as_json: bool) -> bool:
    """With `--json`, print the one document and say so (the caller renders otherwise)."""
    if as_json:
        _emit(data)
    return as_json


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    as_json: JsonOpt = False,
    wait: Annotated[bool, typer.Option(
        "--wait", help="If another run is writing the table, wait for it (default: fail "
        "at once, naming it).")] = False,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Try the spec: embed only the source's first N documents "
        "into a scratch table next to the spec's (X.lance -> X.try.lance), overwritten "
        "each time.")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a job spec on a local Ray (started in-process)."""
    from jobs import api

    job = api.load_spec(spec)
    logs = _quiet(job.table, verbose)
    if limit is not None:
        from jobs._dryrun import limited
        from operators.filesystems import beside

        job = limited(job, limit, beside(job.table, ".try.lance"))
        print(f"[quiver] --limit {limit}: the first {limit} documents into {job.table}",
              file=sys.stderr)
    summary = api.run(job, wait=wait).to_dict()
    _said_logs(logs)
    if as_json:
        _emit(summary)
        return
    _print_summary(summary)


def _print_summary(summary: dict) -> None:
    mb = summary["table_bytes"] / 1e6
    print(f"table      {summary['table']} (version {summary['version']}, {mb:.1f} MB)")
    print(f"documents  {summary['documents']} valid, {summary['rejects']} rejected"
          + (f" -> {summary['rejects_table']}" if summary["rejects_table"] else "")
          + (f"; {summary['excluded']} left out by the table's exclusion list"
             if summary.get("excluded") else ""))
    for reason, count in summary["reject_reasons"].items():
        print(f"             {count:6d}  {reason}")
    if summary.get("files"):
        skipped = ", ".join(f"{n} {suffix}" for suffix, n in summary["files_skipped"].items())
        print(f"files      {summary['files']} read" + (f"; not read: {skipped}" if skipped
                                                        else ""))
    print(f"chunks     {summary['chunks']}")
    if summary.get("reindex"):
        r = summary["reindex"]
        d = r["documents"]
        print(f"reindex    documents: {d['added']} added, {d['changed']} changed, "
              f"{d['deleted']} deleted; chunks: {r['added']} added, {r['changed']} changed, "
              f"{r['deleted']} deleted, {r['unchanged']} kept their vectors "
              f"({r['carried']} rewritten with new metadata); {r['embedded']} embedded"
              + ("" if not (d["added"] or d["changed"] or d["deleted"])
                 else ", in one commit"))
        if r.get("schema_change"):
            print(f"schema     {r['schema_change']}")
    print(f"shards     {summary['shards']} ({summary['shards_skipped']} already committed); "
          f"{summary.get('commits', 0)} checkpoint commit(s)"
          + (f", the first at {summary['first_commit_s']} s"
             if summary.get("first_commit_s") is not None else ""))
    print(f"embedding  {summary['tokens']} tokens in {summary['embed_seconds']} s: "
          f"{summary['tokens_per_s']} tokens/s, {summary['documents_per_s']} documents/s")
    if summary["truncated_tokens"]:
        print(f"truncated  {summary['truncated_tokens']} document tokens not embedded "
              "(chunking.mode: truncate)")
    print(f"index      {summary['index']} ({summary['index_seconds']} s)")
    if summary.get("profile"):
        print(f"profile    {_profile_line(summary['profile'])}")
    if summary.get("versions_cleaned"):
        print(f"cleanup    {summary['versions_cleaned']} old versions removed "
              "(checkpoints, write.retention_days)")
    print(f"time       {summary['seconds']} s")
    if summary.get("node_hours"):
        print(f"nodes      {_cost_line(summary['node_hours'], summary.get('cost'))}")


def _cost_line(node_hours: dict, cost: dict | None) -> str:
    """'cpu2 0.0123 h; cost 0.0025 USD (…per million documents, …per million tokens)'."""
    line = ", ".join(f"{kind} {hours:.4f} h" for kind, hours in node_hours.items())
    if cost:
        per = [f"{cost[key]:.4g} per million {unit}" for key, unit in
               (("per_million_documents", "documents"), ("per_million_tokens", "tokens"))
               if cost.get(key) is not None]
        line += f"; cost {cost['total']:.4g} {cost['currency']}" + (
            f" ({', '.join(per)})" if per else "")
        if cost["unpriced"]:
            line += f"; no price for {', '.join(cost['unpriced'])}"
    return line


def _profile_line(p: dict) -> str:
    """One line of where the time went: task-, actor- and driver-seconds per stage."""
    first = "" if p["first_block"] is None else f", first batch out at {p['first_block']:.1f} s"
    if p.get("actor_ready") is not None:
        early = "started while planning, " if p.get("actor_early") else ""
        first = (f", planned in {p['plan']:.1f} s, first actor ready at "
                 f"{p['actor_ready']:.1f} s ({early}loading took {p['actor_load']:.1f} s)"
                 f"{first}")
    return (f"Ray up in {p['ray_start']:.1f} s{first}; read {p['read']:.2f} s + tokenize "
            f"{p['tokenize']:.2f} s (tasks); forward {p['forward']:.2f} s, pool "
            f"{p['pool']:.2f} s, quantize {p['quantize']:.2f} s, idle {p['actor_idle']:.2f} s "
            f"({p['actors']} actor(s)); write {p['write']:.2f} s, commit {p['commit']:.2f} s")


@app.command()
def plan(
    spec: Annotated[Path, typer.Argument(help="Job spec (YAML).")],
    verbose: VerboseOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: the files, records, rejects, schema and actor layout a job would use, and
    its time estimated from a short calibration on a sample. Writes nothing."""
    from jobs import api

    job = api.load_spec(spec)
    _said_logs(_quiet(job.table, verbose))
    data = api.plan(job)
    if as_json:
        _emit(data)
        return
    print(f"action     {data['action']}")
    skipped = ", ".join(f"{n} {s}" for s, n in data["files_skipped"].items())
    print(f"source     {data['source']} ({data['format']}): {data['files_found']} file(s)"
          + (f"; not read: {skipped}" if skipped else ""))
    for path in data["files"][:5]:
        print(f"             {path}")
    print(f"records    {data['records']}: {data['documents']} documents, "
          f"{data['rejected']} rejected" + (f", {data['excluded']} excluded"
                                             if data["excluded"] else "")
          + f"; {data['shards']} shards")
    for reason, n in data["reject_reasons"].items():
        print(f"             {n:6d}  {reason}")
    for r in data["reject_sample"]:
        print(f"             e.g. {r['source']}:{r['position_kind']} {r['position']}: "
              f"{r['reason']}")
    print("metadata   " + (", ".join(f"{k}: {v}" for k, v in data["metadata_schema"].items())
                          or "none"))
    lay, m = data["layout"], data["model"]
    print(f"model      {m['name']} ({m['dim']}-d, {m['precision']}, {m['max_tokens']} tokens)")
    print(f"layout     {lay['actors']} actor(s) x {lay['threads']} thread(s), "
          f"{lay['cpus_per_actor']:g} CPU" + (f" + {lay['gpus_per_actor']:g} GPU"
                                              if lay["gpus_per_actor"] else "")
          + f" each, {lay['rows_per_block']} chunks per block; cluster "
          f"{lay['cluster']['cpus']:g} CPUs, {lay['cluster']['gpus']:g} GPUs")
    e = data["estimate"]
    if e.get("total_seconds") is not None:
        sec = e["seconds"]
        print(f"estimate   {e['total_seconds']:.0f} s: about {e['chunks']} chunks, "
              f"{e['tokens']} tokens at {e['actor_tokens_per_s']} tokens/s per actor "
              f"(calibrated on {e['documents_sampled']} documents)")
        print("             " + ", ".join(f"{k} {v:g} s" for k, v in sec.items()))
        if e.get("node_hours"):
            print(f"nodes      {_cost_line(e['node_hours'], e.get('cost'))} (the nodes up "
                  "now, for the estimated time)")


@app.command()
def demo(
    warehouse: Annotated[Path, typer.Option(help="Folder for the corpus and the table.")] = Path(
        "warehouse"
    ),
    verbose: VerboseOpt = False,
) -> None:
    """Embed the Python standard library's docstrings into a local table and query it."""
    from concurrent.futures import ThreadPoolExecutor

    from jobs import api
    from jobs._demo import DEMO_QUERIES, build_stdlib_corpus, demo_spec
    from jobs._ray import ensure_ray
    from schemas.spec import parse_spec

    logs = _quiet(str(warehouse / "stdlib.lance"), verbose)

    corpus = warehouse / "demo" / "stdlib-docs.jsonl"
    # Parsing the standard library (2-3 s of Python) runs while Ray starts (mostly a
    # wait on its processes).
    with ThreadPoolExecutor(1) as side:
        parsed = side.submit(build_stdlib_corpus, corpus)
        ensure_ray()
        n = parsed.result()
    print(f"[quiver] demo corpus: {n} module docstrings of Python {sys.version.split()[0]} "
          f"-> {corpus}", file=sys.stderr)
    spec = parse_spec(demo_spec(corpus, warehouse / "stdlib.lance"), origin="demo")
    summary = api.run(spec)
    _said_logs(logs)
    _print_summary(summary.to_dict())
    table = api.open_table(summary.table)
    for text in DEMO_QUERIES:
        print(f"\nquery: {text}")
        _print_hits(table.search(text, k=3))


@app.command()
def query(
    table: TableArg,
    text: Annotated[str, typer.Argument(help="The query text.")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, max=10_000, help="Hits to return.")] = 10,
    model: ModelOpt = None,
    using: UsingOpt = "auto",
    rescore: RescoreOpt = None,
    depth: DepthOpt = None,
    refine: RefineOpt = None,
    exact: Annotated[bool, typer.Option("--exact", help="Ignore ANN indices.")] = False,
    mode: ModeOpt = "dense",
    where: Annotated[list[str] | None, typer.Option(
        "--where", help="Filter clause, repeatable (AND): year>=2020, lang=en, "
        "'lang in en,de', x!=y; columns and values are checked against the table.")] = None,
    version: VersionOpt = None,
    qbnorm: Annotated[bool, typer.Option(
        "--qbnorm", help="Re-rank against the table's QB-Norm query bank (quiver table "
        "qbnorm).")] = False,
    storage_option: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search a table with a text query; prints id, score and a snippet per hit."""
    from jobs import api
    from operators.filters import parse_clauses

    filters = parse_clauses(where or [])
    columns = tuple(filters)
    hits = api.open_table(table, model=model, version=_version(version),
                          storage_options=_storage(storage_option)).search(
        text, k=k, mode=mode, using=using, rescore=rescore, depth=depth, exact=exact,
        where=filters, columns=columns, qbnorm=qbnorm, refine=refine)
    if as_json:
        _emit({"table": table, "query": text, "k": k, "mode": mode,
               "hits": [h.__dict__ for h in hits]})
        return
    _print_hits(hits)


def _version(version: str | None) -> int | str | None:
    """A version number when it is all digits, else a tag name."""
    return int(version) if version is not None and version.isdigit() else version


def _print_hits(hits: list) -> None:
    for rank, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())[:90]
        print(f"{rank:3d}  {h.score:.4f}  {h.id:<28}  {snippet}")


@app.command(name="eval")
def eval_(
    table: TableArg,
    beir: Annotated[Path, typer.Option("--beir", help="BEIR folder (queries, qrels/test.tsv).")],
    model: ModelOpt = None,
    using: UsingOpt = "auto",
    rescore: RescoreOpt = None,
    mode: ModeOpt = "dense",
    report: Annotated[bool, typer.Option(
        "--report", help="Score every way the table can be searched (codecs, ANN, "
        "Matryoshka dims): bytes/vector, nDCG@10, recall@100, share kept, latency.")] = False,
    html_out: Annotated[Path | None, typer.Option(
        "--html", help="With --report: also write an HTML page with a quality/bytes plot.",
        dir_okay=False)] = None,
    storage_option: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score a table on a BEIR folder: nDCG@10, recall@10, recall@100, MRR@10."""
    from jobs import api

    opts = _storage(storage_option)
    if report or html_out:
        _quality(table, beir, model=model, html_out=html_out, as_json=as_json,
                 storage_options=opts)
        return
    result = api.evaluate(table, beir, model=model, mode=mode, using=using, rescore=rescore,
                          storage_options=opts)
    if as_json:
        _emit(result)
        return
    for key in ("ndcg@10", "recall@10", "recall@100", "mrr@10"):
        print(f"{key:<11}{result[key]:.4f}")
    print(f"queries    {result['queries']} ({result['search_ms_per_query']} ms search each)")


@app.command()
def serve(
    warehouse: Annotated[str, typer.Option(
        "--warehouse", help="Folder or object-store prefix (s3://bucket/path, gs://…) of "
        "*.lance tables.")],
    host: Annotated[str, typer.Option("--host", help="Bind address; beyond loopback a "
                                      "token is required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="QUIVER_TOKEN", help="Bearer token every request must carry "
        "(also read from QUIVER_TOKEN).")] = None,
    refresh_s: Annotated[float | None, typer.Option(
        "--refresh-s", min=0, help="Seconds the server trusts its listing of the warehouse "
        "and each table's `current` version (default 2); a new table or a new current "
        "version shows within this time.")] = None,
    metrics_public: Annotated[bool, typer.Option(
        "--metrics-public", help="Serve GET /metrics without the token (a scraper on the "
        "network then needs none); by default a token set guards /metrics too.")] = False,
    keep_queries: Annotated[Path | None, typer.Option(
        "--keep-queries", help="Keep a uniform sample of each table's query texts in this "
        "folder (TABLE.queries.jsonl), for `quiver table qbnorm --queries`. Off by "
        "default: it writes what users typed to disk.")] = None,
    keep_queries_limit: Annotated[int, typer.Option(
        "--keep-queries-limit", min=1, help="Texts kept per table.")] = 2_000,
    storage_option: StorageOpt = None,
) -> None:
    """Serve the warehouse's tables over HTTP (OpenAPI docs at /docs, Prometheus metrics
    at /metrics)."""
    from jobs.server import serve as run_server

    run_server(warehouse, host=host, port=port, token=token, metrics_public=metrics_public,
               keep_queries=keep_queries, keep_queries_limit=keep_queries_limit,
               storage_options=_storage(storage_option),
               **({} if refresh_s is None else {"refresh_s": refresh_s}))


AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray dashboard URL (http://HOST:8265); default RAY_ADDRESS.")]
jobs_app = typer.Typer(no_args_is_help=True, help="Manage jobs submitted to a Ray cluster.")
app.add_typer(jobs_app, name="jobs")


def _need_address(address: str | None) -> str:
    from jobs.submit import dashboard_address

    resolved = dashboard_address(address)
    if not resolved:
        raise SpecError("no cluster given: pass --address http://HOST:8265 or set RAY_ADDRESS")
    return resolved


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    address: AddressOpt = None,
    follow_logs: Annotated[bool, typer.Option("--follow", help="Stream logs until done.")]
    = False,
    python: Annotated[str | None, typer.Option(
        "--python", help="Interpreter on the cluster (default: this one for a cluster on "
        "this machine, else `python`).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit a job to a Ray cluster (Ray Jobs API); without an address, run it here."""
    from jobs import submit as sub

    resolved = sub.dashboard_address(address)
    if not resolved:
        run(spec, as_json=as_json)
        return
    job_id = sub.submit(spec, address=resolved, python=python)
    if as_json and not follow_logs:
        _emit({"id": job_id, "address": resolved})
        return
    print(f"submitted {job_id} to {resolved}", file=sys.stderr)
    if follow_logs:
        for text in sub.follow(resolved, job_id):
            sys.stderr.write(text)
        final = sub.status(resolved, job_id)
        if as_json:
            _emit(final)
        else:
            print(f"{job_id} {final['status']}")
        if final["status"] != "SUCCEEDED":
            raise typer.Exit(1)
    else:
        print(job_id)


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """Jobs on the cluster, newest first."""
    from jobs import submit as sub

    rows = sub.list_jobs(_need_address(address))
    if as_json:
        _emit(rows)
        return
    for r in rows:
        print(f"{r['id']:<28} {r['status']:<10} {r['table']}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOpt = None, as_json: JsonOpt = False) -> None:
    """One job's status."""
    from jobs import submit as sub

    info_ = sub.status(_need_address(address), job_id)
    if as_json:
        _emit(info_)
        return
    print(f"{info_['id']} {info_['status']} {info_['message'] or ''}".rstrip())


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: AddressOpt = None,
              follow_logs: Annotated[bool, typer.Option("--follow")] = False) -> None:
    """A job's output; --follow streams it until the job ends."""
    from jobs import submit as sub

    resolved = _need_address(address)
    if follow_logs:
        for text in sub.follow(resolved, job_id):
            sys.stdout.write(text)
            sys.stdout.flush()
    else:
        sys.stdout.write(sub.logs(resolved, job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOpt = None) -> None:
    """Stop a running job."""
    from jobs import submit as sub

    stopped = sub.stop(_need_address(address), job_id)
    print(f"{job_id} {'stopping' if stopped else 'had already ended'}")


schedule_app = typer.Typer(no_args_is_help=True, help="Cron schedules kept in the warehouse.")
app.add_typer(schedule_app, name="schedule")
WarehouseOpt = Annotated[Path, typer.Option("--warehouse", help="Where schedules and their "
                                            "history are kept.")]


def _store(warehouse: Path):
    from jobs.schedule import ScheduleStore

    return ScheduleStore(warehouse)


@schedule_app.command("add")
def schedule_add(
    name: str,
    spec: Annotated[Path, typer.Argument(help="The job spec (YAML).")],
    cron: Annotated[str, typer.Option("--cron", help="5-field cron, UTC: '0 2 * * *'.")],
    warehouse: WarehouseOpt = Path("warehouse"),
    address: AddressOpt = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="Stop a run still going after this many seconds (recorded as "
        "timed out; the next slot runs).")] = None,
) -> None:
    """Run SPEC on a cron schedule (fired by `quiver scheduler`)."""
    s = _store(warehouse).add(name, cron, spec, address=address, timeout_s=timeout)
    print(f"schedule {s.name}: '{s.cron}' runs {s.spec}"
          + (f" on {s.address}" if s.address else " locally"))


@schedule_app.command("list")
def schedule_list(warehouse: WarehouseOpt = Path("warehouse"), as_json: JsonOpt = False) -> None:
    """Schedules, with the last slot each one fired."""
    from dataclasses import asdict

    rows = [asdict(s) for s in _store(warehouse).load().values()]
    if as_json:
        _emit(rows)
        return
    for r in rows:
        print(f"{r['name']:<20} {r['cron']:<15} last {r['last_slot']}  {r['spec']}")


@schedule_app.command("remove")
def schedule_remove(name: str, warehouse: WarehouseOpt = Path("warehouse")) -> None:
    """Delete a schedule (its history stays)."""
    _store(warehouse).remove(name)
    print(f"removed {name}")


@schedule_app.command("history")
def schedule_history(name: str, warehouse: WarehouseOpt = Path("warehouse"),
                     as_json: JsonOpt = False) -> None:
    """Past runs of a schedule: slot, start, end, status."""
    rows = _store(warehouse).history(name)
    if as_json:
        _emit(rows)
        return
    for r in rows:
        cost = r.get("cost") or {}
        print(f"{r['slot']}  started {r['started']}  ended {r.get('ended', '-')}  "
              f"{r['status']}" + (f"  {r['error']}" if r.get("error") else "")
              + (f"  cost {cost['total']:.4g} {cost['currency']}" if cost.get("total")
                 is not None else "")
              + ("  " + ", ".join(f"{k} {h:.4f} h" for k, h in r["node_hours"].items())
                 if r.get("node_hours") else ""))


@app.command()
def scheduler(
    warehouse: WarehouseOpt = Path("warehouse"),
    address: AddressOpt = None,
    poll: Annotated[float, typer.Option("--poll", min=1, help="Seconds between checks.")]
    = 20.0,
    once: Annotated[bool, typer.Option("--once", help="Fire what is due, wait, exit.")]
    = False,
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=1, max=65535, help="Serve Prometheus metrics (runs by "
        "outcome, durations, last success, cost) on 127.0.0.1:PORT/metrics.")] = None,
    cold: Annotated[bool, typer.Option(
        "--cold", help="Start a process and a Ray per local run instead of keeping the "
        "scheduler's own between runs (warm: runs go to kept processes joined to it, "
        "skipping imports and Ray's start; their logs are in WAREHOUSE/.quiver/logs).")]
    = False,
) -> None:
    """Fire due schedules, locally or to --address, until interrupted."""
    from jobs.schedule import Scheduler, WarmRay, default_runner

    store = _store(warehouse)
    metrics = None
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from jobs._metrics import SchedulerMetrics

        metrics = SchedulerMetrics(store.history())
        start_http_server(metrics_port, addr="127.0.0.1", registry=metrics.registry)
        print(f"scheduler metrics on http://127.0.0.1:{metrics_port}/metrics",
              file=sys.stderr)
    warm = None if cold else WarmRay(store.root / "logs")
    sched = Scheduler(store, default_runner(address, warm=warm), metrics=metrics, warm=warm,
                      default_address=address)
    try:
        if once:
            print(" ".join(sched.tick()) or "nothing due")
            sched.wait()
            return
        print(f"scheduler watching {warehouse} (every {poll:g} s)", file=sys.stderr)
        try:
            sched.serve(poll_s=poll)
        except KeyboardInterrupt:
            sched.wait()
    finally:
        if warm is not None:
            warm.close()


def _quality(table: str, beir: Path, *, model: str | None, html_out: Path | None,
             as_json: bool, storage_options: dict[str, str]) -> None:
    from jobs import api
    from jobs._quality import format_report, report_html

    result = api.quality(table, beir, model=model, storage_options=storage_options)
    if html_out:
        html_out.write_text(report_html(result, title=f"{table} on {beir}"), encoding="utf-8")
    if as_json:
        _emit(result)
        return
    print(format_report(result))
    if html_out:
        print(f"wrote {html_out}")


@app.command()
def info(table: TableArg, storage_option: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """Show a table's manifest, rows, versions and indices."""
    from jobs import api

    data = api.info(table, storage_options=_storage(storage_option))
    if as_json:
        _emit(data)
        return
    m = data["manifest"]
    print(f"table      {data['table']}")
    print(f"rows       {data['rows']} in {data['fragments']} fragments; "
          f"{data['rejects']} rejects")
    print(f"version    {data['version']} ({len(data['versions'])} versions)")
    print(f"model      {m['model']['name']} (sha256 {m['model']['weights_sha256'][:12]}…), "
          f"{m['model']['pooling']} pooling, normalize={m['model']['normalize']}, "
          f"dim {m['model']['dim']}, max {m['model']['max_tokens']} tokens")
    print(f"chunking   {m['chunking']['max_tokens']} tokens, overlap {m['chunking']['overlap']}")
    print(f"metric     {m['metric']}")
    v = m["vectors"]
    print(f"vectors    {', '.join(v['codecs'])} at {v['dims']} dims"
          + (" (Matryoshka truncation)" if v["truncated"] else "")
          + (" ; int8 ranges calibrated" if v["int8_low"] else ""))
    print(f"source     {m['source']['uri']}")
    print("indices    " + (", ".join(f"{i['name']} ({i['type']} on {','.join(i['fields'])})"
                                     for i in data["indices"]) or "none"))
    print("columns    " + "; ".join(data["columns"]))


table_app = typer.Typer(no_args_is_help=True, help="Maintain a table: stats, optimize, "
                        "delete, export, tags and rollback, rejects.")
app.add_typer(table_app, name="table")


@table_app.command("stats")
def table_stats(table: TableArg, storage_option: StorageOpt = None,
                as_json: JsonOpt = False) -> None:
    """Fragments, versions, rows not yet indexed, bytes per column; says when to optimize."""
    from jobs import api

    data = api.table_stats(table, _storage(storage_option))
    if _emitted(data, as_json):
        return
    print(f"table      {data['table']} (version {data['version']}, current "
          f"{data['current']}{', held' if data['held'] else ''})")
    print(f"rows       {data['rows']} in {data['fragments']} fragments "
          f"({data['small_fragments']} small); {data['deleted_rows']} deleted rows stored")
    print(f"versions   {data['versions']}")
    print("unindexed  " + (", ".join(f"{k} {v}" for k, v in data["unindexed_rows"].items())
                          or "no indices"))
    print("bytes      " + ", ".join(f"{k} {v / 1e6:.2f} MB"
                                    for k, v in data["column_bytes"].items()))
    print(f"hint       {data['hint']}")


@table_app.command("optimize")
def table_optimize(
    table: TableArg,
    retention_days: Annotated[float | None, typer.Option(
        "--retention-days", min=0, help="Drop versions older than this (tagged ones stay); "
        "the spec's write.retention_days default.")] = 7.0,
    keep_versions: Annotated[bool, typer.Option(
        "--keep-versions", help="Drop no version.")] = False,
    distributed_min_rows: Annotated[int | None, typer.Option(
        "--distributed-min-rows", min=0, help="From this many rows on, compact in Ray tasks "
        "(joining RAY_ADDRESS, else a local Ray) instead of in this process; the spec's "
        "index.distributed_min_rows default (1,000,000).")] = None,
    storage_option: StorageOpt = None, wait: WaitOpt = False, as_json: JsonOpt = False,
) -> None:
    """Compact small fragments, update indices incrementally, drop old versions."""
    from jobs import api
    from jobs._plan import progress

    data = api.optimize(table, storage_options=_storage(storage_option),
                        retention_days=None if keep_versions else retention_days, wait=wait,
                        distributed_min_rows=distributed_min_rows, progress=progress)
    if _emitted(data, as_json):
        return
    b, a = data["before"], data["after"]
    where = f", on {data['workers']} workers" if data["workers"] else ""
    print(f"fragments  {b['fragments']} -> {a['fragments']} "
          f"({data['fragments_rewritten']} rewritten{where})")
    print(f"versions   {b['versions']} -> {a['versions']} ({data['versions_removed']} removed)")
    print("unindexed  " + (", ".join(f"{k} {v}" for k, v in a["unindexed_rows"].items())
                          or "no indices"))
    print(f"current    {'moved to ' + str(a['current']) if data['current_moved'] else 'unchanged'}")


@table_app.command("refit")
def table_refit(
    table: TableArg,
    code: Annotated[str, typer.Option(
        "--code", help="The fitted first-stage code to add, NAME@BYTES: pca-b1@24, "
        "opq-pq@24, first-b1@48, pca-rq@24 (Lance's IVF_RQ on a PCA projection; see "
        "docs/search.md).")],
    sample: Annotated[int, typer.Option(
        "--sample", min=256, help="Stored vectors the code is fitted on.")] = 4096,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Put the new code in place of the table's own, in one commit, "
        "and report how the two compare on a sample of its rows.")] = False,
    storage_option: StorageOpt = None, wait: WaitOpt = False, as_json: JsonOpt = False,
) -> None:
    """Add (or with --replace, replace) a fitted first-stage code (vector_code) from the
    stored float vectors, in Ray tasks and one commit; nothing is embedded again."""
    from jobs import api
    from jobs._plan import progress
    from jobs._refit import overlap_line

    name, _, nbytes = code.partition("@")
    if not nbytes.isdigit():
        raise SpecError(f"--code {code!r}: write NAME@BYTES, for example pca-b1@24")
    data = api.refit(table, name=name, nbytes=int(nbytes), sample=sample, replace=replace,
                     storage_options=_storage(storage_option), wait=wait, progress=progress)
    if _emitted(data, as_json):
        return
    c = data["code"]
    print(f"{table}: {c['name']} at {c['nbytes']} B/vector on {data['rows']} rows "
          f"({data['fragments']} fragments) in {data['seconds']} s; version "
          f"{data['version']}, codebook {c['sha256'][:12]}")
    if data["replaced"]:
        old = data["replaced"]
        print(f"replaced   {old['name']} at {old['nbytes']} B/vector "
              f"(codebook {old['sha256'][:12]})")
        print(f"overlap    {overlap_line(data['overlap'])}, on {data['overlap']['rows']} "
              "sampled rows")
    if data["index"]:
        print(f"index      {data['index']}")


@table_app.command("qbnorm")
def table_qbnorm(
    table: TableArg,
    queries: Annotated[Path, typer.Option(
        "--queries", help="Queries for the bank: JSON lines with a 'text' field (BEIR's "
        "queries.jsonl, a train split) or one query per line.")],
    beta: Annotated[float, typer.Option("--beta", min=0.1, help="Softmax temperature.")]
    = 20.0,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Queries kept at most.")]
    = 2000,
    storage_option: StorageOpt = None, as_json: JsonOpt = False,
) -> None:
    """Build the table's QB-Norm query bank, for searches with --qbnorm (docs/search.md:
    it helped one of three sets measured; check with `quiver eval --report`)."""
    from jobs import api
    from jobs._plan import progress

    data = api.qbnorm_bank(table, queries, beta=beta, limit=limit,
                           storage_options=_storage(storage_option), progress=progress)
    if _emitted(data, as_json):
        return
    print(f"{table}: QB-Norm bank of {data['queries']} queries (beta {data['beta']:g}, "
          f"{data['activated']} chunks activated) in {data['seconds']} s -> {data['bank']}")


@table_app.command("delete")
def table_delete(
    table: TableArg,
    doc_id: Annotated[list[str] | None, typer.Option(
        "--doc-id", help="A document to remove (repeatable).")] = None,
    where: Annotated[list[str] | None, typer.Option(
        "--where", help="Or remove every document with a chunk this matches (repeatable, "
        "AND): year<2000, lang=xx.")] = None,
    allow_return: Annotated[bool, typer.Option(
        "--allow-return", help="Do not put the documents on the exclusion list: the next "
        "reindex embeds them again while the source has them.")] = False,
    storage_option: StorageOpt = None, wait: WaitOpt = False, as_json: JsonOpt = False,
) -> None:
    """Remove documents (all their chunks) in one commit; they stay out of later jobs."""
    from jobs import api
    from operators.filters import compile_filter, parse_clauses

    opts = _storage(storage_option)
    expr = None
    if where:
        from jobs._maintenance import open_dataset

        expr = compile_filter(parse_clauses(where), open_dataset(table, opts).schema)
    data = api.delete_documents(table, doc_ids=doc_id or (), where=expr,
                                keep_out=not allow_return, storage_options=opts, wait=wait)
    if _emitted(data, as_json):
        return
    print(f"deleted    {data['documents']} documents, {data['chunks_deleted']} chunks "
          f"(version {data['version_before']} -> {data['version']})")
    print(f"excluded   {data['note']}")


@table_app.command("include")
def table_include(
    table: TableArg,
    doc_id: Annotated[list[str], typer.Option("--doc-id", help="A document to let back in "
                                               "(repeatable).")],
    storage_option: StorageOpt = None, wait: WaitOpt = False, as_json: JsonOpt = False,
) -> None:
    """Take documents off the exclusion list; the next job embeds them again."""
    from jobs import api

    data = api.include(table, doc_id, storage_options=_storage(storage_option), wait=wait)
    if _emitted(data, as_json):
        return
    print(f"included   {data['removed']} documents ({data['still_excluded']} stay excluded)")


@table_app.command("export")
def table_export(
    table: TableArg,
    out: Annotated[Path, typer.Argument(help="The Parquet file to write.", dir_okay=False)],
    columns: Annotated[str | None, typer.Option(
        "--columns", help="Comma-separated columns (default: all).")] = None,
    version: VersionOpt = None, storage_option: StorageOpt = None, as_json: JsonOpt = False,
) -> None:
    """Write the table (its `current` version by default) to a Parquet file."""
    from jobs import api
    from jobs._plan import progress

    data = api.export_table(table, out, columns=columns.split(",") if columns else None,
                            version=_version(version), storage_options=_storage(storage_option),
                            progress=progress)
    if _emitted(data, as_json):
        return
    print(f"exported   {data['rows']} rows of version {data['version']} to {data['out']} "
          f"({data['bytes'] / 1e6:.1f} MB; {', '.join(data['columns'])})")


@table_app.command("tags")
def table_tags(table: TableArg, storage_option: StorageOpt = None,
               as_json: JsonOpt = False) -> None:
    """Tags and versions; `current` is what readers see."""
    from jobs import api

    data = api.list_tags(table, _storage(storage_option))
    if _emitted(data, as_json):
        return
    print(f"latest     {data['latest']}; current {data['current']}"
          + (" (held by a restore: jobs leave it until promote)" if data["held"] else ""))
    for name, v in data["tags"].items():
        print(f"tag        {name:<20} {v}")
    for v in data["versions"]:
        print(f"version    {v['version']:<6} {v['timestamp']}")


@table_app.command("tag")
def table_tag(table: TableArg, name: str, version: str, storage_option: StorageOpt = None,
              wait: WaitOpt = False, as_json: JsonOpt = False) -> None:
    """Create or move a tag: `quiver table tag T.lance before-migration 12`."""
    from jobs import api

    data = api.set_tag(table, name, _version(version), storage_options=_storage(storage_option),
                       wait=wait)
    if _emitted(data, as_json):
        return
    print(f"tag        {data['tag']} -> version {data['version']}")


@table_app.command("restore")
def table_restore(table: TableArg, version: str, storage_option: StorageOpt = None,
                  wait: WaitOpt = False, as_json: JsonOpt = False) -> None:
    """Point readers (`current`) at an older version or tag and hold them there."""
    from jobs import api

    data = api.restore(table, _version(version), storage_options=_storage(storage_option),
                       wait=wait)
    if _emitted(data, as_json):
        return
    print(f"current    {data['was']} -> {data['current']} (held: {data['hint']})")


@table_app.command("promote")
def table_promote(
    table: TableArg,
    version: Annotated[str | None, typer.Argument(help="Version or tag (default: latest).")]
    = None,
    storage_option: StorageOpt = None, wait: WaitOpt = False, as_json: JsonOpt = False,
) -> None:
    """Point `current` at a version (default: the latest) and release a restore's hold."""
    from jobs import api

    data = api.promote(table, _version(version), storage_options=_storage(storage_option),
                       wait=wait)
    if _emitted(data, as_json):
        return
    print(f"current    {data['was']} -> {data['current']} (jobs move it again as they finish)")


@table_app.command("rejects")
def table_rejects(
    table: TableArg,
    limit: Annotated[int, typer.Option("--limit", min=0, help="First rows to show.")] = 10,
    storage_option: StorageOpt = None, as_json: JsonOpt = False,
) -> None:
    """Records the jobs rejected: a count per reason, and the first ones with file and line."""
    from jobs import api

    data = api.rejects_summary(table, limit=limit, storage_options=_storage(storage_option))
    if _emitted(data, as_json):
        return
    print(f"rejects    {data['rejects']}")
    for reason, n in data["by_reason"].items():
        print(f"  {n:8d}  {reason}")
    for r in data["first"]:
        print(f"  {r['source']}:{r['position_kind']} {r['position']}  {r['record_id'] or '-'}"
              f"  {r['reason']}")


def main() -> None:
    """Entry point: map Quiver's own errors to one line and an exit code."""
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit codes here
        if isinstance(code, int) and code:
            sys.exit(code)
        from jobs._ray import release_ray

        release_ray()
    except QuiverError as err:
        print(f"Error: {err}", file=sys.stderr)
        if os.environ.get("QUIVER_DEBUG") != "1":
            print("(set QUIVER_DEBUG=1 for a traceback)", file=sys.stderr)
        else:
            raise
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as err:  # click usage errors carry their own exit code
        import click

        # typer 0.29 raises its own copy of click's usage errors, outside click's tree
        if isinstance(err, click.ClickException) or (
                isinstance(err, typer.TyperException) and hasattr(err, "show")):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
