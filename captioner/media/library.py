"""A captioned photo library in one SQLite file (`captioner caption DIR -o library.sqlite`) and its search
(`captioner search library.sqlite "dog on the beach"`), with the standard library's sqlite3 and FTS5.

Table `photos`: path (unique; images.path_text: `\\` for a backslash, `\\xNN` for a byte that is not UTF-8
or a control character), size, mtime (seconds) and mtime_ns (exact, what --resume compares), caption,
alternatives (JSON [[text, score], ...]), score, model (Captioner.model_id), time (UTC, ISO 8601), error.
FTS5 table `captions` (Porter-stemmed: "dogs" finds "dog"): each photo's caption and its alternatives'
texts, rowid = photos.id. A search ranks by BM25, the caption weighing more than the alternatives.

Every batch is one transaction: a killed run keeps all batches before the last. On --resume, photos whose
size or mtime changed are captioned again, and rows of photos deleted from a folder that still exists are
dropped."""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import CaptionerError
from .images import clean_text, display_name, path_from_text, path_text

APPLICATION_ID = 0x63617074  # "capt": PRAGMA application_id, tells a captioner library from other databases
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER,
    mtime REAL,
    mtime_ns INTEGER,
    caption TEXT NOT NULL DEFAULT '',
    alternatives TEXT NOT NULL DEFAULT '[]',
    score REAL,
    model TEXT,
    time TEXT,
    error TEXT
);
CREATE VIRTUAL TABLE IF NOT EXISTS captions USING fts5(caption, alternatives, tokenize = 'porter unicode61');
"""
WEIGHTS = (1.0, 0.3)  # BM25 column weights: caption, alternatives
SUFFIXES = (".sqlite", ".sqlite3", ".db")
Row = dict[str, Any]


def check_fts5() -> None:
    """FTS5 is optional when SQLite is built; say so plainly where this Python's sqlite3 lacks it."""
    try:
        sqlite3.connect(":memory:").execute("CREATE VIRTUAL TABLE t USING fts5(x)")
    except sqlite3.OperationalError:
        raise CaptionerError(f"this Python's sqlite3 (SQLite {sqlite3.sqlite_version}) is built without FTS5, "
                             "which the library and search need; use a Python whose SQLite has FTS5 "
                             "(python.org and Debian builds do)") from None


def _fail(path: Path, exc: sqlite3.Error, what: str = "write") -> CaptionerError:
    return CaptionerError(f"cannot {what} {display_name(path)}: {' '.join(str(exc).split()) or type(exc).__name__}")


def connect(path: Path, create: bool) -> sqlite3.Connection:
    """An open captioner library; create=True makes a new one where there is no file (or an empty one).
    Any other database, or a file that is no database, is refused and left alone."""
    check_fts5()
    exists = path.exists() and path.stat().st_size > 0
    if not exists and not create:
        raise CaptionerError(f"no library at {display_name(path)} (make one with `captioner caption DIR -o "
                             f"{display_name(path)}`)")
    try:
        con = sqlite3.connect(path, timeout=30)
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
        if exists and app_id != APPLICATION_ID:
            con.close()
            raise CaptionerError(f"{display_name(path)} is not a captioner library; remove it or choose another "
                                 "name (it was left as it is)")
        if not exists:
            with con:
                con.executescript(SCHEMA)
                con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return con
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise CaptionerError(f"{display_name(path)} is not a captioner library; remove it or choose another "
                                 "name (it was left as it is)") from None
        raise _fail(path, exc, "open") from None


def _alternative_texts(alternatives: Sequence[Sequence[Any]]) -> str:
    return "\n".join(str(a[0]) for a in alternatives[1:])  # [0] is the caption itself


class LibraryWriter:
    """Writes result rows (one transaction per batch) into a library; `stamps` gives each path's os.stat from
    before it was captioned (size and mtime recorded, so that --resume sees later changes). Without resume
    the library is emptied first (--overwrite; the CLI refuses an existing OUT without --resume or --overwrite)."""

    def __init__(self, path: Path, model: str, stamps: Mapping[str, os.stat_result | None],
                 alternatives: bool, resume: bool = False) -> None:
        self.path, self.model, self.stamps, self.alternatives = path, model, stamps, alternatives
        self.con = connect(path, create=True)
        self.rows = 0
        if not resume:
            self._transaction(lambda: (self.con.execute("DELETE FROM photos"), self.con.execute("DELETE FROM captions")))

    def _transaction(self, work: Any) -> None:
        try:
            with self.con:
                work()
        except sqlite3.Error as exc:
            kept = f"{display_name(self.path)} keeps the {self.rows} rows written before; rerun with --resume"
            raise CaptionerError(f"{_fail(self.path, exc)} ({kept})") from None

    def kept(self, paths: Sequence[Path]) -> list[Row]:
        """--resume: drops the rows of photos deleted from folders that still exist, and returns the rows of
        `paths` that are up to date (same size and mtime as now); the rest are to be captioned (again)."""
        stored = {r[0]: r for r in self.con.execute(
            "SELECT path, size, mtime_ns, caption, score, alternatives, error FROM photos")}
        names = {p: path_from_text(p) for p in stored}
        gone = [p for p, n in names.items() if not os.path.lexists(n) and os.path.isdir(os.path.dirname(n) or ".")]
        self._transaction(lambda: [self._delete(p) for p in gone])
        rows = []
        for p in map(str, paths):
            r, st = stored.get(path_text(p)), self.stamps.get(p)
            if r and st and (r[1], r[2]) == (st.st_size, st.st_mtime_ns):
                rows.append({"path": p, "caption": r[3], "score": r[4], "alternatives": json.loads(r[5]),
                             "error": r[6] or ""})
        return rows

    def _delete(self, path: str) -> None:
        """Drops the row whose stored path (path_text) is `path`."""
        found = self.con.execute("SELECT id FROM photos WHERE path = ?", (path,)).fetchone()
        if found:
            self.con.execute("DELETE FROM captions WHERE rowid = ?", found)
            self.con.execute("DELETE FROM photos WHERE id = ?", found)

    def _put(self, row: Row, now: str) -> None:
        self._delete(path_text(row["path"]))
        st = self.stamps.get(row["path"])
        alts = [[t, round(s, 4)] for t, s in row["alternatives"]] if self.alternatives else []
        score = None if row["score"] is None else round(float(row["score"]), 4)
        cur = self.con.execute(
            "INSERT INTO photos (path, size, mtime, mtime_ns, caption, alternatives, score, model, time, error) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (path_text(row["path"]), st and st.st_size, st and st.st_mtime, st and st.st_mtime_ns, row["caption"] or "",
             json.dumps(alts, ensure_ascii=False), score, self.model, now, clean_text(row["error"] or "") or None))
        if row["caption"]:
            self.con.execute("INSERT INTO captions (rowid, caption, alternatives) VALUES (?, ?, ?)",
                             (cur.lastrowid, row["caption"], _alternative_texts(alts)))

    def __call__(self, rows: list[Row]) -> None:
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._transaction(lambda: [self._put(r, now) for r in rows])
        self.rows += len(rows)

    def close(self) -> None:
        self.con.close()


# ------------------------------------------------------------------------- search ------
def match_expression(query: str) -> str:
    """The words of a plain-text query as an FTS5 expression: each word quoted (no operator syntax), function
    words ("on", "the": assets/stopwords.txt) left out unless there is nothing else, any word may match (OR);
    BM25 ranks photos matching more, and rarer, words first. '' when the query has no words."""
    from ..model.vocab import stopwords

    words = list(dict.fromkeys(re.findall(r"\w+", query.lower())))
    content = [w for w in words if w not in stopwords()] or words
    return " OR ".join(f'"{w}"' for w in content)


PHRASE_BONUS = 1.5  # the query's words together, in order, in the caption
COMPOUND_PENALTY = 0.25  # each query word found only inside a compound that is another thing ("dog" in "hot dog")
CANDIDATES = 200  # BM25's best this many are re-ranked


def _forms(word: str) -> set[str]:
    return {word, word + "s", word + "es", word.removesuffix("s"), word.removesuffix("es")}


def _relevance(caption: str, words: Sequence[str], bm25: float) -> float:
    """BM25's score (higher is better) times a bonus when the caption holds the query's words as a phrase, and
    a penalty for each query word that is there only as part of another thing: "dog" in "a hot dog" (a
    [compounds] entry of assets/tagwords.txt that the query does not name, where the word is the modifier or
    the compound is not a kind of its last word)."""
    from ..model.vocab import tokenize
    from .tags import compounds, join_compounds

    tokens = tokenize(caption)
    score = -bm25
    if len(words) > 1 and f" {' '.join(words)} " in f" {' '.join(tokens)} ":
        score *= PHRASE_BONUS
    query = f" {' '.join(words)} "
    misleading = compounds()[1]
    items = join_compounds(tokens)
    for w in words:
        forms = _forms(w)
        free = [t for t in items if t in forms]
        inside = [t for t in items if " " in t and forms & set(t.split()) and f" {t} " not in query
                  and (tuple(t.split()) in misleading or tuple(t.removesuffix("s").split()) in misleading
                       or t.split()[-1] not in forms)]
        if inside and not free:
            score *= COMPOUND_PENALTY
    return score


def search(path: Path, query: str, limit: int = 20) -> list[Row]:
    """The best `limit` photos for `query`, best first: {"path", "caption", "score", "alternatives", "rank"}
    (rank: SQLite's bm25(), lower is better, weighed by _relevance: a phrase match ranks higher, a word found
    only inside another thing's name ("dog" in "hot dog") lower)."""
    from ..model.vocab import stopwords

    con = connect(path, create=False)
    try:
        found = con.execute(
            "SELECT p.path, p.caption, p.score, p.alternatives, bm25(captions, ?, ?) AS rank "
            "FROM captions JOIN photos p ON p.id = captions.rowid WHERE captions MATCH ? "
            "ORDER BY rank, p.path LIMIT ?", (*WEIGHTS, match_expression(query), max(limit, CANDIDATES))).fetchall()
    except sqlite3.Error as exc:
        raise _fail(path, exc, "search") from None
    finally:
        con.close()
    words = [w for w in re.findall(r"\w+", query.lower()) if w not in stopwords()] or re.findall(r"\w+", query.lower())
    ranked = sorted(((-_relevance(c, words, r), p, c, s, a) for p, c, s, a, r in found), key=lambda x: (x[0], x[1]))
    return [{"path": p, "caption": c, "score": s, "alternatives": json.loads(a), "rank": round(r, 4)}
            for r, p, c, s, a in ranked[:limit]]


def add_search_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="search a captioned library (caption DIR -o library.sqlite) by words",
        description="Find photos in a library written by `captioner caption DIR -o library.sqlite`. The query's "
                    "words are matched in any order against each caption and its alternatives (stemmed: "
                    "'dogs' finds 'dog'); photos are ranked by BM25, those matching more and rarer words first. "
                    "Prints PATH<TAB>caption lines, best first. Exit code 0 (also when nothing matches), 1: no "
                    "such library or another error, 2: usage error.")
    p.add_argument("library", type=Path, metavar="LIBRARY", help="a .sqlite file made by `captioner caption -o`")
    p.add_argument("query", nargs=argparse.REMAINDER, metavar="QUERY",
                   help='words to look for, e.g. "dog on the beach"; a query may start with "-" (`search lib -dog` '
                        'looks for dog: there are no operators); --json and --limit may also follow it')
    p.add_argument("--limit", type=int, default=20, help="at most this many results (default 20)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {path, caption, score, alternatives, rank} instead (rank: BM25 weighed "
                        "for phrases and compound names, lower is better)")
    p.set_defaults(func=run_search, search_parser=p, check=check_search_args)


OPTIONS = {"--json": 0, "--limit": 1, "-h": 0, "--help": 0, "-q": 0, "--quiet": 0, "-v": 0, "-vv": 0, "--verbose": 0, "--no-progress": 0}


def check_search_args(args: argparse.Namespace) -> None:
    """QUERY takes the rest of the line, so that `-dog` is a word; search's own options written after it
    (`dog --json`) are still options."""
    words, opts, it = [], [], iter(args.query)
    for tok in it:
        if tok in OPTIONS or tok.startswith("--limit="):
            opts += [tok] + [next(it, "")] * OPTIONS.get(tok, 0)
        else:
            words.append(tok)
    if opts:
        given = args.search_parser.parse_args([*opts, str(args.library)])
        for key, value in vars(given).items():
            if key not in ("library", "query"):
                setattr(args, key, value)
    if not words:
        from ..options import UsageError

        raise UsageError("the following arguments are required: QUERY", args.search_parser)
    args.query = " ".join(words)


def run_search(args: argparse.Namespace) -> int:
    problem = ("--limit must be >= 1" if args.limit < 1 else
               "the query has no words to search for" if not match_expression(args.query) else None)
    if problem:
        args.search_parser.print_usage(sys.stderr)
        print(f"captioner search: error: {problem}", file=sys.stderr)
        return 2
    found = search(args.library, args.query, args.limit)
    if args.json:
        print(json.dumps(found, ensure_ascii=False, indent=1))
    else:
        for r in found:
            print(f"{display_name(r['path'])}\t{r['caption']}")
    if not found:
        print(f"captioner: nothing in {display_name(args.library)} matches {args.query!r}", file=sys.stderr)
    return 0
