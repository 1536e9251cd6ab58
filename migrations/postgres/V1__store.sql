-- crier's store on PostgreSQL: the same records as the sled backend, one table each, every
-- record kept whole as JSON beside the columns the store searches and orders by. Text keys
-- use the "C" collation so they sort byte by byte, as sled's keys do, and cursors mean the
-- same on both backends. Times the store compares are nanoseconds since 1970 (bigint): exact,
-- where timestamptz would round to microseconds.

CREATE TABLE subscribers (
    contact text COLLATE "C" PRIMARY KEY,
    record  jsonb NOT NULL
);

-- Who follows each order: derived from every subscriber's orders, kept in the same
-- transaction.
CREATE TABLE followers (
    order_number text COLLATE "C" NOT NULL,
    contact      text COLLATE "C" NOT NULL REFERENCES subscribers (contact),
    PRIMARY KEY (order_number, contact)
);

-- Counters spread over shards, so concurrent writers on many nodes do not queue on one row;
-- a read sums the shards.
CREATE TABLE counters (
    name  text NOT NULL,
    shard smallint NOT NULL,
    value bigint NOT NULL,
    PRIMARY KEY (name, shard)
);

CREATE TABLE incidents (
    id         text COLLATE "C" PRIMARY KEY,
    updated_ns bigint NOT NULL,
    record     jsonb NOT NULL
);

CREATE TABLE updates (
    id         text COLLATE "C" PRIMARY KEY,
    created_ns bigint NOT NULL,
    record     jsonb NOT NULL
);

CREATE TABLE plans (
    update_id text COLLATE "C" PRIMARY KEY,
    done      boolean NOT NULL,
    record    jsonb NOT NULL
);

CREATE TABLE deliveries (
    key            text COLLATE "C" PRIMARY KEY,
    update_id      text COLLATE "C" NOT NULL,
    channel        text COLLATE "C" NOT NULL,
    state          text NOT NULL,
    due_ns         bigint NOT NULL,
    lease_until_ns bigint,
    record         jsonb NOT NULL
);
-- The queue: what a worker leases, earliest first.
CREATE INDEX deliveries_queue ON deliveries (channel, due_ns, key)
    WHERE state IN ('queued', 'retrying');
-- Leases, for finding the expired ones.
CREATE INDEX deliveries_leases ON deliveries (lease_until_ns) WHERE state = 'in_flight';
-- One update's deliveries in key order, and its dead letters.
CREATE INDEX deliveries_of_update ON deliveries (update_id, key);

-- Deliveries per state, per update and channel, in shards (see counters).
CREATE TABLE delivery_counts (
    update_id text COLLATE "C" NOT NULL,
    channel   text COLLATE "C" NOT NULL,
    shard     smallint NOT NULL,
    queued    bigint NOT NULL DEFAULT 0,
    in_flight bigint NOT NULL DEFAULT 0,
    sent      bigint NOT NULL DEFAULT 0,
    retrying  bigint NOT NULL DEFAULT 0,
    dead      bigint NOT NULL DEFAULT 0,
    skipped   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (update_id, channel, shard)
);

CREATE TABLE disabled_channels (
    channel text COLLATE "C" PRIMARY KEY,
    since   text NOT NULL,
    reason  text NOT NULL
);

CREATE TABLE idempotent_answers (
    key    text COLLATE "C" PRIMARY KEY,
    record jsonb NOT NULL
);

CREATE TABLE alerts (
    key     text COLLATE "C" PRIMARY KEY,
    sent_at text NOT NULL
);
