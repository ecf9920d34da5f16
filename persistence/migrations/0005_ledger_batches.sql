-- A compact ledger (DESIGN sections 5.8 and 7): one row per partition per flush instead of
-- one per record, binary instead of jsonb, so PostgreSQL parses nothing per reservation and
-- indexes one key per partition a flush.
--
--   records: the batch's commands, lsns first_lsn..last_lsn in order;
--   changes: per record, its key changes as the events that went to Redis (the outbox).
--
-- Each blob starts with a format byte: 1 = MessagePack (records: the commands' plain data;
-- changes: a list per record of the protobuf AvailabilityChanged payloads, byte for byte
-- what the publisher sent), 0 = the JSON of earlier releases (records: a list of command
-- payloads; changes: a list per record of the compact change lists), which is what the rows
-- below are converted to.
CREATE TABLE ledger_batches (
    partition    integer     NOT NULL,
    last_lsn     bigint      NOT NULL,
    first_lsn    bigint      NOT NULL,
    epoch        bigint      NOT NULL,
    -- the newest record's time: what retention by time will cut on (ROADMAP)
    recorded_at  timestamptz NOT NULL,
    records      bytea       NOT NULL,
    changes      bytea       NOT NULL,
    PRIMARY KEY (partition, last_lsn),
    CHECK (first_lsn BETWEEN 1 AND last_lsn)
);

INSERT INTO ledger_batches (partition, last_lsn, first_lsn, epoch, recorded_at, records, changes)
SELECT partition, lsn, lsn, epoch, recorded_at,
       '\x00'::bytea || convert_to(jsonb_build_array(payload)::text, 'UTF8'),
       '\x00'::bytea || convert_to(jsonb_build_array(changes)::text, 'UTF8')
  FROM ledger;

DROP TABLE ledger;
