-- Webhooks, SQLite. migrations/postgres/0002_webhooks.sql is the same schema for PostgreSQL:
-- change both together. docs/webhooks.md describes the delivery.

-- Endpoints. The secret signs every delivery (HMAC-SHA256), so it is stored as given.
-- event_types and clusters are JSON arrays of names; empty means every one.
CREATE TABLE webhooks (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL DEFAULT '',
    url             TEXT NOT NULL,
    format          TEXT NOT NULL,
    secret          TEXT NOT NULL,
    routing_key     TEXT,
    event_types     TEXT NOT NULL DEFAULT '[]',
    clusters        TEXT NOT NULL DEFAULT '[]',
    min_severity    TEXT NOT NULL DEFAULT 'info',
    enabled         BIGINT NOT NULL DEFAULT 1,
    created_by      TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL
);

-- The outbox: one row per (webhook, event), written in the transaction that stores the
-- event. state: pending, delivered or failed. A server claims a row (claimed_by,
-- claim_until_ms) for one attempt; an expired claim (a crash) is taken again.
CREATE TABLE webhook_deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      TEXT NOT NULL REFERENCES webhooks(id) ON DELETE CASCADE,
    event_id        TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    event_json      TEXT NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending',
    attempts        BIGINT NOT NULL DEFAULT 0,
    created_ms      BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    claimed_by      TEXT,
    claim_until_ms  BIGINT,
    last_error      TEXT,
    done_ms         BIGINT,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_ms);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries (webhook_id, id);

-- Every attempt: HTTP status or error, latency, the first 500 bytes of the answer.
CREATE TABLE webhook_attempts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id     BIGINT NOT NULL REFERENCES webhook_deliveries(id) ON DELETE CASCADE,
    attempt         BIGINT NOT NULL,
    server_id       TEXT NOT NULL,
    started_ms      BIGINT NOT NULL,
    latency_ms      BIGINT NOT NULL,
    status_code     BIGINT,
    error           TEXT,
    response        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX webhook_attempts_delivery ON webhook_attempts (delivery_id, attempt);
