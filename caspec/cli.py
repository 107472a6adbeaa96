"""The `caspec` command line: thin click commands over the load / plan / execute API.

Data goes to stdout (plan tables, JSON, schema); logs, progress and errors go to stderr.
Exit codes: 0 done, 1 a step failed, 2 bad spec or usage, 3 stopped at a review gate, 4 differs from the
lock (``run --frozen``, ``lock --check``), 130 interrupted.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import EXIT_INTERRUPTED, CaspecError, UsageError


def _err(text: str) -> None:
    click.echo(text, err=True)


def _guard(fn: Callable[..., int | None]) -> Callable[..., None]:
    """Turn caspec errors into rendered messages and exit codes; never show a traceback for them."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = fn(*args, **kwargs) or 0
        except CaspecError as exc:
            _err(exc.render())
            code = exc.exit_code
        except KeyboardInterrupt:
            _err("interrupted: finished steps are kept in the store; unfinished ones left nothing behind")
            code = EXIT_INTERRUPTED
        sys.exit(code)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


#: where a command with no spec and no --store looks for a store, in order (`make demo` keeps its store
#: beside the shipped specs, in specs/.caspec)
STORE_PLACES = (Path(".caspec"), Path("specs") / ".caspec")


def _store_for(loaded: Any | None, store: str | None) -> Any:
    from .store import open_store

    path = store or os.environ.get("CASPEC_STORE")
    if path:  # a directory, or an fsspec URL such as s3://bucket/prefix (kept a str: Path would eat "//")
        if "://" in path:
            return open_store(path)
        return open_store(_store_folder(Path(path), "--store" if store else "CASPEC_STORE"))
    if loaded is None:
        found = next((p for p in STORE_PLACES if p.is_dir()), None)
        if found is None:
            looked = " and ".join(f"./{p}" for p in STORE_PLACES)
            raise UsageError(f"no store found: looked in {looked}",
                             hint="name the spec (`caspec status specs/toy-demo.yaml`: its store is beside it) "
                                  "or the store (`--store PATH`, or CASPEC_STORE)")
        _err(f"store: {found}")
        return open_store(found)
    return open_store(_store_folder(loaded.dir / ".caspec", "the store beside the spec"))


def _store_folder(path: Path, named_by: str) -> Path:
    """``path``, if it is a folder or can become one; a file on the way is a usage error (exit 2), before
    any step runs."""
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                what = "is a file" if place == path else f"cannot be made: {place} is a file"
                raise UsageError(f"store: {path} {what}, not a folder ({named_by})",
                                 hint="name a folder for the store (made on the first run), or move the file")
            return path
    return path


def _load(spec: str, contained: bool | None = None) -> Any:
    """Load SPEC (or a recipe's spec, unpacked beside it). A contained load (``--contained``; by default for a
    recipe) refuses any path that leaves the spec's folder (:mod:`caspec.spec.contain`)."""
    from .spec.load import load_spec

    if spec.endswith(".recipe.tar.gz") and os.path.isfile(spec):  # a recipe: its spec, unpacked beside it
        from .recipe import open_recipe

        path = open_recipe(Path(spec))
        _err(f"recipe: {os.path.relpath(path)}")
        return load_spec(path, contained=True if contained is None else contained)
    return load_spec(spec, contained=bool(contained))


contained_option = click.option(
    "--contained/--not-contained", default=None,
    help="Refuse any path the spec reads or writes outside its own folder (default: on for a recipe, off for a spec).")


store_option = click.option("--store", metavar="DIR|URL", help="Store directory or URL such as s3://bucket/prefix "
                            "(default: `.caspec/` beside the spec; env CASPEC_STORE).")


def executor_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--executor, --ray-address, --threads, --resources (run and plan: the keys depend on them)."""
    fn = click.option("--resources", multiple=True, metavar="KIND=cpus:N[,gpus:M]",
                      help="Ray: the resources of a step kind's tasks (default: 1 GPU for model steps on a "
                           "cluster with GPUs, else `--threads` CPUs). Repeatable.")(fn)
    fn = click.option("--threads", type=click.IntRange(1), default=None,
                      help="torch CPU threads per step; part of CPU steps' keys (env CASPEC_THREADS; "
                           "default: torch's own choice locally, 1 per Ray task).")(fn)
    fn = click.option("--ray-address", metavar="ADDR", default=None,
                      help="Ray cluster to join (env CASPEC_RAY_ADDRESS; default: start a local one).")(fn)
    fn = click.option("--executor", type=click.Choice(["local", "ray"]), envvar="CASPEC_EXECUTOR",
                      default="local", show_default=True, help="Where steps run (env CASPEC_EXECUTOR).")(fn)
    return fn


def _executor(executor: str, ray_address: str | None, threads: int | None, resources: tuple[str, ...]) -> Any:
    if executor == "ray":
        from .exec.ray_backend import RayExecutor, parse_resources

        return RayExecutor(ray_address, threads=threads, resources=parse_resources(resources))
    if ray_address or resources:
        raise UsageError("--ray-address and --resources need `--executor ray`")
    from .exec.local import LocalExecutor

    return LocalExecutor(threads)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="caspec")
def main() -> None:
    """caspec: Concept Assets from a YAML spec, as a cached DAG of steps.

    \b
    Exit codes: 0 done, 1 a step failed, 2 bad spec or usage,
                3 stopped at a review gate, 4 differs from the lock (--frozen, lock --check),
                130 interrupted.
    """


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@store_option
@click.option("--only", multiple=True, metavar="STEP", help="Run only this step (its upstream must be cached). Repeatable.")
@click.option("--until", multiple=True, metavar="STEP", help="Run this step and everything it needs. Repeatable.")
@click.option("--force", multiple=True, metavar="STEP", help="Run this step even if cached. Repeatable.")
@click.option("--dry-run", is_flag=True, help="Show what would run; write nothing.")
@click.option("--report", "report_md", metavar="FILE.md", help="Write a markdown report of the run (steps, eval "
              "gates, compose thumbnails), e.g. to $GITHUB_STEP_SUMMARY.")
@click.option("--junit", "junit_xml", metavar="FILE.xml", help="Write each step and eval gate as a JUnit testcase.")
@click.option("--frozen", is_flag=True, help="Fail (exit 4) if anything differs from SPEC.lock, or a step would "
              "run whose outputs the lock does not hold; a step whose new outputs differ from the lock fails.")
@contained_option
@executor_options
@_guard
def run(spec: str, store: str | None, only: tuple[str, ...], until: tuple[str, ...], force: tuple[str, ...],
        dry_run: bool, report_md: str | None, junit_xml: str | None, frozen: bool, contained: bool | None,
        executor: str, ray_address: str | None, threads: int | None, resources: tuple[str, ...]) -> int:
    """Run SPEC: execute every step that is not cached, in dependency order.

    With `--executor ray`, every step whose upstream is done runs at once as a Ray task."""
    from .exec.progress import RichReporter
    from .exec.runner import run as run_spec
    from .plan.graph import make_plan

    loaded = _load(spec, contained)
    the_store = _store_for(loaded, store)
    the_executor = _executor(executor, ray_address, threads, resources)
    the_plan, locked = None, None
    if frozen:
        from .lock import check_frozen, lock_path

        try:
            the_plan = make_plan(loaded, the_store, force=set(force), compute=the_executor.compute(loaded))
            locked = check_frozen(the_plan, the_store, lock_path(loaded))["steps"]
        except BaseException:
            the_executor.stop()
            raise
    summary = run_spec(loaded, the_store, only=only, until=until, force=force, dry_run=dry_run,
                       reporter=RichReporter(), executor=the_executor, plan=the_plan, frozen=locked)
    _report_run(summary, loaded, dry_run)
    if report_md or junit_xml:
        from .report import write_reports

        for path in write_reports(summary, the_store, report=report_md, junit_path=junit_xml):
            _err(f"report: {os.path.relpath(path)}")
    return summary.exit_code


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _report_run(summary: Any, loaded: Any, dry_run: bool) -> None:
    counts: dict[str, int] = {}
    for outcome in summary.outcomes.values():
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    order = ("ran", "would-run", "cached", "awaiting-review", "blocked", "failed", "differs-from-lock")
    tally = ", ".join(f"{counts[s]} {s}" for s in order if s in counts) or "nothing to do"
    for outcome in summary.by_status("failed"):
        _err(f"error: step `{outcome.id}` failed: {outcome.message}")
        if outcome.hint:
            _err(f"hint: {outcome.hint}")
    for outcome in summary.by_status("differs-from-lock"):
        _err(f"error: step `{outcome.id}` differs from the lock: {outcome.message}")
        if outcome.hint:
            _err(f"hint: {outcome.hint}")
    for outcome in summary.by_status("awaiting-review"):
        _err(f"review: {outcome.message}")
        if outcome.hint:
            _err(f"hint: {outcome.hint}")
        gate = summary.plan.nodes[outcome.id].gate
        if _in_ci() and gate is not None:  # nobody can answer a gallery in CI: say what to commit
            _err(f"ci: fill in `{os.path.relpath(gate.manifest)}` (keep: true on the candidates to keep, or "
                 f"`caspec review {os.path.relpath(loaded.path)} --step {outcome.id} --keep ID...` on your "
                 "machine), commit it, and push; this run ends with exit 3")
    if dry_run:
        _err(f"dry run: {tally}")
    else:
        out = os.path.relpath(loaded.dir / "out" / loaded.name)
        overview = loaded.dir / "out" / loaded.name / "index.html"
        shown = f" (overview: `{os.path.relpath(overview)}`)" if overview.is_file() else ""
        _err(f"{'done' if summary.exit_code == 0 else 'stopped'}: {tally}; outputs in `{out}/`{shown}")


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (a list of steps).")
@contained_option
@executor_options
@_guard
def plan(spec: str, store: str | None, as_json: bool, contained: bool | None, executor: str,
         ray_address: str | None, threads: int | None, resources: tuple[str, ...]) -> int:
    """Show each step of SPEC: key, status (cached, run, awaiting-review, blocked) and why.

    A key shown as `~abc...` is provisional: the step runs after an upstream step, and its key follows
    that step's outputs. Cached steps made with other library versions, device or thread count say so.
    """
    from .plan.graph import make_plan

    loaded = _load(spec, contained)
    the_store = _store_for(loaded, store)
    the_executor = _executor(executor, ray_address, threads, resources)
    try:
        the_plan = make_plan(loaded, the_store, environment_notes=True, compute=the_executor.compute(loaded))
    finally:
        the_executor.stop()
    if as_json:
        click.echo(json.dumps([n.to_json() for n in the_plan.order()], indent=2))
    else:
        _print_plan(the_plan)
    return 0


def _print_plan(the_plan: Any) -> None:
    """The plan as a table. A key starting with `~` is provisional: it depends on outputs of upstream
    steps that run first (the WHY column says which)."""
    rows = [("STEP", "KIND", "KEY", "STATUS", "WHY")]
    rows += [(n.id, n.kind, n.short_key, n.status, "; ".join(n.reasons + n.notes + n.fact_notes))
             for n in the_plan.order()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + ("  " + r[4] if r[4] else ""))


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@store_option
@click.option("--check", is_flag=True, help="Write nothing; exit 0 if SPEC.lock is current, 4 if not.")
@contained_option
@executor_options
@_guard
def lock(spec: str, store: str | None, check: bool, contained: bool | None, executor: str,
         ray_address: str | None, threads: int | None, resources: tuple[str, ...]) -> int:
    """Write SPEC.lock: the environment, model, inputs, review decisions and every step's key and outputs.

    \b
    caspec lock SPEC            write (or refresh) SPEC.lock beside the spec
    caspec lock SPEC --check    exit 0 if it is current, 4 (listing each difference) if not
    caspec run SPEC --frozen    run only what the lock allows
    """
    from .errors import LockMismatch
    from .lock import build_lock, check_current, lock_path, write_lock
    from .plan.graph import make_plan

    loaded = _load(spec, contained)
    the_store = _store_for(loaded, store)
    the_executor = _executor(executor, ray_address, threads, resources)
    try:
        the_plan = make_plan(loaded, the_store, compute=the_executor.compute(loaded))
    finally:
        the_executor.stop()
    path = lock_path(loaded)
    if check:
        diffs = check_current(the_plan, the_store, path)
        if diffs:
            raise LockMismatch(path, diffs)
        _err(f"{os.path.relpath(path)} is current")
        return 0
    lock_data = build_lock(the_plan, the_store)
    write_lock(path, lock_data)
    done = sum(1 for s in lock_data["steps"].values() if "outputs" in s)
    _err(f"wrote {os.path.relpath(path)}: {len(lock_data['steps'])} step(s), {done} with outputs")
    return 0


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--step", "steps", multiple=True, metavar="STEP",
              help="Verify this step (repeatable; default: every step the lock holds outputs for).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@executor_options
@_guard
def verify(spec: str, steps: tuple[str, ...], as_json: bool, executor: str, ray_address: str | None,
           threads: int | None, resources: tuple[str, ...]) -> int:
    """Re-run steps in a scratch store and compare their outputs with SPEC.lock, bit for bit.

    Prints a table (step, kind, equal/different/not-run, files that differ); exits 0 when every step is
    equal, 4 when one differs, 1 when one could not run. The store and out/ are not touched."""
    from .exec.progress import RichReporter
    from .lock import lock_path, read_lock, verify as verify_steps

    loaded = _load(spec)
    lock_data = read_lock(lock_path(loaded))
    rows = verify_steps(loaded, lock_data, steps=steps, reporter=RichReporter(),
                        executor=_executor(executor, ray_address, threads, resources))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        table = [("STEP", "KIND", "RESULT", "DETAIL")] + [(r["step"], r["kind"], r["result"], r["detail"]) for r in rows]
        widths = [max(len(t[i]) for t in table) for i in range(3)]
        for t in table:
            click.echo("  ".join(c.ljust(w) for c, w in zip(t[:3], widths)) + ("  " + t[3] if t[3] else ""))
    results = {r["result"] for r in rows}
    if "different" in results:
        return 4
    return 1 if results & {"not-run", "not-locked"} else 0


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out", required=True, type=click.Path(dir_okay=False), metavar="NAME.recipe.tar.gz",
              help="The archive to write.")
@store_option
@_guard
def pack(spec: str, out: str, store: str | None) -> int:
    """Bundle SPEC, its lock, review manifests and input files into one recipe (no store, no weights).

    SPEC.lock must be current (`caspec lock SPEC`). Re-run a recipe with `caspec run NAME.recipe.tar.gz`."""
    from .errors import LockMismatch
    from .lock import check_current, lock_path, read_lock
    from .plan.graph import make_plan
    from .recipe import SUFFIX
    from .recipe import pack as pack_recipe

    if not out.endswith(SUFFIX):
        raise UsageError(f"-o {out}: a recipe's name ends with {SUFFIX}", hint=f"e.g. -o library{SUFFIX}")
    loaded = _load(spec)
    the_store = _store_for(loaded, store)
    the_plan = make_plan(loaded, the_store)
    path = lock_path(loaded)
    diffs = check_current(the_plan, the_store, path)
    if diffs:
        raise LockMismatch(path, diffs, hint=f"refresh the lock first: `caspec lock {spec}`")
    manifest = pack_recipe(the_plan, read_lock(path), path, Path(out))
    click.echo(os.path.relpath(out))
    _err(f"packed {len(manifest['files'])} file(s); no store, no model weights (model: "
         f"{(manifest.get('model') or {}).get('kind', '?')})")
    return 0


@main.command()
@click.argument("archive", type=click.Path(dir_okay=False, exists=True))
@click.argument("target", required=False, type=click.Path(file_okay=False))
@_guard
def unpack(archive: str, target: str | None) -> int:
    """Unpack a recipe into TARGET (default: beside it, named after it); print its spec's path."""
    from .recipe import default_target
    from .recipe import unpack as unpack_recipe

    spec_path = unpack_recipe(Path(archive), Path(target) if target else default_target(Path(archive)))
    click.echo(os.path.relpath(spec_path))
    return 0


@main.command()
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@contained_option
@_guard
def validate(specs: tuple[str, ...], contained: bool | None) -> int:
    """Check SPECS for errors without running anything: the spec's rules, the models it names, and that each
    prompt fits its model's text encoder (where the model's tokenizer is on disk)."""
    from .errors import SpecError
    from .plan.checks import check_without_running

    failed = 0
    for spec in specs:
        try:
            for note in check_without_running(_load(spec, contained)):
                _err(f"{spec}: note: {note}")
            click.echo(f"{spec}: ok")
        except SpecError as exc:
            _err(exc.render())
            failed += 1
    return 2 if failed else 0


@main.command()
@_guard
def schema() -> int:
    """Print the spec's JSON Schema (for editor autocompletion)."""
    from .spec.schema import json_schema

    click.echo(json.dumps(json_schema(), indent=2, sort_keys=True))
    return 0


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--step", "step_id", metavar="STEP", help="The select step to review from a script (with --keep/--reject).")
@click.option("--keep", "action", flag_value="keep", help="Mark the IDs kept (ids, digest prefixes, or `all`).")
@click.option("--reject", "action", flag_value="reject", help="Mark the IDs not kept.")
@click.option("--reset", is_flag=True, help="Start the review afresh from the current candidates.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Gallery: address to bind.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Gallery: port (0: any free one).")
@click.option("--allow-remote", is_flag=True, help="Gallery: allow binding and serving a non-local address.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Gallery: a Host name it answers to besides loopback and the bound address (e.g. the name your "
                   "colleague types). Repeatable.")
@store_option
@_guard
def review(spec: str, ids: tuple[str, ...], step_id: str | None, action: str | None, reset: bool, host: str,
           port: int, allow_remote: bool, allow_hosts: tuple[str, ...], store: str | None) -> int:
    """Review candidates: a local web gallery, or from a script with --step.

    \b
    caspec review SPEC                              open the gallery (http://127.0.0.1:8765/)
    caspec review SPEC --step STEP --keep ID...     mark candidates kept
    caspec review SPEC --step STEP --reject ID...   mark candidates not kept
    caspec review SPEC --step STEP                  show the candidates and their state
    """
    loaded = _load(spec)
    the_store = _store_for(loaded, store)
    if step_id is None:
        if ids or action or reset:
            raise UsageError("--keep, --reject, ids and --reset need --step STEP", hint="e.g. `--step picks --keep s0-p0-c0`")
        from .review.server import serve

        return serve(loaded, the_store, host, port, allow_remote, spec_arg=spec, allowed_hosts=allow_hosts)
    from .review.cli import review_step

    if ids and action is None:
        raise UsageError("candidate ids given without --keep or --reject", hint="e.g. `--keep s0-p0-c0 s0-p1-c1`")
    wanted = _split(ids)
    return review_step(loaded, the_store, step_id, keep=wanted if action == "keep" else [],
                       reject=wanted if action == "reject" else [], reset=reset, spec_arg=spec)


def _split(values: tuple[str, ...]) -> list[str]:
    return [v for value in values for v in value.replace(",", " ").split()]


@main.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@store_option
@_guard
def status(spec: str | None, store: str | None) -> int:
    """Summarize the store; with SPEC, also the status of each of its steps."""
    from .store.report import store_summary

    loaded = _load(spec) if spec else None
    the_store = _store_for(loaded, store)
    click.echo(store_summary(the_store))
    if loaded is not None:
        from .plan.graph import make_plan

        click.echo("")
        _print_plan(make_plan(loaded, the_store, environment_notes=True))
    return 0


@main.command()
@click.argument("specs", nargs=-1, type=click.Path(dir_okay=False))
@store_option
@click.option("--dry-run", is_flag=True, help="List what would be removed; remove nothing.")
@_guard
def gc(specs: tuple[str, ...], store: str | None, dry_run: bool) -> int:
    """Remove store entries that no current spec needs; print the bytes freed.

    Kept: every step of the current version of SPECS and of every spec that ran on this store
    and still exists on disk.
    """
    from .store.report import collect_garbage

    loaded = [_load(s) for s in specs]
    the_store = _store_for(loaded[0] if loaded else None, store)
    click.echo(collect_garbage(the_store, loaded, dry_run=dry_run))
    return 0


@main.group()
def assets() -> None:
    """Inspect concept assets (the outputs of `concepts` steps)."""


@assets.command("list")
@click.argument("spec", type=click.Path(dir_okay=False))
@store_option
@_guard
def assets_list(spec: str, store: str | None) -> int:
    """List the finished concept assets of SPEC: name, pseudo-words, base model, final loss, folder."""
    from .assets.inspect import spec_assets

    loaded = _load(spec)
    found = spec_assets(loaded, _store_for(loaded, store))
    for info in found:
        click.echo(info.summary())
    if not found:
        _err(f"no finished concept assets in {loaded.path.name}")
    return 0


@assets.command("catalog")
@click.argument("folder", required=False, type=click.Path(file_okay=False, exists=True))
@click.option("--spec", type=click.Path(dir_okay=False), help="Catalog this spec's finished assets, with its eval metrics.")
@click.option("-o", "--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@store_option
@_guard
def assets_catalog(folder: str | None, spec: str | None, out: str, store: str | None) -> int:
    """Write OUT/catalog.json and an offline OUT/index.html for FOLDER's assets or --spec SPEC's."""
    from .assets.catalog import entry_for, folder_assets, spec_metrics, write_catalog
    from .assets.inspect import spec_assets

    if (folder is None) == (spec is None):
        raise UsageError("give a FOLDER of assets or --spec SPEC (one of them)",
                         hint="e.g. caspec assets catalog --spec library.yaml -o catalog/")
    metrics: dict[str, Any] = {}
    if spec:
        loaded = _load(spec)
        the_store = _store_for(loaded, store)
        infos, metrics, title = spec_assets(loaded, the_store), spec_metrics(loaded, the_store), loaded.name
    else:
        infos, title = folder_assets(Path(folder)), Path(folder).resolve().name
    target = Path(out)
    try:
        entries = [entry_for(info, metrics.get(info.name), target) for info in infos]
    except ValueError as exc:
        raise UsageError(str(exc), hint="re-export or re-import the asset with caspec; hand-edited cards must keep "
                         "pseudo-words as <letters, digits, _ . ->") from None
    json_path, html_path = write_catalog(entries, target, title=f"caspec assets: {title}")
    click.echo(os.path.relpath(html_path))
    _err(f"{len(entries)} asset(s); {os.path.relpath(json_path)}")
    return 0


@assets.command("show")
@click.argument("name")
@click.option("--spec", type=click.Path(dir_okay=False), help="Look NAME up among this spec's assets.")
@store_option
@_guard
def assets_show(name: str, spec: str | None, store: str | None) -> int:
    """Describe one asset: NAME is an asset folder, or a `concepts` step of --spec."""
    from .assets.inspect import find_asset

    loaded = _load(spec) if spec else None
    click.echo(find_asset(name, loaded, _store_for(loaded, store) if loaded else None).describe())
    return 0


@main.command("export")
@click.argument("asset")
@click.option("--format", "fmt", required=True, type=click.Choice(["diffusers", "a1111", "bundle"]),
              help="diffusers: load_lora_weights + load_textual_inversion; a1111: emb_params + kohya LoRA; "
                   "bundle: one kohya LoRA file with bundle_emb.* embeddings.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option("--spec", type=click.Path(dir_okay=False), help="Look ASSET up among this spec's assets.")
@store_option
@_guard
def export_cmd(asset: str, fmt: str, out: str, spec: str | None, store: str | None) -> int:
    """Export a concept asset (ASSET: an asset folder, or a `concepts` step of --spec)."""
    from .assets.export import export_asset
    from .assets.format import load_asset
    from .assets.inspect import find_asset
    from .models import quiet_libraries

    quiet_libraries()
    loaded = _load(spec) if spec else None
    info = find_asset(asset, loaded, _store_for(loaded, store) if loaded else None)
    for path in export_asset(load_asset(info.folder, name=info.name), fmt, Path(out)):
        click.echo(os.path.relpath(path))
    return 0


@main.command("import")
@click.argument("src", type=click.Path(exists=True))
@click.argument("out", type=click.Path(file_okay=False))
@_guard
def import_cmd(src: str, out: str) -> int:
    """Import an asset exported in any supported format (diffusers, A1111/kohya, bundle, caspec) into
    a caspec asset folder OUT. Pickled `.pt`/`.bin` files load with `weights_only=True` only."""
    from .assets.importer import import_asset
    from .models import quiet_libraries

    quiet_libraries()
    try:
        click.echo(os.path.relpath(import_asset(Path(src), Path(out))))
    except ValueError as exc:
        raise UsageError(f"cannot import `{src}`: {exc}") from None
    return 0


@main.command("eval")
@click.argument("spec", type=click.Path(dir_okay=False))
@store_option
@_guard
def eval_cmd(spec: str, store: str | None) -> int:
    """Run SPEC's `eval` steps (and what they need) and print their metrics as JSON."""
    from .exec.progress import RichReporter
    from .exec.runner import run as run_spec

    loaded = _load(spec)
    steps = tuple(loaded.spec.eval)
    if not steps:
        raise UsageError(f"{loaded.path.name} has no `eval` steps", hint="add an `eval:` section over a compose step")
    the_store = _store_for(loaded, store)
    summary = run_spec(loaded, the_store, until=steps, reporter=RichReporter())
    _report_run(summary, loaded, False)
    metrics = {}
    for sid in steps:
        record = the_store.get(summary.plan.nodes[sid].key)
        if record is not None:
            metrics[sid] = record.result.get("metrics")
    click.echo(json.dumps(metrics, indent=2, sort_keys=True))
    return summary.exit_code


@main.group()
def toyworld() -> None:
    """The shapes world: train and measure the embedded `toy` model and CLIP."""


@toyworld.command("train")
@click.option("--out", default="toyworld-weights", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the weights and logs (`make toyworld` writes caspec/toyworld/weights).")
@click.option("--what", type=click.Choice(["all", "diffusion", "clip"]), default="all", show_default=True,
              help="Train the diffusion pipeline, the CLIP, or both.")
@click.option("--quick", is_flag=True, help="A few steps on a few images: checks the scripts run (seconds).")
@click.option("--seed", type=int, default=None, help="Override the training seeds' base.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a training setting, e.g. `unet_steps=8000` or `clip.steps=2000`. Repeatable.")
@_guard
def toyworld_train(out: str, what: str, quick: bool, seed: int | None, overrides: tuple[str, ...]) -> int:
    """Train the toy models from scratch, deterministically (about 45 min on 2 CPU cores)."""
    from .models import quiet_libraries
    from .toyworld.train import ToyTrainConfig, train_toy
    from .toyworld.train_clip import ToyClipConfig, train_clip

    quiet_libraries()
    cfg, clip_cfg = ToyTrainConfig(), ToyClipConfig()
    if quick:
        cfg = ToyTrainConfig(n_images=64, vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8, warmup=2, log_every=1)
        clip_cfg = ToyClipConfig(n_images=64, steps=3, batch=16, warmup=2, log_every=1)
    if seed is not None:
        cfg.seed, clip_cfg.seed = seed, seed + 1
    for kv in overrides:
        key, sep, value = kv.partition("=")
        target = clip_cfg if key.startswith("clip.") else cfg
        name = key.removeprefix("clip.")
        if not sep or not hasattr(target, name):
            raise UsageError(f"--set {kv}: unknown setting `{key}`",
                             hint="settings: " + ", ".join(vars(cfg)) + "; clip." + ", clip.".join(vars(clip_cfg)))
        try:
            setattr(target, name, type(getattr(target, name))(value))
        except ValueError:
            raise UsageError(f"--set {kv}: `{value}` is not a valid {type(getattr(target, name)).__name__}") from None
    echo = _err
    if what in ("all", "diffusion"):
        train_toy(Path(out), cfg, echo=echo)
    if what in ("all", "clip"):
        train_clip(Path(out), clip_cfg, echo=echo)
    click.echo(os.path.relpath(out))
    return 0


@toyworld.command("measure")
@click.option("--weights", type=click.Path(file_okay=False, exists=True), default=None,
              help="A weights folder from `caspec toyworld train` (default: the shipped `toy`).")
@click.option("--seeds", default=4, show_default=True, help="Images per colour x shape prompt.")
@click.option("--sources", default=40, show_default=True, help="Rendered scenes edited per attribute.")
@click.option("--steps", default=50, show_default=True, help="DDIM steps.")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None, help="Also save a PNG contact sheet.")
@_guard
def toyworld_measure(weights: str | None, seeds: int, sources: int, steps: int, sheet: str | None) -> int:
    """Measure the toy model with the exact attribute reader; print JSON (issue 6's first targets)."""
    from .models import quiet_libraries
    from .toyworld.measure import base_accuracy, contact_sheet, sdedit_fidelity, toy_pipe

    quiet_libraries()
    pipe = toy_pipe(Path(weights) if weights else None)
    base = base_accuracy(pipe, seeds=seeds, steps=steps)
    edits = {a: sdedit_fidelity(pipe, attribute=a, n=sources, steps=steps) for a in ("color", "shape")}
    if sheet:
        contact_sheet(base["images"] + edits["color"]["sources"][::2] + edits["color"]["images"],
                      columns=20).save(sheet)
    drop = ("rows", "images", "sources")
    result = {"base": {k: v for k, v in base.items() if k not in drop},
              "sdedit": {a: {k: v for k, v in r.items() if k not in drop} for a, r in edits.items()}}
    click.echo(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
