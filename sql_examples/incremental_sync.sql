-- Incremental syncs: a mirror of the paying customers into a webhook. The second run sends
-- nothing, because nothing changed. Needs an endpoint that accepts JSON POSTs:
--   SLUICE_EXAMPLE_WEBHOOK_URL=https://… sluice run sql_examples/incremental_sync.sql
-- (the test suite serves one). State goes to .sluice/ next to this file, or --state URL.

CREATE OR REPLACE EXTERNAL TABLE customers STORED AS PARQUET LOCATION 'sql_examples/data/customers.parquet';

-- `key` is the field that identifies a record: the match key of every sync into this connection.
CREATE OR REPLACE CONNECTION hooks TYPE webhook
  OPTIONS (url env('SLUICE_EXAMPLE_WEBHOOK_URL'), key 'customer_id', batch_size '500');

-- A named sync: update changed fields, create new customers, delete those that left the model,
-- and refuse to run if that would delete more than 10% of what was synced.
CREATE OR REPLACE SYNC paying_customers
  SCHEDULE EVERY '1 hour'
  OPTIONS (max_delete_pct '10')
AS MERGE INTO hooks.customers AS t
   USING (SELECT customer_id, email, plan FROM customers WHERE plan <> 'free') AS s
   ON t.customer_id = s.customer_id
WHEN MATCHED THEN UPDATE SET email = s.email, plan = s.plan
WHEN NOT MATCHED THEN INSERT (customer_id, email, plan) VALUES (s.customer_id, s.email, s.plan)
WHEN NOT MATCHED BY SOURCE THEN DELETE;

-- What a run would do, without sending anything.
EXPLAIN SYNC paying_customers;

RUN SYNC paying_customers;
RUN SYNC paying_customers;

-- Run history and rejected records are tables, kept with the state.
SELECT status, inserted, updated, deleted, unchanged, rejected, requests
FROM sluice.runs WHERE sync = 'paying_customers' ORDER BY started_at DESC LIMIT 2;
SELECT count(*) AS rejected FROM sluice.rejects WHERE sync = 'paying_customers';
