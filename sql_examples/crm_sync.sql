-- A CRM sync end to end, into HubSpot: companies, contacts with fields set on create only, the
-- associations between them (made in the same run as the contacts), and the CRM read back with
-- plain SQL. Needs a HubSpot private app token and the API's address:
--   HUBSPOT_TOKEN=pat-… SLUICE_EXAMPLE_HUBSPOT_URL=https://api.hubapi.com sluice run sql_examples/crm_sync.sql
-- (the test suite serves a faithful fake). State goes to .sluice/ next to this file, or --state URL.

CREATE OR REPLACE EXTERNAL TABLE customers STORED AS PARQUET LOCATION 'sql_examples/data/customers.parquet';

CREATE OR REPLACE CONNECTION crm TYPE hubspot
  OPTIONS (token env('HUBSPOT_TOKEN'), base_url env('SLUICE_EXAMPLE_HUBSPOT_URL'));

-- A few customers, and one company per country (matched by its unique property account_ref).
CREATE OR REPLACE VIEW accounts AS
SELECT customer_id, email, name, country,
       CASE WHEN plan = 'free' THEN 'lead' ELSE 'customer' END AS stage
FROM customers WHERE customer_id <= 25;

INSERT INTO crm.companies
SELECT DISTINCT 'acme-' || lower(country) AS account_ref, 'Acme ' || country AS name FROM accounts;

-- Contacts: the first name is set when the contact is created and never overwritten (a sales
-- rep may have edited it); the lifecycle stage is kept current.
CREATE OR REPLACE SYNC crm_contacts AS
MERGE INTO crm.contacts AS t
USING (SELECT email, split_part(name, ' ', 1) AS firstname, stage FROM accounts) AS s
ON t.email = s.email
WHEN MATCHED THEN UPDATE SET lifecyclestage = s.stage
WHEN NOT MATCHED THEN INSERT (email, firstname, lifecyclestage) VALUES (s.email, s.firstname, s.stage);

-- Each contact linked to its country's company; links that leave the model are removed.
CREATE OR REPLACE SYNC crm_links AS
MERGE INTO crm.contact_company AS t
USING (SELECT email, 'acme-' || lower(country) AS account_ref FROM accounts) AS s
ON t.contact_email = s.email AND t.company_account_ref = s.account_ref
WHEN NOT MATCHED THEN INSERT (contact_email, company_account_ref) VALUES (s.email, s.account_ref)
WHEN NOT MATCHED BY SOURCE THEN DELETE;

EXPLAIN SYNC crm_contacts;
RUN SYNC crm_contacts;
RUN SYNC crm_links;

-- The CRM is a table too: what HubSpot holds now, and where it differs from the model.
SELECT lifecyclestage, count(*) AS contacts FROM crm.contacts GROUP BY lifecyclestage ORDER BY 1;
SELECT email, lifecyclestage FROM crm.contacts
EXCEPT SELECT email, stage FROM accounts;
