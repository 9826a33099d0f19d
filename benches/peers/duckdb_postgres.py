"""DuckDB peer for benches/postgres.rs: load a Parquet file into a Postgres table through DuckDB's
postgres extension, as its documentation shows:

    ATTACH '<dsn>' AS pg (TYPE postgres); INSERT INTO pg.<schema>.<table> SELECT * FROM '<file>';

    python duckdb_postgres.py <parquet> <dsn> <schema> <table>

The extension comes from the PyPI package `duckdb-extension-postgres` (this machine cannot reach
DuckDB's extension repository); DuckDB loads it by file, under the name its entry point expects.
Prints one JSON line: the rows in the table afterwards and the seconds of ATTACH + INSERT. The
caller also measures the whole process from outside.
"""

import json
import os
import shutil
import sys
import tempfile
import time

import duckdb
import duckdb_extension_postgres


def extension_path() -> str:
    root = os.path.join(os.path.dirname(duckdb_extension_postgres.__file__), "extensions")
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".duckdb_extension"):
                # The entry point is postgres_scanner_…: the file must carry that name.
                target = os.path.join(tempfile.mkdtemp(), "postgres_scanner.duckdb_extension")
                shutil.copy(os.path.join(dirpath, f), target)
                return target
    raise SystemExit(f"no .duckdb_extension file under {root}")


def main() -> None:
    parquet, dsn, schema, table = sys.argv[1:5]
    con = duckdb.connect()
    con.execute(f"LOAD '{extension_path()}'")
    started = time.perf_counter()
    con.execute(f"ATTACH '{dsn}' AS pg (TYPE postgres)")
    con.execute(f'INSERT INTO pg."{schema}"."{table}" SELECT * FROM read_parquet(\'{parquet}\')')
    seconds = time.perf_counter() - started
    rows = con.execute(f'SELECT count(*) FROM pg."{schema}"."{table}"').fetchone()[0]
    print(json.dumps({"rows": rows, "seconds": seconds}))


if __name__ == "__main__":
    main()
