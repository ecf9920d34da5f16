-- The ledger is the outbox (DESIGN section 8): each record keeps the key changes it made,
-- so events can be republished from PostgreSQL after a crash or a Redis outage.
ALTER TABLE ledger ADD COLUMN changes jsonb NOT NULL DEFAULT '[]'::jsonb;
