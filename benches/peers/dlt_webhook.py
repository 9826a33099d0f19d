"""Peer for benches/webhook.rs: the same records posted to the same fake receiver by dlt's
@dlt.destination, in batches of 1,000, as a dlt user would write it.

    python3 dlt_webhook.py MODEL.parquet URL default|tuned

Reads the Parquet model with pyarrow, yields rows as dicts from a dlt resource, and the
destination function POSTs each batch as {"records": [...]} with a pooled requests session.
"tuned" applies dlt's documented parallel settings (LOAD__WORKERS=16, max_parallel_load_jobs=16,
loader_parallelism_strategy='parallel', DATA_WRITER__FILE_MAX_ITEMS=65536).
"""

import json
import os
import sys
import tempfile

path, url, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "tuned":
    os.environ["LOAD__WORKERS"] = "16"
    os.environ["DATA_WRITER__FILE_MAX_ITEMS"] = "65536"
os.environ.setdefault("RUNTIME__LOG_LEVEL", "WARNING")
os.environ["DLT_DATA_DIR"] = tempfile.mkdtemp(prefix="dlt-data-")
os.environ["DLT_PROJECT_DIR"] = tempfile.mkdtemp(prefix="dlt-project-")

import dlt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import requests  # noqa: E402

session = requests.Session()
session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=32, pool_maxsize=32))

destination_args = dict(batch_size=1000, naming_convention="direct")
if mode == "tuned":
    destination_args.update(max_parallel_load_jobs=16, loader_parallelism_strategy="parallel")


@dlt.destination(**destination_args)
def webhook(items, table) -> None:
    response = session.post(url, data=json.dumps({"records": items}, default=str),
                            headers={"Content-Type": "application/json"})
    response.raise_for_status()


@dlt.resource(name="contacts", write_disposition="append")
def contacts():
    for batch in pq.ParquetFile(path).iter_batches(batch_size=10_000):
        yield from batch.to_pylist()


pipeline = dlt.pipeline(pipeline_name=f"sluice_peer_{mode}", destination=webhook, dev_mode=True)
info = pipeline.run(contacts())
print(info.has_failed_jobs)
