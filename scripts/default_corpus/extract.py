"""Text extraction for the default corpus: HTML to text, paragraph chunking, fortune cookies."""

from __future__ import annotations

import gzip
import re
from html.parser import HTMLParser
from pathlib import Path

_SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "button", "form"}
_SKIP_CLASSES = {
    "sphinxsidebar",
    "related",
    "footer",
    "navheader",
    "navfooter",
    "toc",
    "headerlink",
    "version_switcher_placeholder",
    "language_switcher_placeholder",
    "breadcrumbs",
    "mobile-nav",
    "mobile-nav-toggle",
    "copyright",
    "legalnotice",
    "index",
    "indexdiv",
    "header",
    "nav-panel",
    "contents-heading",
    "shortcontents",
    "docnav",
}
_BLOCK_TAGS = {
    "p",
    "div",
    "section",
    "article",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "tr",
    "table",
    "blockquote",
    "pre",
    "title",
    "figure",
    "figcaption",
    "caption",
    "hr",
    "br",
    "tbody",
    "thead",
}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "wbr", "area", "base", "col", "source"}


class _HTMLText(HTMLParser):
    """HTML -> readable plain text: drops navigation, keeps paragraphs and code blocks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip_tag: str | None = None
        self.skip_depth = 0
        self.pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag and tag not in _VOID_TAGS:
                self.skip_depth += 1
            return
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if (
            tag in _SKIP_TAGS
            or classes & _SKIP_CLASSES
            or a.get("id") in ("banner", "site_footer")
            or a.get("role") in ("navigation", "search")
            or a.get("aria-label") == "source link"
        ):
            if tag not in _VOID_TAGS:
                self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "pre":
            self.pre += 1
        if tag in _BLOCK_TAGS and not (self.out and self.out[-1] == "- "):  # "- " + <p> stays one line
            self.out.append("\n\n" if tag not in ("br", "li", "tr", "dt", "dd") else "\n")
        if tag == "li":
            self.out.append("- ")
        if tag in ("td", "th"):
            self.out.append(" ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skip_tag is None and tag in ("br", "hr"):
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in _BLOCK_TAGS:
            self.out.append("\n\n" if tag not in ("li", "tr", "dt", "dd") else "\n")

    def handle_data(self, data: str) -> None:
        if self.skip_tag is not None:
            return
        if self.pre:
            self.out.append(data)
            return
        data = re.sub(r"\s+", " ", data)
        if not self.out or self.out[-1].endswith("\n") or self.out[-1].endswith("- "):
            data = data.lstrip()
        if data:
            self.out.append(data)

    def text(self) -> str:
        raw = "".join(self.out).replace("\u00b6", "")
        text = "\n".join(ln.rstrip() for ln in raw.split("\n"))
        text = re.sub(r"\n{3,}", "\n\n", text)
        return text.strip()


def html_to_text(html: str) -> str:
    p = _HTMLText()
    p.feed(html)
    p.close()
    return p.text()


def read_maybe_gz(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few old Debian texts are Latin-1; our own builder may be lenient
        return data.decode("latin-1")


def _drop_index_runs(paras: list[str], run: int = 8) -> list[str]:
    """Remove tables of contents / word lists: runs of >= ``run`` paragraphs that are one short line."""

    def short(p: str) -> bool:
        p = p.strip()
        return "\n" not in p and len(p) < 40 and not p.endswith((".", "!", "?", ":"))

    out: list[str] = []
    i = 0
    while i < len(paras):
        j = i
        while j < len(paras) and short(paras[j]):
            j += 1
        if j - i >= run:
            i = j
            continue
        out.extend(paras[i : max(j, i + 1)])
        i = max(j, i + 1)
    return out


def chunk_text(text: str, max_chars: int = 4000, min_chars: int = 40) -> list[str]:
    """Split a long text into documents at paragraph boundaries (each <= ~max_chars).

    Short documents make the shuffled default corpus diverse within a few
    thousand tokens; paragraphs keep each chunk readable on its own.
    """
    text = text.replace("\r\n", "\n").strip()
    if not text:
        return []
    paras = _drop_index_runs([p for p in re.split(r"\n[ \t]*\n(?:[ \t]*\n)*", text) if p.strip()])
    pieces: list[str] = []
    for p in paras:
        if len(p) <= max_chars:
            pieces.append(p)
            continue
        lines, cur = p.split("\n"), ""
        for ln in lines:
            while len(ln) > max_chars:
                cut = ln.rfind(" ", 0, max_chars)
                cut = cut if cut > max_chars // 2 else max_chars
                if cur:
                    pieces.append(cur)
                    cur = ""
                pieces.append(ln[:cut])
                ln = ln[cut:].lstrip()
            if cur and len(cur) + 1 + len(ln) > max_chars:
                pieces.append(cur)
                cur = ln
            else:
                cur = f"{cur}\n{ln}" if cur else ln
        if cur:
            pieces.append(cur)
    chunks, cur = [], ""
    for p in pieces:
        if cur and len(cur) + 2 + len(p) > max_chars:
            chunks.append(cur)
            cur = p
        else:
            cur = f"{cur}\n\n{p}" if cur else p
    if cur:
        chunks.append(cur)
    return [c for c in (c.strip() for c in chunks) if len(c) >= min_chars]


def split_fortunes(text: str) -> list[str]:
    """Split a fortune(6) data file into its cookies (separated by lines of ``%``)."""
    out = []
    for cookie in re.split(r"^%%?\s*$", text.replace("\r\n", "\n"), flags=re.MULTILINE):
        cookie = cookie.strip("\n").rstrip()
        if len(cookie.strip()) >= 10:
            out.append(cookie)
    return out
