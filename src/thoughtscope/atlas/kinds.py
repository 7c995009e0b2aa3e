"""Kinds of text a reader recognises without being told which strings to look for: scripts, languages, code.

An explanation may say `in German text` or `in Cyrillic text` instead of quoting strings; a person (or an LLM
scorer) reading it knows what German or Cyrillic looks like. The lexical scorer (scoring.py) stands in for
that reader with the fixed, feature-independent knowledge below, and the offline explainer (cue_search.py)
may name a kind when the feature's windows are of that kind far more often than ordinary text is. Nothing
here depends on a feature or an atlas: it is general knowledge of the corpus's languages, written once.

Each kind gives a text (lower-cased) a strength in [0, 1]: 0 when the text shows nothing of the kind, larger
the more of it the text has; `present` is strength >= 0.5.

* scripts: the share of the text's letters in that script, lifted to >= 0.5 as soon as one such character
  occurs (a few characters in a short window are already decisive);
* languages written in Latin letters: each word that is a common function word of a language counts for that
  language (shared by k languages: 1/k each), each letter peculiar to a few of them (ß, ñ, ř, ł, ĉ ...) half as
  much; a language is present when it has at least 1.5 of that evidence and more than any other language, and
  its strength is its share of all the languages' evidence, damped when the evidence is thin;
* code: the share of the text's non-space characters that are code punctuation (brackets, `=`, `_`, `;`, ...),
  plus identifiers written like `foo_bar`, `foo.bar(` or `->`.
"""

from __future__ import annotations

import re
from functools import lru_cache

# ----------------------------------------------------------------------------- scripts
SCRIPTS = {
    "cyrillic": r"[\u0400-\u04ff]",
    "cjk": r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]",
    "chinese": r"[\u3400-\u9fff]",
    "japanese": r"[\u3040-\u30ff\u3400-\u9fff]",
    "korean": r"[\uac00-\ud7af]",
    "greek": r"[\u0370-\u03ff]",
    "arabic": r"[\u0600-\u06ff]",
    "accented": r"[\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u017f]",
    "non-ascii": r"[^\x00-\x7f⏎]",
    "non-english": r"[^\x00-\x7f⏎]",
    "digits": r"[0-9]",
    "numbers": r"[0-9]",
}
_SCRIPT_RE = {k: re.compile(v) for k, v in SCRIPTS.items()}

# ----------------------------------------------------------------------------- languages
# Common function words of the corpus's languages written in Latin letters (lower case).
_FUNCTION_WORDS = {
    "english": """the and of to is that for with this are was you not be on it as by from have which or an can will if
        but they has when what there all would one its been were their into than them then also these only more
        such may should does how use used""",
    "german": """der die das und ist nicht ein eine zu den von mit sich des auf für im dem auch es an als wird werden
        bei oder aus nach wie kann sie ich wir sind einen einem einer über nur noch wenn dass daß man aber diese
        dieser zum zur vom um durch keine kein hat haben ihr ihre sein seine mehr muss soll""",
    "french": """le la les des est une un et du en que qui dans pour pas sur au aux par ne se ce cette sont avec il
        elle vous nous ou mais plus être peut son sa ses leur leurs été fait tout tous comme très aussi sans entre
        dont même""",
    "spanish": """el la los las de del que y en un una es por con para no se al lo como más pero sus su este esta
        está son puede sin sobre cuando también hay ser muy todo todos otro otros entre ya desde hasta porque""",
    "italian": """il lo la gli le di del della dei delle che e è un una per non con in si da al alla come sono anche
        più ma questo questa può nel nella ad ed se ci degli dello sul sulla tra fra essere molto tutti""",
    "portuguese": """o a os as de do da dos das que e é um uma em no na nos para com não por se mais como ao pode
        são seu sua você mas ou está também pelo pela isso ser muito quando""",
    "dutch": """de het een en van is dat die in te op niet zijn voor met er ook als aan wordt worden kan door bij
        naar om maar dit deze zal hij je u of wat nog geen heeft hebben""",
    "czech": """a je v se na to že s z do o k i jako pro ale jsou by si jak není od po co tak které který která ve
        ze jsem jen už nebo když být""",
    "polish": """i w się nie na z do to że jest jak o po co tak a ale od za przez dla są może jego jej już czy
        tylko lub ze we być""",
    "esperanto": """la kaj de en estas al ne mi vi li ŝi ni ili kiu kio por sed kun ke pli unu tiu ĉi ĉu se el nur
        havas esti oni estis sia lia ilia""",
}
# Letters peculiar to a few of those languages.
_LETTERS = {
    "german": "äöüß",
    "french": "éèêàçœùâîôûë",
    "spanish": "ñ¿¡áíóú",
    "italian": "èàòùì",
    "portuguese": "ãõçáéíóúâêô",
    "czech": "řěšůžčýťďň",
    "polish": "łąęśźżńć",
    "esperanto": "ĉĝĥĵŝŭ",
}
LANGUAGES = tuple(_FUNCTION_WORDS)

_WORD_LANGS: dict[str, tuple[str, ...]] = {}
for _lang, _words in _FUNCTION_WORDS.items():
    for _w in _words.split():
        _WORD_LANGS[_w] = _WORD_LANGS.get(_w, ()) + (_lang,)
_LETTER_LANGS: dict[str, tuple[str, ...]] = {}
for _lang, _chars in _LETTERS.items():
    for _c in _chars:
        _LETTER_LANGS[_c] = _LETTER_LANGS.get(_c, ()) + (_lang,)
_WORDS = re.compile(r"[^\W\d_]+")
_MIN_EVIDENCE = 1.5


@lru_cache(maxsize=200_000)
def language_evidence(text_lower: str) -> dict[str, float]:
    """Per language, the evidence the text gives for it (function words 1/k, peculiar letters 1/(2k))."""
    ev: dict[str, float] = {}
    for w in _WORDS.findall(text_lower):
        langs = _WORD_LANGS.get(w)
        if langs:
            for lang in langs:
                ev[lang] = ev.get(lang, 0.0) + 1.0 / len(langs)
    for c in text_lower:
        langs = _LETTER_LANGS.get(c)
        if langs:
            for lang in langs:
                ev[lang] = ev.get(lang, 0.0) + 0.5 / len(langs)
    return ev


def _language_strength(lang: str, text_lower: str) -> float:
    ev = language_evidence(text_lower)
    mine = ev.get(lang, 0.0)
    if mine <= 0:
        return 0.0
    return _language_strength_from(mine, sum(ev.values()), max(ev.values()))


def _language_strength_from(mine: float, total: float, best: float) -> float:
    """A language's strength from its evidence, all languages' summed evidence and the largest one."""
    if mine <= 0:
        return 0.0
    share = mine / total
    if mine >= _MIN_EVIDENCE and mine >= best:
        return 0.5 + 0.5 * share * min(1.0, mine / (2 * _MIN_EVIDENCE))
    return 0.49 * share * min(1.0, mine / _MIN_EVIDENCE)


# ----------------------------------------------------------------------------- code
_CODE_CHARS = set("(){}[]=_;<>*/\\#$|&%")
_CODE_IDENT = re.compile(r"[a-z0-9]_[a-z0-9]|[a-z]\.[a-z_]+\(|->|::|\(\)|==|!=|\+=")


def _code_strength(text_lower: str) -> float:
    chars = [c for c in text_lower if not c.isspace() and c != "⏎"]
    if not chars:
        return 0.0
    share = sum(c in _CODE_CHARS for c in chars) / len(chars)
    idents = len(_CODE_IDENT.findall(text_lower))
    raw = share / 0.08 + 0.5 * idents  # 8 % code punctuation, or two code-like identifiers: clearly code
    return min(1.0, raw / 2)


# ----------------------------------------------------------------------------- layout
_PATH = re.compile(
    r"https?://|www\.|[a-z0-9_~.-]*/[a-z0-9_.-]+/|[a-z0-9_-]+\.(?:py|c|h|so|conf|cfg|txt|html|org|com|net)\b"
)
_PUNCT = set(".,:;!?()[]{}\"'«»“”‘’-–—*/\\|<>=#%&@$^~`+")


def _layout_strength(kind: str, text_lower: str) -> float:
    if kind == "line-breaks":
        n = text_lower.count("⏎")
        return 0.0 if n == 0 else 0.5 + 0.5 * min(1.0, (n - 1) / 3)
    if kind == "paths":
        n = len(_PATH.findall(text_lower))
        return 0.0 if n == 0 else 0.5 + 0.5 * min(1.0, (n - 1) / 2)
    if kind == "punctuation":
        chars = [c for c in text_lower if not c.isspace() and c != "⏎"]
        share = sum(c in _PUNCT for c in chars) / max(1, len(chars))
        return min(1.0, share / 0.3)
    raise KeyError(kind)


LAYOUT = ("line-breaks", "paths", "punctuation")

# ----------------------------------------------------------------------------- the kinds
KINDS: tuple[str, ...] = tuple(SCRIPTS) + LANGUAGES + ("code",) + LAYOUT


def is_kind(word: str) -> bool:
    return word in SCRIPTS or word in _FUNCTION_WORDS or word == "code" or word in LAYOUT


_NON_ASCII = re.compile(r"[^\x00-\x7f⏎]")
_BEYOND_ASCII = frozenset(k for k in SCRIPTS if k not in ("digits", "numbers"))


@lru_cache(maxsize=100_000)
def strengths(kinds: tuple[str, ...], text_lower: str) -> tuple[float, ...]:
    """`strength` of each kind for one text, computed together (the same numbers): the offline explainer reads
    all kinds of every window it learns from. In a text with no character beyond ASCII (most windows) every
    non-Latin script is absent without a search, and the languages share one reading of the words."""
    plain = _NON_ASCII.search(text_lower) is None
    ev = language_evidence(text_lower)
    total, best = (sum(ev.values()), max(ev.values())) if ev else (0.0, 0.0)
    out = []
    for k in kinds:
        if plain and k in _BEYOND_ASCII:
            out.append(0.0)
        elif k in _FUNCTION_WORDS:
            out.append(_language_strength_from(ev.get(k, 0.0), total, best))
        else:
            out.append(strength(k, text_lower))
    return tuple(out)


@lru_cache(maxsize=400_000)
def strength(kind: str, text_lower: str) -> float:
    """How much of `kind` the (lower-cased) text shows, in [0, 1]; >= 0.5 means it is of that kind."""
    if kind in SCRIPTS:
        hits = len(_SCRIPT_RE[kind].findall(text_lower))
        if not hits:
            return 0.0
        letters = sum(c.isalpha() or c.isdigit() for c in text_lower) or 1
        return 0.5 + 0.5 * min(1.0, hits / letters)
    if kind in _FUNCTION_WORDS:
        return _language_strength(kind, text_lower)
    if kind == "code":
        return _code_strength(text_lower)
    if kind in LAYOUT:
        return _layout_strength(kind, text_lower)
    raise KeyError(f"unknown kind of text {kind!r}; known: {', '.join(KINDS)}")


def present(kind: str, text_lower: str) -> bool:
    return strength(kind, text_lower) >= 0.5
