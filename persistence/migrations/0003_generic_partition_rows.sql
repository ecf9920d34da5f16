-- Checkpoints as generic rows (DESIGN section 3): one table holds every table of a
-- partition's in-memory state, keyed by (partition, table name, row key), with the row as
-- the core encodes it. A new table of the core needs no migration and no store code.
-- The former tables become views of the same names and columns: the queryable OLTP view.

CREATE TABLE partition_rows (
    partition       integer NOT NULL,
    table_name      text    NOT NULL,
    row_key         jsonb   NOT NULL,
    body            jsonb   NOT NULL,
    checkpoint_lsn  bigint  NOT NULL,
    PRIMARY KEY (partition, table_name, row_key)
);

INSERT INTO partition_rows (partition, table_name, row_key, body, checkpoint_lsn)
SELECT partition, 'stock', jsonb_build_array(merchant_id, sku_id, location_id),
       jsonb_build_array(on_hand, reserved, safety_stock, version), checkpoint_lsn
  FROM stock;

INSERT INTO partition_rows (partition, table_name, row_key, body, checkpoint_lsn)
SELECT r.partition, 'reservations', to_jsonb(r.reservation_id), r.body, p.checkpoint_lsn
  FROM reservations r JOIN partitions p ON p.partition = r.partition;

-- An entry's body now carries its scope too, as the core encodes the whole entry.
INSERT INTO partition_rows (partition, table_name, row_key, body, checkpoint_lsn)
SELECT i.partition, 'idempotency', jsonb_build_array(i.merchant_id, i.idempotency_key),
       i.body || jsonb_build_object('merchant_id', i.merchant_id,
                                    'idempotency_key', i.idempotency_key),
       p.checkpoint_lsn
  FROM idempotency i JOIN partitions p ON p.partition = i.partition;

DROP TABLE stock, reservations, idempotency;

CREATE VIEW stock AS
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
  FROM partition_rows WHERE table_name = 'stock';

CREATE VIEW reservations AS
SELECT row_key #>> '{}' AS reservation_id,
       partition,
       body ->> 'merchant_id' AS merchant_id,
       body ->> 'location_id' AS location_id,
       body ->> 'state' AS state,
       to_timestamp((body ->> 'expires_at_ms')::bigint / 1000.0) AS expires_at,
       to_timestamp((body ->> 'state_changed_at_ms')::bigint / 1000.0) AS state_changed_at,
       body
  FROM partition_rows WHERE table_name = 'reservations';

CREATE VIEW idempotency AS
SELECT partition,
       row_key ->> 0 AS merchant_id,
       row_key ->> 1 AS idempotency_key,
       (body ->> 'recorded_at_ms')::bigint AS recorded_at_ms,
       body
  FROM partition_rows WHERE table_name = 'idempotency';
