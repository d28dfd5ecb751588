"""Ray Data as the engine: `captioner caption SHARDS... -o DIR --ray [ADDRESS]`, and the same from Python:

    from captioner import caption_shards
    report = caption_shards(["shards/00000.tar", "shards/00001.tar"], "captions/", address="auto")

The unit of work is a shard: a WebDataset .tar, or a chunk of --ray-shard-size paths from a path list or from
files and folders. The dataset Ray Data runs is the list of shards that have no marker yet; `map_batches` with a
callable class (ShardCaptioner: the model loaded once per actor, captioning in the actor's own process) turns
each shard into DIR/NAME.parquet, written atomically, then its marker DIR/_done/NAME.json. Ray schedules the
shards on an actor pool, restarts actors that die and retries their tasks (max_task_retries): a node that is lost
costs the shards it was working on, which run again elsewhere. A bad image is an error row, never a failed
shard. A rerun skips every shard whose marker exists, so an interrupted job redoes only unfinished shards.

Why shards and not Ray's read_webdataset: Ray Data's readers split and merge blocks freely, so a shard's rows
would reach the writer in pieces (and through the object store as image bytes); one file and one marker per
shard would need an all-to-all groupby that writes nothing until every image is done, and resume would be lost.
Here the object store carries only shard descriptions and small summaries; actors read the images themselves.

Ray is imported only by the functions that run a job (`pip install 'captioner[ray]'`); the command line's side
(--ray and its flags) is captioner/cli/cluster.py."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..errors import CaptionerError, UsageProblem
from ..media.images import MAX_PIXELS, display_name, find_images
from ..media.shards import Meta, read_lists, read_shard, split_inputs

RAY_HINT = "--ray needs Ray Data: pip install 'captioner[ray]' (ray[data] and pyarrow)"
SHARD_SIZE = 1000  # images per shard made from files, folders and path lists (docs/scale.md: overhead)
MARKERS = "_done"  # DIR/_done/NAME.json; Parquet readers skip names that start with _ or .
MAX_ERRORS_SHOWN = 20  # per shard, on stderr; every error is in the shard's Parquet file


@dataclass(frozen=True)
class Shard:
    """One unit of work: a tar (kind "tar"), or a chunk of paths (kind "paths") from `source` (a path list, or
    "" for files and folders named on the command line)."""

    name: str
    kind: str
    source: str
    paths: tuple[str, ...] = ()
    keys: tuple[str | None, ...] = ()

    def digest(self) -> str:
        """What the shard holds: a chunk's marker only counts while its paths are the same."""
        h = hashlib.sha256(f"{self.kind}\0{self.source}".encode("utf-8", "surrogateescape"))
        for p, k in zip(self.paths, self.keys):
            h.update(f"\0{p}\0{k}".encode("utf-8", "surrogateescape"))
        return h.hexdigest()[:16]


@dataclass
class Report:
    """What a job did: per-shard summaries (this run's and those skipped by their marker) and input errors."""

    out: Path
    shards: list[dict[str, Any]] = field(default_factory=list)
    input_errors: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def total(self, what: str) -> int:
        return sum(int(s.get(what, 0)) for s in self.shards)


# ------------------------------------------------------------------------------ planning ------
def _chunks(name: str, source: str, entries: Sequence[tuple[str, str | None]], size: int) -> list[Shard]:
    return [Shard(f"{name}-{i // size:05d}", "paths", source, tuple(p for p, _ in entries[i:i + size]),
                  tuple(k for _, k in entries[i:i + size])) for i in range(0, len(entries), size)]


def plan(inputs: Sequence[str | os.PathLike], recursive: bool = False, shard_size: int = SHARD_SIZE,
         skipped: list[Path] | None = None) -> tuple[list[Shard], list[tuple[str, str]]]:
    """The shards of a job, and [(input, error)]: each .tar is a shard named after it (00000.tar -> 00000);
    a path list LIST.txt is cut into LIST-00000, LIST-00001, ... of shard_size paths; files and folders
    (sorted) into images-00000, ... Two shards with one name are a UsageProblem (they would share a file). Every
    path is made absolute here: the actors' working folders are not the driver's."""
    rest, tars, lists, errors = split_inputs(inputs, recursive)
    shards = [Shard(Path(t).name[:-len(".tar")], "tar", os.path.abspath(t)) for t in tars]
    for lst, entries in read_lists(lists, errors):
        entries = [(os.path.abspath(p), k) for p, k in entries]
        shards += _chunks(Path(lst).stem, os.path.abspath(lst), entries, shard_size)
    if rest:
        found, more = find_images(rest, recursive, skipped)
        errors += more
        shards += _chunks("images", "", [(os.path.abspath(p), None) for p in found], shard_size)
    names: dict[str, Shard] = {}
    for s in shards:
        other = names.setdefault(s.name, s)
        if other is not s:
            raise UsageProblem(f"{display_name(other.source)} and {display_name(s.source)} would both be written "
                               f"to {s.name}.parquet: caption them into different -o folders")
    return shards, errors


def shard_file(out: Path, name: str) -> Path:
    return out / f"{name}.parquet"


def marker(out: Path, name: str) -> Path:
    return out / MARKERS / f"{name}.json"


def finished(out: Path, shard: Shard) -> dict[str, Any] | None:
    """The marker's summary if the shard is done (a chunk of paths: with the same paths), else None."""
    try:
        done = json.loads(marker(out, shard.name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or (shard.kind == "paths" and done.get("digest") != shard.digest()):
        return None
    return done


def existing(out: Path) -> int:
    """How many shard files or markers OUT already holds (the CLI refuses to add to them without --resume)."""
    if not out.is_dir():
        return 0
    return len(list(out.glob("*.parquet"))) + len(list((out / MARKERS).glob("*.json")))


# ---------------------------------------------------------------------------- one shard ------
def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a marker is never half written)."""
    from .parquet import write_atomically

    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data), encoding="utf-8"))


def caption_shard(cap: Any, shard: Shard, out: Path, job: Any, alternatives: bool,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Caption one shard in this process: DIR/NAME.parquet, then its marker (written last). Returns the marker's
    summary (rows, failed, warned, the first errors, and `extra`: who did it). Bad images are error rows; only a
    write that fails raises (Ray then retries the task)."""
    from .batch import caption_files
    from .parquet import record, write_table

    start = time.monotonic()
    if shard.kind == "tar":
        items, meta = read_shard(shard.source)
    else:
        items = [Path(p) for p in shard.paths]
        meta = {p: Meta(k, shard.source or None) for p, k in zip(shard.paths, shard.keys)}
    rows = caption_files(cap, items, job)
    write_table(shard_file(out, shard.name), [record(r, cap.model_id, meta.get(r["path"]), alternatives) for r in rows])
    failed = [[r["path"], r["error"]] for r in rows if r["error"]]
    summary = {"shard": shard.name, "source": shard.source, "digest": shard.digest(), "rows": len(rows),
               "failed": len(failed), "warned": sum(1 for r in rows if r.get("warning") and not r["error"]),
               "errors": failed[:MAX_ERRORS_SHOWN], "model": cap.model_id, "host": socket.gethostname(),
               "seconds": round(time.monotonic() - start, 3), **(extra or {})}
    _write_json(marker(out, shard.name), summary)
    return summary


class ShardCaptioner:
    """The callable class of map_batches: one per Ray actor. Loads the model once (from its bytes, so the model
    file need not be on every node), captions each shard it is given (batches of one shard) in its own process
    (workers=0, `threads` threads) and returns the shards' summaries as JSON. `model`: a checkpoint's bytes, or
    a bundle folder's files {name: bytes}."""

    def __init__(self, out: str, model: bytes | dict[str, bytes] | None, device: str, backend: str | None,
                 int8: bool, job: dict[str, Any], alternatives: bool, threads: int) -> None:
        from .batch import CaptionJob
        from .load import has_torch, load_captioner

        if has_torch():
            import torch

            torch.set_num_threads(threads)
        self.out, self.alternatives = Path(out), alternatives
        self.job = CaptionJob(**{**job, "workers": 0, "progress_bar": False})
        if model is None:
            self.cap = load_captioner(None, device, backend=backend, int8=int8, threads=threads)
        else:
            with tempfile.TemporaryDirectory(prefix="captioner-model-") as d:
                path = Path(d) / "model"
                if isinstance(model, dict):
                    path.mkdir()
                    for name, data in model.items():
                        (path / name).write_bytes(data)
                else:
                    path = path.with_suffix(".pt")
                    path.write_bytes(model)
                self.cap = load_captioner(path, device, backend=backend, int8=int8, threads=threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        done = []
        for text in batch["shard"]:
            shard = Shard(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(str(text)).items()})
            summary = finished(self.out, shard)  # a retry of a shard that was written before its actor died
            if summary is None:
                summary = caption_shard(self.cap, shard, self.out, self.job, self.alternatives,
                                        {"node": _node_id(), "pid": os.getpid()})
            done.append(json.dumps(summary))
        return {"summary": done}


def _node_id() -> str:
    """The Ray node this actor runs on ('' outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return ""


# --------------------------------------------------------------------------------- a job ------
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+)$", re.M)


def _one_line(exc: BaseException) -> str:
    """What went wrong, in one line. Ray passes an error raised in an actor on as text (its traceback inside a
    RayTaskError's message): the last `Type: message` line that is not Ray's own is the cause; a CaptionerError
    is its message alone."""
    raised = [(t, m) for t, m in _RAISED.findall(str(exc)) if not t.startswith("ray.")]
    if raised:
        kind, text = raised[-1]
        return (text if kind.endswith("CaptionerError") else f"{kind.rsplit('.', 1)[-1]}: {text}").strip()[:300]
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def ray_module() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CaptionerError(RAY_HINT) from None
    return ray


@contextlib.contextmanager
def connected(address: str | None, verbose: bool = False) -> Iterator[Any]:
    """Ray, connected: to the cluster this process already joined, else ray.init(address) (None: RAY_ADDRESS,
    or the cluster started on this machine, else a new local one), shut down again at the end if opened here."""
    ray = ray_module()
    opened = not ray.is_initialized()
    if opened:
        if not verbose:  # the driver's C++ core logs an "E" line per Ray Data actor that is no error (docs/scale.md),
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # a new local instance a notice on its token
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        try:
            ray.init(address=address or None,
                     logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=verbose)
        except Exception as exc:  # noqa: BLE001 - ConnectionError, a timeout, a bad address: one line
            raise CaptionerError(f"cannot start or reach the Ray cluster{f' at {address}' if address else ''}: "
                                 f"{_one_line(exc)}") from None
    try:
        yield ray
    finally:
        if opened:
            ray.shutdown()


def _model_bytes(model: str | os.PathLike | None) -> bytes | dict[str, bytes] | None:
    """What travels to the actors: a checkpoint's bytes, or a bundle folder's files."""
    if not model:
        return None
    path = Path(model)
    if path.is_dir():
        return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}
    return path.read_bytes()


def caption_shards(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, address: str | None = None,
                   model: str | os.PathLike | None = None, device: str = "cpu", backend: str | None = None,
                   int8: bool = False, search: dict[str, Any] | None = None, topk: int | None = None,
                   batch_size: int = 32, max_pixels: int = MAX_PIXELS, shard_size: int = SHARD_SIZE,
                   concurrency: int | None = None, num_cpus: float = 1.0, max_retries: int = 3,
                   redo: bool = False, recursive: bool = False, verbose: bool = False,
                   on_shard: Callable[[dict[str, Any]], None] | None = None) -> Report:
    """Caption `inputs` (tar shards, path lists, files, folders) on a Ray cluster into `out` (a folder: one
    NAME.parquet per shard, markers in out/_done). Shards with a marker are skipped (redo=True: captioned
    again). concurrency: caption actors (default: the cluster's CPUs / num_cpus); num_cpus: CPUs (torch
    threads) per actor; max_retries: how often Ray retries a shard whose actor died; search: decoding options
    (beam, max_len, ...). on_shard(summary) runs as each shard finishes. Raises CaptionerError (one line)."""
    from .batch import CaptionJob
    from .load import CHECKPOINT_BACKEND, is_light, load_captioner, require_torch

    start = time.monotonic()
    out = Path(out)
    shards, errors = plan(inputs, recursive, shard_size)
    if not shards:
        raise CaptionerError("no images to caption" + (f" ({errors[0][0]}: {errors[0][1]})" if errors else ""))
    if is_light(model, backend, int8):  # a bad model is one line here, not an actor's traceback
        probe = load_captioner(model, backend=backend, int8=int8)
    else:  # a checkpoint, loaded plain: the actors choose and measure its runtimes
        require_torch(f"--backend {backend or CHECKPOINT_BACKEND}")
        from .captioner import Captioner

        probe = Captioner.load(model, prepare=False)
    cfg = probe.search_config(**(search or {}), topk=topk)
    if topk is not None and topk > cfg.beam:
        raise UsageProblem(f"--topk {topk} is more than the beam ({cfg.beam}): add --beam {topk} or more")
    try:
        (out / MARKERS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CaptionerError(f"cannot write {display_name(out)}: {exc.strerror or exc}") from None
    if redo:  # markers go first: an actor skips a shard whose marker it finds
        for s in shards:
            marker(out, s.name).unlink(missing_ok=True)
    report = Report(out, input_errors=errors)
    todo = []
    for s in shards:
        done = finished(out, s)
        if done is not None:
            report.shards.append({**done, "skipped": True})
        else:
            todo.append(s)
    for s in todo:  # what a killed actor left half written (hidden: readers never saw it)
        for tmp in [*out.glob(f".{s.name}.parquet.*.tmp"), *(out / MARKERS).glob(f".{s.name}.json.*.tmp")]:
            tmp.unlink(missing_ok=True)
    if todo:
        job = CaptionJob(**(search or {}), topk=topk, batch_size=batch_size, max_pixels=max_pixels)
        args = {"out": str(out.resolve()), "model": _model_bytes(model), "device": device,
                "backend": backend, "int8": int8, "job": asdict(job), "alternatives": cfg.topk > 1,
                "threads": max(1, int(num_cpus))}
        with connected(address, verbose) as ray:
            for summary in _run(ray, todo, args, concurrency, num_cpus, max_retries, verbose, out):
                report.shards.append(summary)
                if on_shard:
                    on_shard(summary)
    report.seconds = time.monotonic() - start
    return report


def _run(ray: Any, todo: list[Shard], args: dict[str, Any], concurrency: int | None, num_cpus: float,
         max_retries: int, verbose: bool, out: Path) -> Iterator[dict[str, Any]]:
    """The Ray Data job: the shards -> map_batches(ShardCaptioner) on an actor pool; yields each summary."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts shards (Ray's own progress: in its log, -v)
    ctx.max_consecutive_actor_init_deaths = max_retries  # a node lost while its actor loads the model
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    # "An exception was raised from a task ...", "Exception occurred in user code ...": the CaptionerError below
    # says what in one line (-v: Ray's own lines too)
    for name in ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.CRITICAL)
    size = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1) // num_cpus))
    rows = [{"shard": json.dumps(asdict(s))} for s in todo]
    with warnings.catch_warnings():  # max_task_retries has no named parameter in Ray 2.60 (pinned <2.64)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            ShardCaptioner, fn_constructor_kwargs=args, batch_size=1, num_cpus=num_cpus,
            compute=ray.data.ActorPoolStrategy(size=min(size, len(todo)), max_tasks_in_flight_per_actor=1),
            max_restarts=-1, max_task_retries=max_retries)
    try:
        for row in ds.iter_rows():
            yield json.loads(row["summary"])
    except (KeyboardInterrupt, GeneratorExit):
        raise
    except Exception as exc:  # noqa: BLE001 - a task out of retries, an actor that cannot start, a lost driver
        kept = len(list((out / MARKERS).glob("*.json")))
        raise CaptionerError(f"the Ray job stopped: {_one_line(exc)} ({kept} finished shards are kept in "
                             f"{display_name(out)}: rerun with --resume to do the rest)") from None
