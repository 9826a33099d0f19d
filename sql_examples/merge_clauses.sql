-- MERGE clauses keep their own fields, as in SQL: a new contact gets every field its INSERT
-- lists; a synced contact gets only the changed fields of UPDATE SET. Here `name` and
-- `lead_source` are set when the contact is created and never overwritten (a sales rep may have
-- edited them), and only contacts whose churn risk is high are updated. Needs an endpoint that
-- accepts JSON POSTs:
--   SLUICE_EXAMPLE_WEBHOOK_URL=https://… sluice run sql_examples/merge_clauses.sql
-- (the test suite serves one). State goes to .sluice/ next to this file, or --state URL.

CREATE OR REPLACE EXTERNAL TABLE customers STORED AS PARQUET LOCATION 'sql_examples/data/customers.parquet';
CREATE OR REPLACE EXTERNAL TABLE scores STORED AS CSV LOCATION 'sql_examples/data/scores.csv'
  OPTIONS ('format.has_header' 'true');

CREATE OR REPLACE CONNECTION crm TYPE webhook
  OPTIONS (url env('SLUICE_EXAMPLE_WEBHOOK_URL'), key 'customer_id', batch_size '500');

CREATE OR REPLACE SYNC churn_risk AS
MERGE INTO crm.contacts AS t
USING (SELECT c.customer_id, c.name, c.email, s.churn_risk
       FROM customers c JOIN scores s ON s.customer_id = c.customer_id) AS s
ON t.customer_id = s.customer_id
-- Updates: only the risk, and only for contacts at risk (a condition on the source's columns).
WHEN MATCHED AND s.churn_risk >= 0.5 THEN UPDATE SET churn_risk = s.churn_risk
-- Creates: every field, two of them set on create only.
WHEN NOT MATCHED THEN INSERT (customer_id, name, email, lead_source, churn_risk)
                      VALUES (s.customer_id, s.name, s.email, 'warehouse', s.churn_risk);

-- A dry run shows which fields each clause sends:
--   fields sent (besides the key): insert=[churn_risk, name, email, lead_source] update when s.churn_risk >= 0.5=[churn_risk]
EXPLAIN SYNC churn_risk;

RUN SYNC churn_risk;
-- Nothing changed: nothing is sent.
RUN SYNC churn_risk;

SELECT status, inserted, updated, unchanged FROM sluice.runs
WHERE sync = 'churn_risk' ORDER BY started_at DESC LIMIT 2;
