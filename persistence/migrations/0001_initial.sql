-- The ledger, ownership and checkpoints (DESIGN section 7).

-- One row per partition: who owns it (epoch fences the previous owner) and how far its
-- ledger, checkpoint and event publication have got.
CREATE TABLE partitions (
    partition       integer PRIMARY KEY,
    epoch           bigint  NOT NULL DEFAULT 0,
    owner           text,
    owned_since     timestamptz,
    head_lsn        bigint  NOT NULL DEFAULT 0,
    checkpoint_lsn  bigint  NOT NULL DEFAULT 0,
    published_lsn   bigint  NOT NULL DEFAULT 0,
    CHECK (checkpoint_lsn <= head_lsn),
    CHECK (published_lsn <= head_lsn)
);

-- Append-only: one row per record. The audit trail, the outbox and the source of rebuilds.
CREATE TABLE ledger (
    partition        integer     NOT NULL,
    lsn              bigint      NOT NULL,
    epoch            bigint      NOT NULL,
    recorded_at      timestamptz NOT NULL,
    -- When a physical fact happened, when it differs from recorded_at (feeds).
    occurred_at      timestamptz,
    kind             text        NOT NULL,
    merchant_id      text,
    idempotency_key  text,
    payload          jsonb       NOT NULL,
    PRIMARY KEY (partition, lsn)
);

-- Checkpoints of the in-memory state, written in the background; also the queryable view.
CREATE TABLE stock (
    merchant_id     text    NOT NULL,
    location_id     text    NOT NULL,
    sku_id          text    NOT NULL,
    partition       integer NOT NULL,
    on_hand         bigint  NOT NULL,
    reserved        bigint  NOT NULL,
    safety_stock    bigint  NOT NULL,
    available       bigint  GENERATED ALWAYS AS (on_hand - reserved - safety_stock) STORED,
    version         bigint  NOT NULL,
    checkpoint_lsn  bigint  NOT NULL,
    PRIMARY KEY (merchant_id, location_id, sku_id)
);
CREATE INDEX stock_partition ON stock (partition);

CREATE TABLE reservations (
    reservation_id  text        PRIMARY KEY,
    partition       integer     NOT NULL,
    merchant_id     text        NOT NULL,
    location_id     text        NOT NULL,
    state           text        NOT NULL,
    expires_at      timestamptz NOT NULL,
    state_changed_at timestamptz NOT NULL,
    body            jsonb       NOT NULL
);
CREATE INDEX reservations_partition ON reservations (partition);

CREATE TABLE idempotency (
    partition        integer NOT NULL,
    merchant_id      text    NOT NULL,
    idempotency_key  text    NOT NULL,
    recorded_at_ms   bigint  NOT NULL,
    body             jsonb   NOT NULL,
    PRIMARY KEY (partition, merchant_id, idempotency_key)
);

-- Shard processes that are alive: a heartbeat row each (membership for routers).
CREATE TABLE shards (
    shard_id      text PRIMARY KEY,
    address       text NOT NULL,
    started_at    timestamptz NOT NULL,
    heartbeat_at  timestamptz NOT NULL
);
