#!/usr/bin/env bash
# Regenerate rigl_ds/corpus/kjv.txt.xz (King James Bible, one verse per line) from the
# Debian package bible-kjv-text, plus kjv.sha256 and kjv.json beside it.
# Usage (from anywhere):  apt-get install bible-kjv && bash rigl_ds/corpus/make_kjv.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

for tool in bible dpkg-query python3 xz; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        if [ "$tool" = bible ]; then
            echo "error: 'bible' not found; install it with: apt-get install bible-kjv" >&2
        else
            echo "error: required tool '$tool' not found" >&2
        fi
        exit 1
    fi
done

version="$(dpkg-query -W -f='${Version}' bible-kjv-text)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# -l0: no line wrapping (pretty-printed: "Book N" chapter headers between blank
# lines, each verse on one line as "  <verse> <text>").
LC_ALL=C bible -l0 "Genesis 1:1-Revelation 22:21" > "$tmp/raw.txt"

python3 - "$tmp/raw.txt" "$tmp/kjv.txt" "$tmp/kjv.json" "$tmp/kjv.sha256" "$version" <<'PY'
import hashlib, json, re, sys

raw_path, txt_path, json_path, sha_path, version = sys.argv[1:]
BOOKS = """Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|1 Samuel|
2 Samuel|1 Kings|2 Kings|1 Chronicles|2 Chronicles|Ezra|Nehemiah|Esther|Job|Psalms|
Proverbs|Ecclesiastes|Song of Solomon|Isaiah|Jeremiah|Lamentations|Ezekiel|Daniel|
Hosea|Joel|Amos|Obadiah|Jonah|Micah|Nahum|Habakkuk|Zephaniah|Haggai|Zechariah|
Malachi|Matthew|Mark|Luke|John|Acts|Romans|1 Corinthians|2 Corinthians|Galatians|
Ephesians|Philippians|Colossians|1 Thessalonians|2 Thessalonians|1 Timothy|
2 Timothy|Titus|Philemon|Hebrews|James|1 Peter|2 Peter|1 John|2 John|3 John|Jude|
Revelation""".replace("\n", "").split("|")
EXPECTED_VERSES, EXPECTED_CHAPTERS = 31102, 1189

header_re = re.compile(r"^(.+?) (\d+)$")
verse_re = re.compile(r"^\s+(\d+) (.*)$")
verses, books = [], []
book = chapter = None
last_verse = 0
with open(raw_path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        m = verse_re.match(line)
        if m:
            v = int(m.group(1))
            if book is None or v != last_verse + 1:
                sys.exit(f"line {n}: unexpected verse number {v}: {line[:60]!r}")
            last_verse = v
            text = " ".join(m.group(2).split())
            if not text:
                sys.exit(f"line {n}: empty verse")
            verses.append(text)
            continue
        m = header_re.match(line)
        if m:
            name, ch = m.group(1), int(m.group(2))
            if name != book:
                books.append(name)
                book, chapter = name, 0
            if ch != chapter + 1:
                sys.exit(f"line {n}: unexpected chapter {line!r}")
            chapter, last_verse = ch, 0
            continue
        sys.exit(f"line {n}: unrecognised line {line[:60]!r}")

if books != BOOKS:
    sys.exit(f"books not in canonical order: {books}")
if len(verses) != EXPECTED_VERSES:
    sys.exit(f"expected {EXPECTED_VERSES} verses, got {len(verses)}")

text = "\n".join(verses) + "\n"
data = text.encode("utf-8")
sha = hashlib.sha256(data).hexdigest()
with open(txt_path, "wb") as f:
    f.write(data)
with open(sha_path, "w", encoding="utf-8") as f:
    f.write(f"{sha}  kjv.txt\n")
meta = {
    "source": f"Debian package bible-kjv-text {version}",
    "lines": len(verses),
    "characters": len(text),
    "bytes_uncompressed": len(data),
    "sha256_uncompressed": sha,
}
with open(json_path, "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
print(json.dumps(meta))
PY

xz -9e --threads=1 -c "$tmp/kjv.txt" > "$tmp/kjv.txt.xz"
mv "$tmp/kjv.txt.xz" "$here/kjv.txt.xz"
mv "$tmp/kjv.sha256" "$here/kjv.sha256"
mv "$tmp/kjv.json" "$here/kjv.json"
ls -l "$here/kjv.txt.xz"
