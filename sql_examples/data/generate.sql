-- Regenerates the bundled sample data, deterministically, with sluice itself:
--   sluice run sql_examples/data/generate.sql        (from the repository root)
-- 5,000 synthetic customers (Parquet) and their model scores (CSV). No real people.

CREATE VIEW people AS
SELECT value AS customer_id,
       ['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald', 'Frances', 'John', 'Margaret', 'Ken',
        'Radia', 'Dennis', 'Hedy', 'Tim', 'Katherine', 'Linus', 'Sophie', 'Niklaus', 'Adele', 'Guido'][value % 20 + 1] AS first_name,
       ['Lovelace', 'Hopper', 'Turing', 'Dijkstra', 'Liskov', 'Knuth', 'Allen', 'Backus', 'Hamilton', 'Thompson',
        'Perlman', 'Ritchie', 'Lamarr', 'Berners-Lee', 'Johnson', 'Torvalds', 'Wilson', 'Wirth', 'Goldberg', 'Rossum'][(value * 7) % 20 + 1] AS last_name,
       ['US', 'DE', 'FR', 'GB', 'JP', 'BR', 'IN', 'NL'][(value * 13) % 8 + 1] AS country,
       ['free', 'starter', 'pro', 'enterprise'][(value * 31) % 4 + 1] AS plan,
       CAST(CAST(19358 + value * 37 % 900 AS INT) AS DATE) AS signup_date   -- days since 1970: from 2023-01-01
FROM range(1, 5001);

COPY (
  SELECT customer_id,
         first_name || ' ' || last_name AS name,
         lower(first_name) || '.' || lower(replace(last_name, '-', '')) || customer_id || '@example.com' AS email,
         country, plan, signup_date
  FROM people ORDER BY customer_id
) TO 'sql_examples/data/customers.parquet' STORED AS PARQUET;

COPY (
  SELECT customer_id,
         round((customer_id * 7919 % 1000) / 1000.0, 3) AS churn_risk,
         round((customer_id * 104729 % 500000) / 100.0, 2) AS lifetime_value,
         to_timestamp_seconds(1793491200 + customer_id * 61 % 86400) AS scored_at   -- during 2026-11-01 UTC
  FROM range(1, 5001) AS r(customer_id) ORDER BY customer_id
) TO 'sql_examples/data/scores.csv' STORED AS CSV OPTIONS ('format.has_header' 'true');
