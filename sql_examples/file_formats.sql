-- The file destination writes JSON lines, CSV or Parquet; each run is one new file, written atomically.
CREATE OR REPLACE EXTERNAL TABLE customers STORED AS PARQUET LOCATION 'sql_examples/data/customers.parquet';

CREATE OR REPLACE CONNECTION csv_out TYPE file OPTIONS (url 'out/csv/', format 'csv');
CREATE OR REPLACE CONNECTION lake TYPE file OPTIONS (url 'out/lake/', format 'parquet');

-- An explicit field list maps query columns to fields in order: here country → market.
INSERT INTO csv_out.markets (market, customers)
SELECT country, count(*) FROM customers GROUP BY country;

INSERT INTO lake.signups
SELECT customer_id, email, signup_date, plan FROM customers WHERE signup_date >= DATE '2024-06-01';

SHOW CONNECTIONS;
