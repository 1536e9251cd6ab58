-- A channel's rate, shared by every node: the theoretical arrival time of the next slot
-- (GCRA), in nanoseconds of the database's clock, so nodes whose clocks differ agree.
CREATE TABLE rate_slots (
    channel text COLLATE "C" PRIMARY KEY,
    tat_ns  bigint NOT NULL
);
