-- Quickstart: sync bundled sample data into a file destination. No services, no credentials.
--   cargo run -- run sql_examples/quickstart.sql
-- Every run adds one new file under out/contacts/.

-- Sources: any Parquet, CSV or JSON file or folder, local or s3:// gs:// az:// http(s)://.
CREATE OR REPLACE EXTERNAL TABLE customers STORED AS PARQUET LOCATION 'sql_examples/data/customers.parquet';
CREATE OR REPLACE EXTERNAL TABLE scores STORED AS CSV LOCATION 'sql_examples/data/scores.csv'
  OPTIONS ('format.has_header' 'true');

-- A destination: each object under it (out.contacts, out.anything) is a folder of files.
CREATE OR REPLACE CONNECTION out TYPE file OPTIONS (url 'out/', format 'jsonl');

-- The sync. Query columns map to destination fields by name: AS renames a column to the field it feeds.
INSERT INTO out.contacts
SELECT c.email,
       c.name,
       s.churn_risk     AS churn_score,
       s.lifetime_value AS ltv
FROM customers c
JOIN scores s ON s.customer_id = c.customer_id
WHERE c.plan <> 'free';

-- Destination objects of a file connection can be read back with SQL.
SELECT count(*) AS contacts, round(avg(churn_score), 3) AS avg_churn_score FROM out.contacts;
