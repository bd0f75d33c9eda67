"""Parquet datasets of every record format, written by pyarrow (the writer Hugging Face
`datasets` uses), with the same records as JSON Lines beside them; `tests/parquet_data.rs`
checks that both load to the same examples.

    "$(scripts/peft-baseline.sh)" -m pip install pyarrow
    "$(scripts/peft-baseline.sh)" scripts/make_parquet_fixtures.py tests/fixtures/parquet
"""

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

RECORDS = {
    "text": [{"text": "Shall I compare thee to a summer's day?"},
             {"text": "Thou art more lovely and more temperate."},
             {"text": "Rough winds do shake the darling buds of May."}],
    "alpaca": [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}],
    "messages": [{"messages": [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello."}]},
                 {"messages": [{"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4"}]}],
    "input_ids": [{"input_ids": [5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12]}],
    # Class indices (a `datasets` ClassLabel column) and class names.
    "labelled": [{"text": "a fine comedy", "label": 0},
                 {"text": "a sad tragedy", "label": 1},
                 {"text": "all's well", "label": 0}],
    "labelled_names": [{"text": "a fine comedy", "label": "comedy"},
                       {"text": "a sad tragedy", "label": "tragedy"}],
}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/parquet"
    os.makedirs(out, exist_ok=True)
    for name, rows in RECORDS.items():
        table = pa.Table.from_pylist(rows)
        # Two row groups, so reading crosses a group boundary.
        pq.write_table(table, os.path.join(out, f"{name}.parquet"),
                       row_group_size=max(1, len(rows) - 1))
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("pyarrow", pa.__version__)


if __name__ == "__main__":
    main()
