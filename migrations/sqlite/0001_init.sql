-- pgwarden-server schema, SQLite. Times are milliseconds since the Unix epoch; JSON is text.
-- migrations/postgres/0001_init.sql is the same schema for PostgreSQL: change both together.

CREATE TABLE clusters (
    name            TEXT PRIMARY KEY,
    created_ms      BIGINT NOT NULL,
    config_json     TEXT,
    config_ms       BIGINT
);

CREATE TABLE nodes (
    cluster         TEXT NOT NULL REFERENCES clusters(name),
    name            TEXT NOT NULL,
    api_url         TEXT NOT NULL DEFAULT '',
    agent_version   TEXT NOT NULL DEFAULT '',
    role            TEXT NOT NULL DEFAULT 'unknown',
    pg_state        TEXT NOT NULL DEFAULT 'unknown',
    timeline        BIGINT,
    lag_bytes       BIGINT,
    status_json     TEXT NOT NULL DEFAULT '{}',
    last_report_ms  BIGINT NOT NULL DEFAULT 0,
    agent_up        BIGINT NOT NULL DEFAULT 1,
    removed_ms      BIGINT,
    PRIMARY KEY (cluster, name)
);

CREATE TABLE events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    ts_ms           BIGINT NOT NULL,
    received_ms     BIGINT NOT NULL,
    cluster         TEXT NOT NULL,
    node            TEXT NOT NULL,
    kind            TEXT NOT NULL,
    message         TEXT NOT NULL
);
CREATE INDEX events_time ON events (ts_ms, seq);
CREATE INDEX events_cluster ON events (cluster, ts_ms);

CREATE TABLE lag_samples (
    cluster         TEXT NOT NULL,
    node            TEXT NOT NULL,
    ts_ms           BIGINT NOT NULL,
    lag_bytes       BIGINT,
    PRIMARY KEY (cluster, node, ts_ms)
);
CREATE INDEX lag_samples_time ON lag_samples (ts_ms);

CREATE TABLE failover_records (
    cluster         TEXT NOT NULL,
    epoch           BIGINT NOT NULL,
    record_json     TEXT NOT NULL,
    PRIMARY KEY (cluster, epoch)
);

CREATE TABLE commands (
    id              TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL,
    cluster         TEXT NOT NULL,
    node            TEXT,
    kind            TEXT NOT NULL,
    args_json       TEXT NOT NULL,
    state           TEXT NOT NULL,
    message         TEXT NOT NULL DEFAULT '',
    result_json     TEXT,
    delivered_to    TEXT,
    created_by      TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL,
    deadline_ms     BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    claimed_by      TEXT,
    claim_until_ms  BIGINT,
    UNIQUE (cluster, idempotency_key)
);
CREATE INDEX commands_state ON commands (state, created_ms);

CREATE TABLE config_history (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster         TEXT NOT NULL,
    ts_ms           BIGINT NOT NULL,
    actor           TEXT NOT NULL,
    patch_json      TEXT NOT NULL,
    before_json     TEXT,
    command_id      TEXT NOT NULL
);

CREATE TABLE users (
    name            TEXT PRIMARY KEY,
    role            TEXT NOT NULL,
    password_hash   TEXT,
    created_ms      BIGINT NOT NULL,
    disabled        BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE api_tokens (
    id              TEXT PRIMARY KEY,
    user_name       TEXT NOT NULL REFERENCES users(name),
    name            TEXT NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    created_ms      BIGINT NOT NULL,
    expires_ms      BIGINT,
    last_used_ms    BIGINT
);

CREATE TABLE join_tokens (
    id              TEXT PRIMARY KEY,
    cluster         TEXT NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    created_by      TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    expires_ms      BIGINT NOT NULL,
    used_ms         BIGINT,
    used_by         TEXT
);

CREATE TABLE certificates (
    fingerprint     TEXT PRIMARY KEY,
    cluster         TEXT NOT NULL,
    node            TEXT NOT NULL,
    issued_ms       BIGINT NOT NULL,
    expires_ms      BIGINT NOT NULL,
    revoked_ms      BIGINT,
    revoked_by      TEXT
);

CREATE TABLE audit (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms           BIGINT NOT NULL,
    actor           TEXT NOT NULL,
    method          TEXT NOT NULL,
    path            TEXT NOT NULL,
    status          BIGINT NOT NULL,
    remote          TEXT NOT NULL,
    detail          TEXT NOT NULL DEFAULT ''
);

CREATE TABLE worker_leases (
    name            TEXT PRIMARY KEY,
    holder          TEXT NOT NULL,
    until_ms        BIGINT NOT NULL
);
