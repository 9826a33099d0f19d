"""DuckDB peer for benches/diff.rs: the same classification (insert / update / delete /
unchanged) from the same Parquet files, either by a FULL OUTER JOIN comparing every column with
IS DISTINCT FROM ("join") or by comparing per-row hash(...) of the non-key columns ("hash").

    python3 duckdb_diff.py <dir> join|hash

Prints one JSON line: the counts and DuckDB's own query seconds. The caller measures the
process (wall time, peak RSS) from outside, as it does for sluice.
"""

import json
import sys
import time

import duckdb

COLUMNS = ["email", "name", "plan", "score", "updated_at"]


def main() -> None:
    directory, variant = sys.argv[1], sys.argv[2]
    con = duckdb.connect()
    model = f"'{directory}/model.parquet'"
    previous = f"'{directory}/previous.parquet'"
    if variant == "join":
        changed = " OR ".join(f"m.{c} IS DISTINCT FROM p.{c}" for c in COLUMNS)
        sql = f"""
            SELECT
              count(*) FILTER (WHERE p.id IS NULL) AS inserts,
              count(*) FILTER (WHERE m.id IS NOT NULL AND p.id IS NOT NULL AND ({changed})) AS updates,
              count(*) FILTER (WHERE m.id IS NULL) AS deletes,
              count(*) FILTER (WHERE m.id IS NOT NULL AND p.id IS NOT NULL AND NOT ({changed})) AS unchanged
            FROM {model} m FULL OUTER JOIN {previous} p ON m.id = p.id
        """
    elif variant == "hash":
        cols = ", ".join(COLUMNS)
        sql = f"""
            WITH m AS (SELECT id, hash({cols}) AS h FROM {model}),
                 p AS (SELECT id, hash({cols}) AS h FROM {previous})
            SELECT
              count(*) FILTER (WHERE p.id IS NULL) AS inserts,
              count(*) FILTER (WHERE m.id IS NOT NULL AND p.id IS NOT NULL AND m.h <> p.h) AS updates,
              count(*) FILTER (WHERE m.id IS NULL) AS deletes,
              count(*) FILTER (WHERE m.id IS NOT NULL AND p.id IS NOT NULL AND m.h = p.h) AS unchanged
            FROM m FULL OUTER JOIN p ON m.id = p.id
        """
    else:
        raise SystemExit(f"unknown variant {variant}")
    started = time.perf_counter()
    inserts, updates, deletes, unchanged = con.execute(sql).fetchone()
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "inserts": inserts,
                "updates": updates,
                "deletes": deletes,
                "unchanged": unchanged,
                "seconds": seconds,
                "duckdb": duckdb.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
