-- Checkpoints in bounded transactions that never hold a lock the flush needs (DESIGN
-- section 7). A checkpoint's rows are written first, in as many small transactions as it
-- takes, each row as a new version at the checkpoint's lsn (a NULL body: the row was
-- removed). Only then one short transaction moves the partition's checkpoint_lsn, epoch
-- checked. A partition's checkpoint is the newest version of each row with
--     checkpoint_base_lsn <= checkpoint_lsn(row) <= checkpoint_lsn(partition)
-- so versions written by a checkpoint that has not committed (or never will) are invisible,
-- and a full checkpoint (every row again) hides everything older by moving the base. The
-- owner deletes superseded versions after each commit.

ALTER TABLE partition_rows DROP CONSTRAINT partition_rows_pkey;
ALTER TABLE partition_rows ALTER COLUMN body DROP NOT NULL;
ALTER TABLE partition_rows ADD PRIMARY KEY (partition, table_name, row_key, checkpoint_lsn);

-- Every row so far was written at or below its partition's checkpoint: all stay visible.
ALTER TABLE partitions ADD COLUMN checkpoint_base_lsn bigint NOT NULL DEFAULT 0;
ALTER TABLE partitions ADD CONSTRAINT checkpoint_base_not_ahead
    CHECK (checkpoint_base_lsn <= checkpoint_lsn);

-- The checkpointed state as of each partition's checkpoint_lsn: one row per key.
CREATE VIEW checkpoint_rows AS
SELECT DISTINCT ON (r.partition, r.table_name, r.row_key)
       r.partition, r.table_name, r.row_key, r.body, r.checkpoint_lsn
  FROM partition_rows r JOIN partitions p ON p.partition = r.partition
 WHERE r.checkpoint_lsn BETWEEN p.checkpoint_base_lsn AND p.checkpoint_lsn
 ORDER BY r.partition, r.table_name, r.row_key, r.checkpoint_lsn DESC;

-- The queryable views keep their names and columns, over the visible rows only.
CREATE OR REPLACE VIEW stock AS
SELECT row_key ->> 0 AS merchant_id,
       row_key ->> 2 AS location_id,
       row_key ->> 1 AS sku_id,
       partition,
       (body ->> 0)::bigint AS on_hand,
       (body ->> 1)::bigint AS reserved,
       (body ->> 2)::bigint AS safety_stock,
       (body ->> 0)::bigint - (body ->> 1)::bigint - (body ->> 2)::bigint AS available,
       (body ->> 3)::bigint AS version,
       checkpoint_lsn
  FROM checkpoint_rows WHERE table_name = 'stock' AND body IS NOT NULL;

CREATE OR REPLACE VIEW reservations AS
SELECT row_key #>> '{}' AS reservation_id,
       partition,
       body ->> 'merchant_id' AS merchant_id,
       body ->> 'location_id' AS location_id,
       body ->> 'state' AS state,
       to_timestamp((body ->> 'expires_at_ms')::bigint / 1000.0) AS expires_at,
       to_timestamp((body ->> 'state_changed_at_ms')::bigint / 1000.0) AS state_changed_at,
       body
  FROM checkpoint_rows WHERE table_name = 'reservations' AND body IS NOT NULL;

CREATE OR REPLACE VIEW idempotency AS
SELECT partition,
       row_key ->> 0 AS merchant_id,
       row_key ->> 1 AS idempotency_key,
       (body ->> 'recorded_at_ms')::bigint AS recorded_at_ms,
       body
  FROM checkpoint_rows WHERE table_name = 'idempotency' AND body IS NOT NULL;
