#!/usr/bin/env bash
# Install the Debian packages the default corpus is assembled from, then build it.
#
#   scripts/build_corpus.sh [--no-apt] [--dest DIR] [--seed N]
#
# Packages that the archive does not have are skipped with a warning; the build
# itself needs no network and falls back to the Python stdlib docstrings when
# none of the packages could be installed.
# PYTHON selects the interpreter (default: python3 on PATH).
set -uo pipefail

PYTHON="${PYTHON:-python3}"
PACKAGES=(
  # fortune(6) cookies: English and other languages
  fortunes fortunes-min fortunes-bofh-excuses fortunes-debian-hints
  fortunes-de fortunes-es fortunes-it fortunes-ru fortunes-pl fortunes-cs
  fortunes-br fortunes-bg fortunes-eo fortunes-ga fortunes-zh fortunes-fr
  # prose documentation
  python3-doc jargon-text gnu-standards bash-doc doc-debian debian-faq
  debian-reference-en debian-reference-de debian-reference-fr
  debian-reference-es debian-reference-it debian-handbook
)

do_apt=1
args=()
for a in "$@"; do
  if [[ "$a" == "--no-apt" ]]; then do_apt=0; else args+=("$a"); fi
done

if [[ $do_apt == 1 ]]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "build_corpus: apt-get not found; building from whatever is installed" >&2
  else
    SUDO=""
    if [[ $(id -u) != 0 ]]; then
      if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
        echo "build_corpus: warning: not root and no sudo; skipping apt-get" >&2; do_apt=0; fi
    fi
  fi
fi

if [[ $do_apt == 1 ]] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || echo "build_corpus: warning: apt-get update failed" >&2
  available=()
  for p in "${PACKAGES[@]}"; do
    if apt-cache show "$p" >/dev/null 2>&1; then
      available+=("$p")
    else
      echo "build_corpus: warning: package $p not available, skipping" >&2
    fi
  done
  if (( ${#available[@]} )); then
    if ! $SUDO apt-get install -y -qq --no-install-recommends "${available[@]}"; then
      echo "build_corpus: warning: batch install failed; trying packages one by one" >&2
      for p in "${available[@]}"; do
        $SUDO apt-get install -y -qq --no-install-recommends "$p" \
          || echo "build_corpus: warning: could not install $p, skipping" >&2
      done
    fi
  fi
fi

cd "$(dirname "$0")/.." && exec "$PYTHON" -m scripts.default_corpus.build "${args[@]}"
