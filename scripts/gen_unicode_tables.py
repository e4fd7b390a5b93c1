#!/usr/bin/env python3
"""Generates csrc/tokenizer/unicode_tables.cc, the Unicode data of the C++ WordPiece tokenizer.

The tokenizer matches HuggingFace's Rust tokenizer (`tokenizers`, what BertTokenizerFast runs),
which takes its Unicode data from two places of two different ages:

  * general categories from the `unicode_categories` crate, i.e. Unicode 8.0: they decide which
    characters clean-up removes (Cc, Cf, Co, Cs), which are punctuation (P*) and which marks
    accent stripping drops (Mn);
  * Rust's standard library, i.e. Unicode 17.0: White_Space and lower-case mappings (full
    mappings: U+0130 becomes two characters);
  * HF's fork of the `unicode-normalization` crate for NFD, i.e. Unicode 9.0: it decomposes and
    reorders (by canonical combining class) only the characters Unicode 9.0 assigns. Decompositions
    and combining classes never change once assigned, so a newer table restricted to the
    characters 9.0 assigns is 9.0's.

So this script reads the Unicode 8.0 and 9.0 categories and the Unicode 17.0 case mappings from
the C headers that CPython's makeunicodedata.py generated and that the `unicodedata2` sdists on
PyPI carry (the old ones no longer compile on current Python, their headers still parse), and the
decompositions through the `unicodedata2` 17.0.1 wheel itself. It fetches them with pip:

    python scripts/gen_unicode_tables.py            # pip-downloads unicodedata2 8.0.0, 9.0.0.post4, 17.0.1
    python scripts/gen_unicode_tables.py --check    # fails if the committed file is stale

Output layout (see unicode.h): a two-stage table code point -> record, each record holding flag
bits and, where a character changes, the index of its replacement in a shared pool.
"""

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile

from generated_file import write_or_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "csrc", "tokenizer", "unicode_tables.cc")
CATEGORY_VERSION = "8.0.0"  # unicode_categories crate
NORMALIZATION_PACKAGE = "9.0.0.post4"  # unicodedata2 release holding Unicode 9.0.0
NORMALIZATION_VERSION = "9.0.0"  # HF's unicode-normalization-alignments crate
MAPPING_VERSION = "17.0.1"  # unicodedata2 release holding Unicode 17.0.0 (Rust std)
MAX_CP = 0x110000
BLOCK = 256

# Flag bits, mirrored in unicode.h.
F_REMOVE = 1  # dropped by clean-up: NUL, U+FFFD and Cc/Cf/Co/Cs other than \t \n \r
F_SPACE = 2  # becomes a space in clean-up and splits words: \t \n \r and White_Space
F_PUNCT = 4  # a word of its own: ASCII symbols and P*
F_HAS_LOWER = 8  # lower-case mapping differs from the character
F_HAS_NFD = 16  # has a canonical decomposition (NFD differs from the character)
F_MN = 32  # a nonspacing mark (Mn), dropped by accent stripping


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def _c_array(text, name):
    """The integer items of the C array ``name`` in ``text`` (records as tuples)."""
    match = re.search(r"\b" + re.escape(name) + r"\[\] = \{(.*?)\n\};", text, re.S)
    if not match:
        raise SystemExit(f"array {name} not found in the unicodedata2 header")
    body = match.group(1)
    if "{" in body:
        return [tuple(int(x) for x in rec.split(",")) for rec in re.findall(r"\{([^{}]*)\}", body)]
    return [int(x) for x in re.findall(r"-?\d+", body)]


def _two_stage(text, records_name):
    shift = int(re.search(r"#define SHIFT (\d+)", text).group(1))
    records = _c_array(text, records_name)
    index1 = _c_array(text, "index1")
    index2 = _c_array(text, "index2")
    mask = (1 << shift) - 1

    def record(cp):
        return records[index2[(index1[cp >> shift] << shift) + (cp & mask)]]

    return record


def _sdist_header(version, header, workdir):
    _pip("download", "--no-deps", "--no-binary", ":all:", "-d", workdir, f"unicodedata2=={version}")
    path = os.path.join(workdir, f"unicodedata2-{version}.tar.gz")
    with tarfile.open(path) as tar:
        # 12.x keeps the Python 3 headers in a py3/ subfolder
        names = [f"unicodedata2-{version}/unicodedata2/{header}", f"unicodedata2-{version}/unicodedata2/py3/{header}"]
        member = next(n for n in names if n in tar.getnames())
        return tar.extractfile(member).read().decode("utf-8")


def _categories(version, workdir, package=None):
    db = _sdist_header(package or version, "unicodedata_db.h", workdir)
    assert f'UNIDATA_VERSION "{version}"' in db
    names = re.search(r"_PyUnicode_CategoryNames\[\] = \{(.*?)\};", db, re.S).group(1)
    category_names = re.findall(r'"(\w*)"', names)
    cat_record = _two_stage(db, "_PyUnicode_Database_Records")
    return [category_names[cat_record(cp)[0]] for cp in range(MAX_CP)]


def load_data(workdir):
    categories = _categories(CATEGORY_VERSION, workdir)
    normalization_assigned = [c != "Cn" for c in _categories(NORMALIZATION_VERSION, workdir, NORMALIZATION_PACKAGE)]

    type16 = _sdist_header(MAPPING_VERSION, "unicodetype_db.h", workdir)
    extended = _c_array(type16, "_PyUnicode_ExtendedCase")
    type_record = _two_stage(type16, "_PyUnicode_TypeRecords")

    def lower(cp):
        _upper, low, _title, _dec, _dig, flags = type_record(cp)
        if flags & 0x4000:  # EXTENDED_CASE_MASK: index and length into _PyUnicode_ExtendedCase
            index, n = low & 0xFFFF, low >> 24
            return extended[index:index + n]
        return [(cp + low) & 0xFFFFFFFF if low >= 0 else cp + low]

    lowers = [lower(cp) for cp in range(MAX_CP)]

    target = os.path.join(workdir, "ud16")
    _pip("install", "--no-deps", "--target", target, f"unicodedata2=={MAPPING_VERSION}")
    sys.path.insert(0, target)
    import unicodedata2

    assert unicodedata2.unidata_version == "17.0.0"
    return categories, normalization_assigned, lowers, unicodedata2


def build_records(categories, normalization_assigned, lowers, ud16):
    white_space = set(range(0x09, 0x0E)) | {0x85}
    white_space |= {cp for cp in range(MAX_CP) if ud16.category(chr(cp)) in ("Zs", "Zl", "Zp")}

    pool = []  # replacement code points, shared
    pool_index = {}

    def intern(seq):
        key = tuple(seq)
        if key not in pool_index:
            pool_index[key] = len(pool)
            pool.extend(key)
        return pool_index[key]

    records = {}  # record tuple -> index
    per_cp = []
    for cp in range(MAX_CP):
        cat = categories[cp]
        flags = 0
        # Removal is tested first: U+000B, U+000C and U+0085 are White_Space but also Cc.
        if cp == 0 or cp == 0xFFFD or (cat in ("Cc", "Cf", "Co", "Cs") and cp not in (0x09, 0x0A, 0x0D)):
            flags |= F_REMOVE
        elif cp in (0x09, 0x0A, 0x0D) or cp in white_space:
            flags |= F_SPACE
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or cat.startswith("P"):
            flags |= F_PUNCT
        lower_seq = lowers[cp]
        lower_at = lower_len = 0
        if list(lower_seq) != [cp]:
            flags |= F_HAS_LOWER
            lower_at, lower_len = intern(lower_seq), len(lower_seq)
        if cat == "Mn":
            flags |= F_MN
        nfd_at = nfd_len = ccc = 0
        if normalization_assigned[cp] and not 0xD800 <= cp <= 0xDFFF:
            nfd = [ord(c) for c in ud16.normalize("NFD", chr(cp))]
            if nfd != [cp]:
                flags |= F_HAS_NFD
                nfd_at, nfd_len = intern(nfd), len(nfd)
            ccc = ud16.combining(chr(cp))  # canonical ordering of NFD
        rec = (flags, lower_len, nfd_len, ccc, lower_at, nfd_at)
        per_cp.append(records.setdefault(rec, len(records)))

    blocks = {}
    stage1 = []
    stage2 = []
    for start in range(0, MAX_CP, BLOCK):
        block = tuple(per_cp[start:start + BLOCK])
        if block not in blocks:
            blocks[block] = len(blocks)
            stage2.extend(block)
        stage1.append(blocks[block])
    ordered = sorted(records, key=records.get)
    return stage1, stage2, ordered, pool


def _rows(values, per_line=16):
    values = list(values)
    return "\n".join("    " + ", ".join(str(v) for v in values[i:i + per_line]) + ","
                     for i in range(0, len(values), per_line))


def render(stage1, stage2, records, pool):
    assert max(stage1) < 65536 and max(stage2) < 65536 and len(pool) < 2**32
    recs = "\n".join(f"    {{{f}, {ll}, {nl}, {c}, {la}, {na}}}," for f, ll, nl, c, la, na in records)
    return f"""// GENERATED by scripts/gen_unicode_tables.py: do not edit by hand.
// General categories from Unicode {CATEGORY_VERSION}; NFD of the characters Unicode {NORMALIZATION_VERSION}
// assigns; White_Space and lower-case mappings from Unicode 17.0 (see the script for why).
#include "unicode.h"

namespace dbf_tok {{
namespace unicode {{

const char* const kCategoryVersion = "{CATEGORY_VERSION}";
const char* const kNormalizationVersion = "{NORMALIZATION_VERSION}";
const char* const kCaseVersion = "17.0.0";

// code point >> 8 -> block
const uint16_t kStage1[{len(stage1)}] = {{
{_rows(stage1)}
}};

// block * 256 + (code point & 255) -> record
const uint16_t kStage2[{len(stage2)}] = {{
{_rows(stage2)}
}};

// {{flags, lower_len, nfd_len, ccc, lower_at, nfd_at}}
const CharRecord kRecords[{len(records)}] = {{
{recs}
}};

const char32_t kPool[{max(1, len(pool))}] = {{
{_rows(pool or [0])}
}};

}}  // namespace unicode
}}  // namespace dbf_tok
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        text = render(*build_records(*load_data(workdir)))
    write_or_check(OUT, text, args.check)


if __name__ == "__main__":
    main()
