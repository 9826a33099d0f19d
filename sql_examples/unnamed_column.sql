-- expect-error: has no field name; name it with AS
-- Destination fields are matched by name, so every query column needs one.
CREATE OR REPLACE EXTERNAL TABLE scores STORED AS CSV LOCATION 'sql_examples/data/scores.csv'
  OPTIONS ('format.has_header' 'true');
CREATE OR REPLACE CONNECTION out TYPE file OPTIONS (url 'out/');

INSERT INTO out.score_summary
SELECT round(avg(churn_risk), 2) FROM scores;
