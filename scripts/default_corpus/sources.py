"""The sources the default corpus is assembled from: installed Debian packages, the Python docs, the stdlib.

Each source knows its licence, its languages and a byte budget; `collect()` returns documents already cut to size.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .extract import chunk_text, html_to_text, read_maybe_gz, split_fortunes

#: Root under which Debian files are looked up (tests point this elsewhere).
_SYSROOT = Path("/")


@dataclass
class _Source:
    name: str
    lang: str
    license: str
    description: str
    collect: Callable[[], list[tuple[str, str]]]  # -> [(origin, text)] already split into documents
    cap_bytes: int
    packages: list[str] = field(default_factory=list)


def _dpkg_files(pkg: str) -> list[Path] | None:
    """Files installed by a Debian package (None when it is not installed)."""
    lst = _SYSROOT / "var/lib/dpkg/info" / f"{pkg}.list"
    if not lst.is_file():
        arch = sorted((_SYSROOT / "var/lib/dpkg/info").glob(f"{pkg}:*.list"))
        if not arch:
            return None
        lst = arch[0]
    out = []
    for line in lst.read_text("utf-8", errors="replace").splitlines():
        p = _SYSROOT / line.lstrip("/")
        if line and p.is_file() and not p.is_symlink():
            out.append(p)
    return out


def dpkg_versions(pkgs: Iterable[str]) -> dict[str, str]:
    status = _SYSROOT / "var/lib/dpkg/status"
    want = set(pkgs)
    found: dict[str, str] = {}
    if not status.is_file():
        return found
    for block in status.read_text("utf-8", errors="replace").split("\n\n"):
        m = re.search(r"^Package: (\S+)$", block, re.MULTILINE)
        if m and m.group(1) in want and "install ok installed" in block:
            v = re.search(r"^Version: (\S+)$", block, re.MULTILINE)
            if v:
                found[m.group(1)] = v.group(1)
    return found


#: fortune packages -> language of the files they install (debian-hints is per subfolder)
_FORTUNE_PACKAGES = {
    "fortunes": "en",
    "fortunes-min": "en",
    "fortunes-bofh-excuses": "en",
    "fortunes-debian-hints": "en",
    "fortunes-de": "de",
    "fortunes-es": "es",
    "fortunes-it": "it",
    "fortunes-ru": "ru",
    "fortunes-pl": "pl",
    "fortunes-cs": "cs",
    "fortunes-br": "pt",
    "fortunes-bg": "bg",
    "fortunes-eo": "eo",
    "fortunes-ga": "ga",
    "fortunes-zh": "zh",
    "fortunes-fr": "fr",
}
_FORTUNE_SKIP = {"ascii-art", "asciiart", "banner"}
_HINT_LANGS = {"zh_CN": "zh", "zh_TW": "zh", "sk": "sk"}


def _fortune_files() -> dict[str, list[tuple[str, Path]]]:
    """lang -> [(package, file)] for installed fortune data (offensive sections excluded)."""
    by_lang: dict[str, list[tuple[str, Path]]] = {}
    seen: set[Path] = set()
    for pkg, lang in _FORTUNE_PACKAGES.items():
        files = _dpkg_files(pkg)
        if not files:
            continue
        for f in sorted(files):
            rel = f.as_posix()
            if "/games/fortunes/" not in rel or f.suffix in (".dat", ".u8", ".gz"):
                continue
            parts = rel.split("/games/fortunes/", 1)[1].split("/")
            if "off" in parts or f.name in _FORTUNE_SKIP or f.resolve() in seen:
                continue
            if parts[0] == "cz":  # duplicate of cs/ in fortunes-cs
                continue
            seen.add(f.resolve())
            file_lang = lang
            if pkg == "fortunes-debian-hints" and len(parts) > 1:
                file_lang = _HINT_LANGS.get(parts[0], parts[0])
            by_lang.setdefault(file_lang, []).append((pkg, f))
    return by_lang


def _collect_fortunes(files: list[tuple[str, Path]]) -> list[tuple[str, str]]:
    out = []
    for _pkg, f in files:
        for cookie in split_fortunes(read_maybe_gz(f)):
            out.append((f.name, cookie))
    return out


def _collect_html(paths: Iterable[Path], max_chars: int = 4000) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        text = html_to_text(read_maybe_gz(p))
        out.extend((p.name, c) for c in chunk_text(text, max_chars))
    return out


def _collect_text(paths: Iterable[Path]) -> list[tuple[str, str]]:
    out = []
    for p in paths:
        out.extend((p.name, c) for c in chunk_text(read_maybe_gz(p)))
    return out


def _python_doc_dir() -> Path | None:
    cands = sorted((_SYSROOT / "usr/share/doc").glob("python3*/html/library"))
    cands = [c.parent for c in cands if (c.parent / "index.html").is_file()]
    if not cands:
        return None

    def ver(p: Path) -> tuple[int, ...]:
        m = re.search(r"python3\.?(\d*)", p.parent.name)
        return (int(m.group(1)) if m and m.group(1) else 0,)

    return max(cands, key=ver)


_PYDOC_SKIP = re.compile(r"^(genindex|search|py-modindex|contents|download|copyright|license|bugs)|changelog")


def _python_html_files() -> list[Path]:
    root = _python_doc_dir()
    if root is None:
        return []
    out = []
    for p in sorted(root.rglob("*.html")):
        rel = p.relative_to(root)
        if rel.parts[0].startswith("_") or _PYDOC_SKIP.search(p.name):
            continue
        out.append(p)
    return out


#: stdlib parts that are tests, tools or platform glue rather than documented API
_STDLIB_SKIP = {
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "turtledemo",
    "__pycache__",
    "ensurepip",
    "config-3",
    "pydoc_data",
    "encodings",
}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if any(part in _STDLIB_SKIP or part.startswith(("config-", "test_")) for part in rel.parts):
            continue
        out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def _docstring_doc(path: Path) -> str:
    """A module's docstrings as one text: module, then each public class / function with its signature."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return ""
    mod = path.stem if path.stem != "__init__" else path.parent.name
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {mod}\n\n{doc}")

    def visit(nodes: list[ast.stmt], prefix: str) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_") and node.name != "__init__":
                    continue
                d = ast.get_docstring(node)
                if isinstance(node, ast.ClassDef):
                    if d:
                        parts.append(f"class {prefix}{node.name}\n\n{d}")
                    visit(node.body, f"{prefix}{node.name}.")
                elif d:
                    sig = ast.unparse(node.args)
                    parts.append(f"{prefix}{node.name}({sig})\n\n{d}")

    visit(tree.body, f"{mod}.")
    return "\n\n".join(parts)


#: docstring source cap; tests lower it to keep the fallback build fast
_STDLIB_CAP_BYTES = 3_000_000


def _collect_stdlib() -> list[tuple[str, str]]:
    files = _stdlib_files()
    random.Random(1234).shuffle(files)  # a cap then samples modules evenly
    out, total = [], 0
    for f in files:
        for c in chunk_text(_docstring_doc(f)):
            out.append((f.name, c))
            total += len(c.encode("utf-8"))
        if total >= _STDLIB_CAP_BYTES:
            break
    return out


def _pkg_paths(pkg: str, pattern: str) -> list[Path]:
    files = _dpkg_files(pkg) or []
    rx = re.compile(pattern)
    return sorted(p for p in files if rx.search(p.as_posix()))


_HANDBOOK_LANGS = {
    "en-US": "en",
    "de-DE": "de",
    "fr-FR": "fr",
    "es-ES": "es",
    "it-IT": "it",
    "pt-BR": "pt",
    "ru-RU": "ru",
    "ja-JP": "ja",
    "zh-CN": "zh",
    "pl-PL": "pl",
    "nl-NL": "nl",
}
_REFERENCE_LANGS = {"en": "en", "de": "de", "fr": "fr", "es": "es", "it": "it", "pt": "pt", "ja": "ja"}

MB = 1_000_000


def all_sources() -> list[_Source]:
    """The recipe of the default corpus (order only matters for de-duplication)."""
    srcs: list[_Source] = []
    pydoc_files = _python_html_files()
    if pydoc_files:
        srcs.append(
            _Source(
                "python-docs",
                "en",
                "PSF-2.0 (Python documentation)",
                "Python library reference, tutorial and HOWTOs (HTML converted to text)",
                lambda: _collect_html(pydoc_files),
                4 * MB,
                ["python3.11-doc"],
            )
        )
    else:
        srcs.append(
            _Source(
                "python-docstrings",
                "en",
                "PSF-2.0 (Python standard library)",
                "docstrings of the Python standard library modules (parsed with ast, nothing imported)",
                _collect_stdlib,
                _STDLIB_CAP_BYTES,
                [],
            )
        )
    fortune_langs = _fortune_files()
    for lang in sorted(fortune_langs, key=lambda x: (x != "en", x)):
        files = fortune_langs[lang]
        pkgs = sorted({p for p, _ in files})
        srcs.append(
            _Source(
                f"fortunes-{lang}",
                lang,
                "free (BSD / GPL-2+ / public domain; see each package's copyright)",
                f"fortune(6) cookies in language {lang!r}: quotations, jokes, proverbs, poems",
                lambda files=files: _collect_fortunes(files),
                3 * MB if lang == "en" else 400_000,
                pkgs,
            )
        )
    jargon = _pkg_paths("jargon-text", r"jargon\.txt(\.gz)?$")
    if jargon:
        srcs.append(
            _Source(
                "jargon-file",
                "en",
                "public domain",
                "The Jargon File (hacker slang lexicon)",
                lambda: _collect_text(jargon),
                1 * MB,
                ["jargon-text"],
            )
        )
    gnu = _pkg_paths("gnu-standards", r"\.text(\.gz)?$")
    if gnu:
        srcs.append(
            _Source(
                "gnu-standards",
                "en",
                "GFDL-1.3+ (no invariant sections)",
                "GNU Coding Standards and Information for GNU Maintainers",
                lambda: _collect_text(gnu),
                1 * MB,
                ["gnu-standards"],
            )
        )
    bash = _pkg_paths("bash-doc", r"/bashref\.html$")
    if bash:
        srcs.append(
            _Source(
                "bash-manual",
                "en",
                "GFDL-1.3+ (bash manual)",
                "GNU Bash Reference Manual",
                lambda: _collect_html(bash),
                1 * MB,
                ["bash-doc"],
            )
        )
    debdoc = _pkg_paths("doc-debian", r"/usr/share/doc/debian/[^/]*(\.txt(\.gz)?|manifesto\.gz)$")
    debdoc = [p for p in debdoc if not re.search(r"\.\d\.\d\.txt|\.1\.\d\.txt", p.name)]  # old versions
    faq = _pkg_paths("debian-faq", r"/FAQ/[^/]*\.en\.html$")
    if debdoc or faq:
        srcs.append(
            _Source(
                "debian-docs",
                "en",
                "GPL-2+ / DFSG-free (see package copyright)",
                "Debian FAQ, Social Contract, Constitution, bug-reporting guides",
                lambda: _collect_text(debdoc) + _collect_html(faq),
                1 * MB,
                [p for p, fs in (("doc-debian", debdoc), ("debian-faq", faq)) if fs],
            )
        )
    for code, lang in _REFERENCE_LANGS.items():
        files = _pkg_paths(f"debian-reference-{code}", rf"/debian-reference/[^/]*\.{code}\.html$")
        if files:
            srcs.append(
                _Source(
                    f"debian-reference-{lang}",
                    lang,
                    "GPL-2+",
                    f"Debian Reference (system administration), {lang}",
                    lambda files=files: _collect_html(files),
                    1 * MB if lang == "en" else 500_000,
                    [f"debian-reference-{code}"],
                )
            )
    for code, lang in _HANDBOOK_LANGS.items():
        files = _pkg_paths("debian-handbook", rf"/debian-handbook/html/{code}/[^/]*\.html$")
        if files:
            srcs.append(
                _Source(
                    f"debian-handbook-{lang}",
                    lang,
                    "GPL-2+ or CC-BY-SA-3.0",
                    f"The Debian Administrator's Handbook, {lang}",
                    lambda files=files: _collect_html(files),
                    2 * MB if lang == "en" else 350_000,
                    ["debian-handbook"],
                )
            )
    return srcs
