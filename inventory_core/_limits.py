"""Every bound of the core, named with its unit last and the reason for its value.

A test drives each of these to its edge (tests/core/test_rules.py, the bounds section).
"""

from __future__ import annotations

from typing import Final

# Identifiers are short opaque strings; 64 characters fits UUIDs and composite ids with room,
# while keeping per-key memory small at millions of keys.
identifier_length_max: Final = 64
# Idempotency keys are often "<order id>:<attempt>:<step>"; 128 leaves room for that.
idempotency_key_length_max: Final = 128

# A grocery cart rarely exceeds 60 distinct items; 100 bounds the work of one serial step.
reserve_lines_max: Final = 100
# No single line of an order asks for a million units; bigger is a bug in the caller.
line_quantity_max: Final = 1_000_000
# Physical stock of one SKU at one location; far above any real shelf, far below int64.
stock_quantity_max: Final = 1_000_000_000
# The magnitude of one physical delta (a receipt of a whole truck is far below this).
adjust_delta_max: Final = 1_000_000_000

# TTL of a reservation: DESIGN section 6.
reservation_ttl_s_default: Final = 15 * 60
reservation_ttl_s_min: Final = 30
reservation_ttl_s_max: Final = 2 * 60 * 60

# Live (active) reservations one partition holds. At 10^4 reserves/s over ~1000 partitions
# and a 15 min TTL, a partition holds ~9,000 on average; 100,000 leaves a 10x margin for skew
# and bounds memory (~1 KiB each) at ~100 MiB per partition in the worst case.
reservations_live_max: Final = 100_000
# Keys (stock rows) one partition holds. A million keys spread over 1024 partitions is about
# 1,000 each; 100,000 leaves room for a merchant whose one location carries a whole catalogue,
# and bounds a partition's memory (~0.5 KiB per key) at ~50 MiB.
partition_keys_max: Final = 100_000
# Finished reservations are remembered so that a late commit or release gets a precise
# answer ("expired at T") instead of NOT_FOUND. Oldest forgotten first.
reservations_finished_max: Final = 100_000
reservations_finished_retention_ms: Final = 24 * 60 * 60 * 1000

# Idempotency keys are kept at least 24 h (DESIGN section 6), scoped by merchant.
idempotency_retention_ms: Final = 24 * 60 * 60 * 1000
# Per partition; past this, new mutations are refused (RESOURCE_EXHAUSTED) rather than
# forgetting a key inside its retention window, which could double-apply a retry.
idempotency_keys_max: Final = 500_000

# Keys per GetAvailability batch: a page of a catalogue, and a bounded reply size.
availability_keys_max: Final = 1000
# Locations per GetOverCommitted or GetFeedHealth: a region's stores at once; each names one
# partition to ask.
locations_read_max: Final = 100

# One expiry record lists at most this many reservations; more due ones spill into the
# next record, so a record's size stays bounded after a long pause.
expiry_batch_reservations_max: Final = 1000

# Legs of one ReserveOrder (one per fulfilment location): a marketplace order rarely spans
# more than a few locations; 20 bounds the saga's fan-out and its compensation.
order_legs_max: Final = 20
# An order's idempotency key derives each leg's and each compensation's key by a suffix
# ("/leg-19", "/undo-r1023-0000000042": 22 characters at most), which must stay within
# idempotency_key_length_max; 100 leaves that room.
order_idempotency_key_length_max: Final = 100

# Stale entries the expiry heap may hold (an extend or a finish leaves one) before it is
# rebuilt; past this it is rebuilt once stale entries outnumber live ones, so the heap holds
# at most 2 x live + this many entries (~100 B each).
expiry_heap_stale_entries_min: Final = 1024

# Bounds across every partition one process owns (``ProcessUsage``): the per-partition
# bounds above times 1024 partitions would allow ~100 GiB, so a process refuses new keys,
# reservations and idempotency entries past these (RESOURCE_EXHAUSTED, nothing applied).
# Measured with tracemalloc over 20,000 of each (keys restored from a checkpoint; then a
# SetStock and a 1-line Reserve per key): a key with its row ~0.26 KiB, an idempotency entry
# of a stock change ~0.45 KiB, a live 1-line reservation with its entry ~1.3 KiB. At these
# bounds: keys ~1.0 GiB + reservations ~1.3 GiB + other entries ~1.3 GiB, about 3.6 GiB of a
# 24 GiB machine, leaving room for a second process during a hand-off.
process_keys_max: Final = 4_000_000
process_reservations_live_max: Final = 1_000_000
process_idempotency_entries_max: Final = 3_000_000
# Facts the keys' feed histories keep (each delta inside its key's window, each last count),
# across the process. A key's history is bounded (feed_history_per_key_max), but that times
# process_keys_max is not: past this an Ingest is refused whole (RESOURCE_EXHAUSTED, nothing
# applied; the gateway keeps its events and sends them again) until histories shrink, as
# their window moves or counts replace them. The service's own facts (commits, SetStock)
# are never refused: they count, but an online sale does not fail for a feed's memory.
# Measured with tracemalloc over 100,000 sale deltas with 23-character event ids, kept in
# histories and indexed by (merchant, source, event_id): ~0.2 KiB a fact, so ~2 GiB at this
# bound (with the bounds above, ~5.6 GiB of a 24 GiB machine).
process_feed_facts_max: Final = 10_000_000

# Feeds (DESIGN section 9). Events per Ingest: bounds one serial step and one record, like a
# Batch request's items.
ingest_events_max: Final = 1000
# Event ids are a till's "<store>:<terminal>:<receipt>:<line>" or a supplier's ASN line ids.
event_id_length_max: Final = 128
# The free-text reason kept with an event in the ledger.
feed_reason_length_max: Final = 200
# How far in the future an event may say it occurred: the till's clock may run a little
# ahead of ours; further than this is a broken clock, refused rather than let it outrank
# every later count.
feed_clock_skew_ms_max: Final = 5 * 60 * 1000
# The window of history kept per key: every delta applied since the key's last count that
# occurred at most this long ago, by (merchant, source, event_id). Inside it, events apply
# exactly whatever their order and however often they are sent; a late count is applied as
# its value plus the deltas that occurred after it. An offline store's backlog (DESIGN: an
# hour) and a gateway's redelivery after a day's outage both fit. Past it: a delta older
# than the window cannot be told from one already applied, so it is refused (send a count);
# a count older than the window is recorded as superseded.
feed_history_retention_ms: Final = 24 * 60 * 60 * 1000
# Deltas kept per key inside that window. A shelf that sells 1000 units a day between two
# counts fits; past it the oldest are forgotten and an event older than them is treated as
# outside the window. Bounds one key's history (~0.2 KiB a delta) at ~200 KiB.
feed_history_per_key_max: Final = 1024
# Feed health (``_health.py``). A location none of whose feeds has been heard from for this
# long is stale: its tills are taken to be selling offline. A POS gateway sends its events
# within seconds, or a heartbeat when it has none; five minutes of silence is an outage, not
# a quiet spell, and short enough that an hour offline is mostly covered by the buffer.
# The default of the shard's --feed-stale-after-s (tests compress time with a smaller one).
feed_silence_stale_ms: Final = 5 * 60 * 1000
# A heartbeat is recorded at most this often per source and location (a gateway may send one
# every few seconds): well inside feed_silence_stale_ms, so a live gateway never goes stale.
feed_heartbeat_interval_ms: Final = 60 * 1000
# While stale, each key holds back what its tills sold in this long before the feed went
# silent (sales at the till, in the key's history): the expected sales of an hour offline,
# the outage the design plans for (DESIGN section 9).
feed_sales_rate_window_ms: Final = 60 * 60 * 1000
# Sources one location keeps health for: a store's POS gateway and its suppliers. An event
# of one more source is refused, so the per-location record stays small.
feed_sources_per_location_max: Final = 16
# Locations one heartbeat names (``Ingest.alive_at``): a gateway's stores in one region.
feed_heartbeat_locations_max: Final = 100

# Expected deliveries (``_deliveries.py``). Lines of one notice: a truck for a store carries
# a few hundred SKUs; 1000 bounds one record like a feed batch.
delivery_lines_max: Final = 1000
# Deliveries one partition expects at once: a store receives a few a day, and a notice stays
# until received or cancelled; 10,000 is years of a busy store's overdue notices, and bounds
# the table (~100 B a line) at a few MiB per partition.
deliveries_max: Final = 10_000

# Hot keys (DESIGN section 10; ``_buckets.py``). Buckets of one split key besides its home:
# one per shard at most is useful (each bucket must sit on another owner), and 15 (K = 16)
# spreads one key over more cores than a router tier feeds; it bounds a split row and the
# rebalancer's fan-out.
split_buckets_max: Final = 15
# A bucket's number picks its partition (``bucket_key``): the splitter tries numbers in order
# until each bucket sits on another owner. 1000 numbers find 15 distinct owners among a
# thousand partitions with room to spare, and keep a bucket's location short.
bucket_number_max: Final = 1000
# Transfers a split key's home or one bucket may have debited and not yet settled. The
# rebalancer keeps one in flight per bucket and direction; 32 lets a home have one to each of
# 15 buckets and a retry's worth more, and bounds the row.
quota_transfers_pending_max: Final = 32
# Commit facts one return carries: a bucket's history keeps at most feed_history_per_key_max
# of them, and everything older travels as one more (``rules/buckets.py``).
transfer_consumed_max: Final = feed_history_per_key_max + 1
# A return's statement of its bucket's version (Transfer.version). One change a microsecond
# for eight years stays below 2^48; the home absorbs at most split_buckets_max of them at a
# time, far inside the uint64 the protos carry versions in.
version_max: Final = 2**48
